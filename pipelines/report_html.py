"""`DIR/report.html` from a finished output: the page, its charts and its files.

One self-contained HTML file (CSS, the Vega/Vega-Lite/vega-embed JavaScript,
chart specs and JPEG thumbnails all inline: it opens from disk with no server
and no network) showing

- the funnel as a chart (input rows, every stage/reason's drops, kept);
- a histogram of every stored score (kept samples, plus the samples a
  threshold dropped, at the score that failed) with the thresholds marked;
- a random sample of kept images; per reject reason a random sample (a
  thumbnail when the image had been downloaded and staged, else its URL only),
  each with URL, caption and detail;
- duplicate pairs side by side (the survivor first, the dedup detail with the
  distance); recaption before/after pairs; the run's config.

`render` writes it from `report_files/samples.json` (the samples the pipeline
step in `pipelines/report.py` drew and thumbnailed), `report.json`,
`config.json` and score histograms streamed from `index.parquet` /
`rejects.parquet` in record batches (bounded memory). `beam report DIR`
(`run_report`) runs `render` again on a finished output. This module reads and
writes files through Beam's FileSystems but builds no pipeline. The JavaScript
bundle, which vl-convert makes on the fly in about 5 s, is kept in
`cache_dir()` (`$IMAGEMILL_CACHE_DIR`, default `~/.cache/imagemill`).

Size bound (`MAX_REPORT_BYTES`, 6 MiB, tested on a 10,000-row run where every
sample has an image): the JavaScript bundle (~0.9 MB); at most `N_KEPT +
N_RECAPTIONED + MAX_THUMBNAIL_GROUPS * N_PER_REASON + 3 * N_DUPLICATE_PAIRS`
= 40 + 8 + 48 * 8 + 36 = 468 thumbnails of at most `thumbnails.MAX_BYTES`
(6 KiB, +1/3 for base64: ~3.7 MB); text fields cut to `TEXT_CHARS` (~0.4 MB);
histograms of `BINS` bins; the config cut to `CONFIG_CHARS`. None of it grows
with the number of rows. (In practice only the reasons after staging have
thumbnails, and reports are well under 2 MB.)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
from collections.abc import Iterable
from pathlib import Path

import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from pipelines import outputs
from schemas import Stage
from schemas.report import ReportSamples
from schemas.scoring import SelectConfig
from stages.core.select import SCORE_FIELDS

LOG = logging.getLogger(__name__)

REPORT_HTML = "report.html"
REPORT_FILES = "report_files"
SAMPLES = "samples.json"
CACHE_DIR_ENV = "IMAGEMILL_CACHE_DIR"

# The bounds that keep the report's size independent of the run's (see above).
# The sample sizes are drawn by the pipeline step (`pipelines/report.py`).
N_KEPT = 40
N_RECAPTIONED = 8
N_PER_REASON = 8
N_DUPLICATE_PAIRS = 12
# Reason groups that get thumbnails: above the number of reject reasons (42), so
# never reached in a real run (every reason has one stage); it keeps the size
# bound hard should reasons be added.
MAX_THUMBNAIL_GROUPS = 48
TEXT_CHARS = 300
CONFIG_CHARS = 64 * 1024
BINS = 40
MAX_REPORT_BYTES = 6 * 1024 * 1024

SCORES = ("clip_similarity", "nsfw_score", "punsafe", "pwatermark", "aesthetic_score")
_DETAIL_SCORE = re.compile(r"(\w+) (-?\d+(?:\.\d+)?(?:e-?\d+)?) [<>]")


# ---------------------------------------------------------------- files


def files_path(output_dir: str, name: str) -> str:
    return FileSystems.join(output_dir, REPORT_FILES, name)


def write_atomically(path: str, data: bytes) -> None:
    """Write `path` via a temporary name, so a partial file is never visible."""
    parent = path.rsplit("/", 1)[0]
    if not FileSystems.exists(parent):
        FileSystems.mkdirs(parent)
    tmp = f"{path}.tmp-{random.getrandbits(32):08x}"
    with FileSystems.create(tmp, compression_type="uncompressed") as f:
        f.write(data)
    if FileSystems.exists(path):
        FileSystems.delete([path])
    FileSystems.rename([tmp], [path])


def _read(path: str) -> bytes:
    with FileSystems.open(path, compression_type="uncompressed") as f:
        return f.read()


def read_samples(output_dir: str) -> ReportSamples | None:
    path = files_path(output_dir, SAMPLES)
    if not FileSystems.exists(path):
        return None
    return ReportSamples.model_validate_json(_read(path))


# ---------------------------------------------------------------- histograms


def _thresholds(config: dict) -> dict[str, float]:
    """score field -> threshold in force (unresolved `auto` counts as off)."""
    try:
        select = SelectConfig.model_validate(config.get("curate", {}).get("select", {}))
    except ValueError:
        return {}
    return {SCORE_FIELDS[name]: value for name, value in select.thresholds().items() if value is not None}


def _batches(path: str, columns: list[str]) -> Iterable[dict[str, list]]:
    if not FileSystems.exists(path):
        return
    with FileSystems.open(path, compression_type="uncompressed") as f:
        parquet = pq.ParquetFile(f)
        present = [c for c in columns if c in parquet.schema_arrow.names]
        if not present:
            return
        for batch in parquet.iter_batches(batch_size=65536, columns=present):
            yield batch.to_pydict()


def score_histograms(output_dir: str) -> dict[str, list[dict]]:
    """score -> rows {start, end, count, group} over `BINS` equal bins between
    the smallest and largest value seen. Two streaming passes over the tables:
    memory is one record batch, whatever the run's size."""

    def values():
        for batch in _batches(FileSystems.join(output_dir, outputs.INDEX), list(SCORES)):
            for score, column in batch.items():
                for value in column:
                    if value is not None:
                        yield score, "kept", float(value)
        for batch in _batches(FileSystems.join(output_dir, outputs.REJECTS_TABLE), ["stage", "detail"]):
            for stage, detail in zip(batch["stage"], batch["detail"]):
                if stage != Stage.SELECT.value:
                    continue
                for score, value in _DETAIL_SCORE.findall(detail or ""):
                    if score in SCORES:
                        yield score, "rejected by threshold", float(value)

    bounds: dict[str, list[float]] = {}
    for score, _, value in values():
        low, high = bounds.setdefault(score, [value, value])
        bounds[score] = [min(low, value), max(high, value)]
    counts: dict[tuple[str, str, int], int] = {}
    for score, group, value in values():
        low, high = bounds[score]
        width = (high - low) / BINS or 1.0
        index = min(int((value - low) / width), BINS - 1)
        counts[(score, group, index)] = counts.get((score, group, index), 0) + 1
    result: dict[str, list[dict]] = {}
    for (score, group, index), count in sorted(counts.items()):
        low, high = bounds[score]
        width = (high - low) / BINS or 1.0
        result.setdefault(score, []).append(
            {"start": low + index * width, "end": low + (index + 1) * width, "count": count, "group": group}
        )
    return result


# ---------------------------------------------------------------- charts


def funnel_chart(report) -> dict:
    import altair as alt

    rows = [{"step": "input rows", "count": report.input_rows, "kind": "input", "order": 0}]
    for i, row in enumerate(report.funnel, start=1):
        rows.append({"step": f"{row.stage.value} / {row.reason.value}", "count": row.count, "kind": "rejected", "order": i})
    rows.append({"step": "kept", "count": report.kept, "kind": "kept", "order": len(rows)})
    chart = (
        alt.Chart(alt.Data(values=rows))
        .mark_bar()
        .encode(
            y=alt.Y("step:N", sort=[r["step"] for r in rows], title=None),
            x=alt.X("count:Q", title="rows"),
            color=alt.Color(
                "kind:N",
                scale=alt.Scale(domain=["input", "rejected", "kept"], range=["#4c78a8", "#e45756", "#54a24b"]),
                legend=None,
            ),
            tooltip=["step:N", "count:Q"],
        )
        .properties(width=560, title="Funnel")
    )
    text = chart.mark_text(align="left", dx=3).encode(text="count:Q", color=alt.value("black"))
    return (chart + text).to_dict()


def histogram_chart(score: str, rows: list[dict], threshold: float | None) -> dict:
    import altair as alt

    bars = (
        alt.Chart(alt.Data(values=rows))
        .mark_bar()
        .encode(
            x=alt.X("start:Q", bin="binned", title=score),
            x2="end:Q",
            y=alt.Y("count:Q", stack=True, title="samples"),
            color=alt.Color(
                "group:N",
                scale=alt.Scale(domain=["kept", "rejected by threshold"], range=["#54a24b", "#e45756"]),
                title=None,
            ),
            tooltip=["start:Q", "end:Q", "count:Q", "group:N"],
        )
        .properties(width=360, height=160, title=score)
    )
    if threshold is None:
        return bars.to_dict()
    rule = (
        alt.Chart(alt.Data(values=[{"threshold": threshold}]))
        .mark_rule(color="black", strokeDash=[4, 3])
        .encode(x="threshold:Q", tooltip=["threshold:Q"])
    )
    return (bars + rule).to_dict()


def cache_dir() -> Path:
    """Where imagemill keeps what it can rebuild: `$IMAGEMILL_CACHE_DIR`, else
    `$XDG_CACHE_HOME/imagemill`, else `~/.cache/imagemill`."""
    configured = os.environ.get(CACHE_DIR_ENV)
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "imagemill"


def _vega_bundle() -> str:
    """The Vega, Vega-Lite and vega-embed JavaScript, safe inside a <script> element.

    vl-convert bundles it on the fly, about 5 s of CPU in every new process (each
    `beam run`, each worker that writes a report), so it is kept in `cache_dir()`
    under vl-convert's version and read from there. A cache that cannot be read
    or written is passed over: the bundle is then made here, as without one."""
    import vl_convert

    path = cache_dir() / f"vega-embed-vl-convert-{vl_convert.__version__}.js"
    try:
        cached = path.read_text(encoding="utf-8")
        if cached:
            return cached
    except (OSError, UnicodeDecodeError):
        pass
    # Inside a <script> element, "</script" would end it.
    bundle = vl_convert.javascript_bundle().replace("</script", "<\\/script")
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{random.getrandbits(32):08x}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(bundle, encoding="utf-8")
        os.replace(tmp, path)  # whole or not at all: a concurrent reader never sees half a file
    except OSError as err:
        LOG.debug("report: not caching the JavaScript bundle in %s: %s", path, err)
        with contextlib.suppress(OSError):
            tmp.unlink()
    return bundle


# ---------------------------------------------------------------- html

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>imagemill report: {{ title }}</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ddd; }
h3 { font-size: 15px; }
.totals span { margin-right: 18px; } .bad { color: #b00; font-weight: bold; }
.charts { display: flex; flex-wrap: wrap; gap: 16px; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; }
.card { width: 180px; border: 1px solid #ddd; border-radius: 4px; padding: 6px; font-size: 12px; overflow-wrap: anywhere; }
.card img { max-width: 168px; max-height: 128px; display: block; margin: 0 auto 4px; }
.noimg { height: 48px; background: #f4f4f4; color: #888; text-align: center; line-height: 48px; margin-bottom: 4px; }
.url { color: #555; } .detail { color: #b00; } .key { color: #888; }
.pair { display: flex; gap: 8px; align-items: flex-start; margin-bottom: 10px; }
.arrow { align-self: center; font-size: 20px; color: #888; }
pre { background: #f6f6f6; padding: 8px; overflow: auto; max-height: 400px; }
</style></head>
<body>
<h1>imagemill report: {{ title }}</h1>
<p class="totals"><span>input rows <b>{{ report.input_rows }}</b></span><span>kept <b>{{ report.kept }}</b></span>
<span>rejected <b>{{ report.rejected }}</b></span><span>shards <b>{{ report.shards }}</b></span>
<span class="{{ '' if report.accounting_ok else 'bad' }}">accounting {{ 'ok' if report.accounting_ok else 'MISMATCH' }}</span></p>

<h2>Funnel</h2>
<div class="charts"><div class="chart" id="chart-funnel"></div></div>

<h2>Scores</h2>
{% if histograms %}<p>Kept samples, and the samples a selection threshold dropped (at each score that failed); dashed line: the threshold.</p>
<div class="charts">{% for score in histograms %}<div class="chart" id="chart-{{ score }}"></div>{% endfor %}</div>
{% else %}<p>No scores were computed in this run (no model stage configured).</p>{% endif %}

{% macro card(c) -%}
<div class="card">{% if c.thumbnail %}<img src="{{ c.thumbnail }}" alt="{{ c.key }}">{% else %}<div class="noimg">no image</div>{% endif %}
<div class="key">{{ c.key }}</div><div class="url"><a href="{{ c.url }}">{{ c.url }}</a></div>
<div>{{ c.caption }}</div>{% if c.detail %}<div class="detail">{{ c.detail }}</div>{% endif %}</div>
{%- endmacro %}

<h2>Kept (random sample of {{ samples.kept|length }})</h2>
{% if samples.kept %}<div class="grid">{% for c in samples.kept %}{{ card(c) }}{% endfor %}</div>{% else %}<p>Nothing kept.</p>{% endif %}

<h2>Rejected, by reason (random sample of up to {{ per_reason }} each)</h2>
{% for reason, cards in samples.rejects.items() %}<h3>{{ reason }} ({{ counts.get(reason, cards|length) }} rows)</h3>
<div class="grid">{% for c in cards %}{{ card(c) }}{% endfor %}</div>{% else %}<p>Nothing rejected.</p>{% endfor %}

<h2>Duplicates (survivor first)</h2>
{% if duplicates %}{% for survivor, dup in duplicates %}<div class="pair">{{ card(survivor) }}<div class="arrow">&larr;</div>{{ card(dup) }}</div>{% endfor %}
{% else %}<p>No duplicates in the sample.</p>{% endif %}

<h2>Recaptions (before / after)</h2>
{% if samples.recaptioned %}<table>{% for c in samples.recaptioned %}<tr><td>{% if c.thumbnail %}<img src="{{ c.thumbnail }}" alt="{{ c.key }}">{% endif %}</td>
<td><div class="key">{{ c.key }}</div><div>before: {{ c.caption }}</div><div>after: <b>{{ c.caption_synthetic }}</b></div></td></tr>{% endfor %}</table>
{% else %}<p>No recaptioned samples.</p>{% endif %}

<h2>Config</h2>
<pre>{{ config_text }}</pre>

<script type="application/json" id="specs">{{ specs_json }}</script>
<script type="module">{{ vega_js }}</script>
<script type="module">
const specs = JSON.parse(document.getElementById("specs").textContent);
const runs = Object.entries(specs).map(([id, spec]) =>
  vegaEmbed("#" + id, spec, {renderer: "svg", actions: false}));
Promise.all(runs).then(() => { document.body.dataset.chartsDrawn = String(runs.length); })
  .catch((err) => { console.error("chart failed: " + err); });
</script>
</body></html>
"""


def _cut_config(text: str) -> str:
    if len(text) <= CONFIG_CHARS:
        return text
    return text[:CONFIG_CHARS] + f"\n... ({len(text) - CONFIG_CHARS} more characters in config.json)"


def render(output_dir: str) -> str:
    """Write `DIR/report.html` from report.json, config.json, the tables and
    report_files/samples.json (if present); returns its path."""
    import jinja2

    report = outputs.read_report(output_dir)
    config_path = FileSystems.join(output_dir, outputs.CONFIG)
    config = json.loads(_read(config_path)) if FileSystems.exists(config_path) else {}
    samples = read_samples(output_dir) or ReportSamples()
    thresholds = _thresholds(config)
    histograms = score_histograms(output_dir)
    specs = {"chart-funnel": funnel_chart(report)}
    for score, rows in histograms.items():
        specs[f"chart-{score}"] = histogram_chart(score, rows, thresholds.get(score))
    duplicates = [
        (samples.survivors[c.duplicate_of], c)
        for cards in samples.rejects.values()
        for c in cards
        if c.duplicate_of and c.duplicate_of in samples.survivors
    ]
    counts = {f"{row.stage.value}/{row.reason.value}": row.count for row in report.funnel}
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    page = env.from_string(_PAGE).render(
        title=output_dir.rstrip("/"),
        report=report,
        histograms=list(histograms),
        samples=samples,
        per_reason=N_PER_REASON,
        counts=counts,
        duplicates=duplicates,
        config_text=_cut_config(json.dumps(config, indent=2, sort_keys=True)),
        # JSON inside <script>: "</" must not appear literally.
        specs_json=jinja2.utils.markupsafe.Markup(json.dumps(specs).replace("</", "<\\/")),
        vega_js=jinja2.utils.markupsafe.Markup(_vega_bundle()),
    )
    path = FileSystems.join(output_dir, REPORT_HTML)
    data = page.encode("utf-8")
    if len(data) > MAX_REPORT_BYTES:
        LOG.warning("%s is %d bytes, over the %d-byte bound", path, len(data), MAX_REPORT_BYTES)
    write_atomically(path, data)
    return path


def run_report(argv: list[str]) -> int:
    """`beam report DIR`: rebuild DIR/report.html from a finished output."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="beam report", description="Rebuild DIR/report.html from a finished curate or select output.")
    parser.add_argument("dir", help="A finished `beam run curate` / `beam run select` output folder.")
    args = parser.parse_args(argv)
    if not FileSystems.exists(FileSystems.join(args.dir, outputs.REPORT)):
        print(f"beam report: error: {args.dir}: no {outputs.REPORT}; is it a finished curate or select output?", file=sys.stderr)
        return 2
    try:
        path = render(args.dir)
    except (OSError, ValueError) as err:
        print(f"beam report: error: {args.dir}: {err}", file=sys.stderr)
        return 2
    if read_samples(args.dir) is None:
        print(f"beam report: {args.dir} has no {REPORT_FILES}/{SAMPLES}; the report shows charts and config but no images")
    print(f"report: {path}")
    return 0



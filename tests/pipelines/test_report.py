"""`DIR/report.html`: written by curate and select, rebuilt by `beam report`,
opened in headless Chromium (no console errors, every chart drawn as SVG), and
bounded in size on a 10,000-row run."""

from __future__ import annotations

import json
import random
from pathlib import Path

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import outputs, report, report_html
from pipelines.cli import main
from schemas import ImageRef, Provenance, RejectReason, Rejection, SampleRecord, Stage
from tests.browser import console_errors, screenshot
from tests.pipelines.test_curate import corpus, models, run_curate, run_curate_with_models, web  # noqa: F401  (fixtures)


def open_report(driver, path: Path) -> None:
    """Load the report and wait for vega-embed to have drawn every chart."""
    from selenium.webdriver.support.ui import WebDriverWait

    console_errors(driver)  # drop earlier pages' entries
    driver.get(path.resolve().as_uri())
    charts = driver.find_elements("css selector", ".chart")
    WebDriverWait(driver, 30).until(
        lambda d: d.execute_script("return document.body.dataset.chartsDrawn") == str(len(charts))
    )


def check_report_page(driver, out: Path) -> dict:
    """No console errors; every chart div holds a drawn SVG with marks; the
    samples on the page match samples.json and the funnel."""
    open_report(driver, out / "report.html")
    assert console_errors(driver) == []
    charts = driver.find_elements("css selector", ".chart")
    ids = [c.get_attribute("id") for c in charts]
    assert "chart-funnel" in ids
    for chart in charts:
        svg = chart.find_elements("css selector", "svg")
        assert svg, f"{chart.get_attribute('id')}: no SVG drawn"
        assert chart.find_elements("css selector", "path, rect"), f"{chart.get_attribute('id')}: no marks"
    funnel = json.loads((out / "report.json").read_text())
    page = driver.find_element("tag name", "body").text
    for row in funnel["funnel"]:
        assert f"{row['stage']}/{row['reason']} ({row['count']} rows)" in page
    samples = json.loads((out / "report_files" / "samples.json").read_text())
    images = driver.find_elements("css selector", ".card img")
    with_thumbnail = sum(1 for c in samples["kept"] if c["thumbnail"]) + sum(
        1 for cards in samples["rejects"].values() for c in cards if c["thumbnail"]
    )
    assert with_thumbnail > 0
    # Duplicate pairs repeat both cards; every thumbnail in samples.json is on the page at least once.
    assert len(images) >= with_thumbnail
    assert all(img.get_attribute("naturalWidth") not in (None, "0") for img in images), "a thumbnail did not decode"
    return {"ids": ids, "samples": samples, "text": page}


def test_demo_report_opens_in_a_browser(tmp_path, corpus, browser):  # noqa: F811
    out = Path(run_curate(tmp_path, corpus))
    assert not (out / "_staging").exists(), "staging is still deleted after the report"
    seen = check_report_page(browser, out)
    screenshot(browser, "report_demo", tmp_path)
    samples = seen["samples"]
    kept = [r["key"] for r in pq.read_table(out / "index.parquet").to_pylist()]
    assert len(samples["kept"]) == min(len(kept), report_html.N_KEPT) and all(c["thumbnail"] for c in samples["kept"])
    expected = corpus.expected
    for reason, cards in samples["rejects"].items():
        assert cards and len(cards) <= report_html.N_PER_REASON
        for card in cards:
            assert f"{expected[card['key']].stage}/{expected[card['key']].reason}" == reason
            # Only images that reached staging (dedup onwards) have a thumbnail.
            assert bool(card["thumbnail"]) == (expected[card["key"]].stage in ("dedup", "select", "shards"))
    duplicates = [c for cards in samples["rejects"].values() for c in cards if c["duplicate_of"]]
    assert duplicates and all(c["duplicate_of"] in samples["survivors"] for c in duplicates)
    assert all(c["thumbnail"] for c in samples["survivors"].values())
    assert "Duplicates (survivor first)" in seen["text"] and "No duplicates in the sample" not in seen["text"]

    # `beam report DIR` rebuilds the same page after the run (staging gone).
    before = (out / "report.html").read_bytes()
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.html").read_bytes() == before


def test_report_of_a_run_with_every_model_stage(tmp_path, corpus, models, browser):  # noqa: F811
    out = run_curate_with_models(tmp_path, corpus, models)
    seen = check_report_page(browser, out)
    screenshot(browser, "report_models", tmp_path)
    # A histogram per stored score; the threshold rule on clip_similarity.
    for score in ("clip_similarity", "nsfw_score", "punsafe", "pwatermark", "aesthetic_score"):
        has_values = any(r[score] is not None for r in pq.read_table(out / "index.parquet").to_pylist())
        assert (f"chart-{score}" in seen["ids"]) == has_values
    assert "chart-clip_similarity" in seen["ids"]
    clip_chart = browser.find_element("id", "chart-clip_similarity")
    assert "rejected by threshold" in clip_chart.text
    recaptioned = [r for r in pq.read_table(out / "index.parquet").to_pylist() if r["caption_synthetic"]]
    assert len(seen["samples"]["recaptioned"]) == min(len(recaptioned), report_html.N_RECAPTIONED)
    for card in seen["samples"]["recaptioned"]:
        assert f"after: {card['caption_synthetic']}" in seen["text"]
    assert seen["samples"]["rejects"].get("select/low_clip_similarity")


def test_the_javascript_bundle_is_made_once_and_then_read_from_the_cache(tmp_path, monkeypatch):
    import vl_convert

    made = []
    real = vl_convert.javascript_bundle
    monkeypatch.setattr(vl_convert, "javascript_bundle", lambda: made.append(1) or real())
    from tests.conftest import CACHE_DIR_ENV

    assert report_html.CACHE_DIR_ENV == CACHE_DIR_ENV  # the name the suite's session cache sets
    monkeypatch.setenv(report_html.CACHE_DIR_ENV, str(tmp_path / "cache"))
    bundle = report_html._vega_bundle()
    assert "vegaEmbed" in bundle and "</script" not in bundle and made == [1]
    cached = tmp_path / "cache" / f"vega-embed-vl-convert-{vl_convert.__version__}.js"
    assert cached.read_text(encoding="utf-8") == bundle
    assert [p.name for p in cached.parent.iterdir()] == [cached.name]  # no temporary file left
    assert report_html._vega_bundle() == bundle and made == [1]
    cached.write_text("/* what the cache holds */", encoding="utf-8")
    assert report_html._vega_bundle() == "/* what the cache holds */"

    # A cache folder that cannot be made: the bundle is made each time, and still right.
    (tmp_path / "blocked").write_text("a file, not a folder")
    monkeypatch.setenv(report_html.CACHE_DIR_ENV, str(tmp_path / "blocked" / "cache"))
    assert report_html._vega_bundle() == bundle and made == [1, 1]


def test_bad_report_dir_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no report.json" in capsys.readouterr().err


# ---------------------------------------------------------------- size bound at 10,000 rows


def _noise_jpeg(seed: int) -> bytes:
    """Noise at thumbnail scale compresses worst: the largest thumbnail an image can give."""
    import io

    pixels = np.random.default_rng(seed).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).resize((448, 448), Image.Resampling.NEAREST).save(out, "JPEG", quality=95)
    return out.getvalue()


N_ROWS = 10_000
LONG_TEXT = "words " * 200


def _synthetic_record(i: int, staged: str, lengths: tuple[int, ...]) -> SampleRecord:
    rng = random.Random(i)
    j = i % len(lengths)
    return SampleRecord(
        key=f"{i:09d}", url=f"http://127.0.0.1/{i}.jpg?{LONG_TEXT}", caption_original=LONG_TEXT,
        caption=LONG_TEXT, caption_synthetic=LONG_TEXT, recaption_status="ok",
        clip_similarity=rng.uniform(0.1, 0.6), nsfw_score=rng.random(), punsafe=rng.random(),
        pwatermark=rng.random(), aesthetic_score=rng.uniform(2, 8), status="kept", shard="000000.tar",
        provenance=Provenance(source_file="urls.parquet", source_row=i),
        image_ref=ImageRef(path=staged, offset=sum(lengths[:j]), length=lengths[j]),
    )  # fmt: skip


_REASONS = list(RejectReason)


def _synthetic_rejection(record: SampleRecord, i: int) -> Rejection:
    """Rows N/2.. are rejected over every reason; even ones are duplicates of a kept row."""
    return Rejection(
        key=record.key, url=record.url, stage=Stage.DEDUP if i % len(_REASONS) < 2 else Stage.SELECT,
        reason=_REASONS[i % len(_REASONS)],
        detail=f"clip_similarity {record.clip_similarity:.4f} < 0.3; {LONG_TEXT}",
        duplicate_of=f"{i % (N_ROWS // 2):09d}" if i % 2 == 0 else None,
    )  # fmt: skip


def test_report_size_is_bounded_on_10000_rows(tmp_path):
    """10,000 synthetic rows: half kept (scored, recaptioned), half rejected
    over every reason, every one with a staged noise image and long texts; the
    report stays under MAX_REPORT_BYTES and the sample sizes hold."""
    out = tmp_path / "out"
    out.mkdir()
    staged = tmp_path / "staged.bin"
    images = [_noise_jpeg(i) for i in range(4)]
    staged.write_bytes(b"".join(images))
    lengths = tuple(len(b) for b in images)
    records = [_synthetic_record(i, str(staged), lengths) for i in range(N_ROWS)]
    kept = records[: N_ROWS // 2]
    rejects = [_synthetic_rejection(r, i) for i, r in enumerate(records[N_ROWS // 2 :])]
    pq.write_table(pa.Table.from_pylist([outputs.to_row(r) for r in kept], outputs.arrow_schema(SampleRecord)), out / outputs.INDEX)
    pq.write_table(pa.Table.from_pylist([outputs.to_row(r) for r in rejects], outputs.arrow_schema(Rejection)), out / outputs.REJECTS_TABLE)
    counts = {}
    for r in rejects:
        counts[(r.stage.value, r.reason.value)] = counts.get((r.stage.value, r.reason.value), 0) + 1
    run_report = outputs.build_report(N_ROWS, len(kept), 2, list(counts.items()))
    (out / outputs.REPORT).write_text(run_report.model_dump_json())
    (out / outputs.CONFIG).write_text(json.dumps({"curate": {"select": {"min_clip_similarity": 0.3}}, "note": LONG_TEXT}))

    with beam.Pipeline() as p:
        # Built inside the pipeline: Create with 10,000 pickled records is slow.
        all_records = (
            p
            | "Rows" >> beam.Create(list(range(N_ROWS)))
            | "Records" >> beam.Map(_synthetic_record, str(staged), lengths)
        )
        report.add_report(
            str(out),
            p | "Report" >> beam.Create([run_report]),
            all_records | "Kept" >> beam.Filter(lambda r: int(r.key) < N_ROWS // 2),
            all_records
            | "RejectedRows" >> beam.Filter(lambda r: int(r.key) >= N_ROWS // 2)
            | "Rejects" >> beam.Map(lambda r: _synthetic_rejection(r, int(r.key) - N_ROWS // 2)),
            all_records,
        )
    size = (out / "report.html").stat().st_size
    samples = json.loads((out / "report_files" / "samples.json").read_text())
    print(f"report.html for {N_ROWS} rows: {size} bytes (bound {report_html.MAX_REPORT_BYTES})")
    assert size <= report_html.MAX_REPORT_BYTES
    assert len(samples["kept"]) == report_html.N_KEPT and len(samples["recaptioned"]) == report_html.N_RECAPTIONED
    assert len(samples["rejects"]) == len(counts)
    assert all(len(cards) == report_html.N_PER_REASON for cards in samples["rejects"].values())
    assert all(card["thumbnail"] for cards in samples["rejects"].values() for card in cards)
    assert all(len(card["url"]) <= report_html.TEXT_CHARS for cards in samples["rejects"].values() for card in cards)

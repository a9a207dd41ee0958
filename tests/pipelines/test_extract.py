"""`beam run extract` end to end on the generated case corpus (every row and
reject checked), and the extract -> curate chain on a local web whose pages and
images the test serves, as two commands and as `beam run extract-curate`, on
DirectRunner and (one small case) on the portable runner."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from pipelines.cli import SCHEMAS_DIR, main
from pipelines.testing import warcgen, webcorpus
from pipelines.testing.localweb import LocalWeb
from tests.portable import portable_services  # noqa: F401  (fixture)
from tests.stages import extract_cases as cases

FILE_ORDER = ["broken", "wat", "main", "pages"]  # sorted paths: broken.warc.gz, crawl.warc.wat.gz, main.warc.gz, pages.tsv


def read_rows(pattern_dir: Path, glob: str) -> list[dict]:
    rows = []
    for path in sorted(pattern_dir.glob(glob)):
        rows += pq.read_table(path).to_pylist()
    return rows


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract-run")
    paths = cases.write_corpus(root / "in")
    assert sorted(paths.values()) == [paths[n] for n in FILE_ORDER]
    (root / "extract.yaml").write_text(yaml.safe_dump({"dedup": {"max_captions_per_url": 2}, "output": {"num_files": 2}}))
    out = root / "pairs"
    code = main(["run", "extract", "--input", str(root / "in" / "*"), "--output", str(out), "--config", str(root / "extract.yaml")])
    return code, out, paths


def test_extract_writes_every_pair_and_reject(extracted):
    code, out, paths = extracted
    assert code == 0
    fields = ("page_url", "url", "caption", "caption_source", "width", "height", "alt", "title", "figcaption", "language")
    dropped = {(page, url, caption) for _, page, url, caption in cases.DEDUP}
    want_pairs = [
        {**row, "source_file": paths[name], "file_ordinal": FILE_ORDER.index(name)}
        for name in FILE_ORDER
        for row in cases.PAIRS[name]
        if (row["page_url"], row["url"], row["caption"]) not in dropped
    ]
    files = sorted(out.glob("*.parquet"))
    assert [f.name for f in files] == ["pairs-00000-of-00002.parquet", "pairs-00001-of-00002.parquet"]
    rows = read_rows(out, "*.parquet")
    got = sorted(
        ({**{f: r[f] for f in fields}, "source_file": r["source_file"], "file_ordinal": r["file_ordinal"]} for r in rows),
        key=lambda r: (r["file_ordinal"], r["page_url"], r["url"], r["caption"]),
    )
    assert got == sorted(want_pairs, key=lambda r: (r["file_ordinal"], r["page_url"], r["url"], r["caption"]))
    # The kept row of a duplicate pair is the first in input order (P1 in main.warc.gz, not P3).
    a_red_car = [r for r in rows if r["caption"] == "A red car"]
    assert [r["page_url"] for r in a_red_car] == [cases.P1]

    rejects = pq.read_table(out / "rejects" / "rejects.parquet").to_pylist()
    want_rejects = [(reason, page, image) for name in FILE_ORDER for reason, page, image in cases.REJECTS[name]]
    want_rejects += [(reason, page, url) for reason, page, url, _ in cases.DEDUP]
    assert cases.sort_rejects((r["reason"], r["page_url"], r["image_url"]) for r in rejects) == cases.sort_rejects(want_rejects)
    assert {r["source_file"] for r in rejects if r["reason"] == "bad_record" and r["page_url"] is None} == {paths["broken"], paths["pages"]}

    report = json.loads((out / "report.json").read_text())
    import jsonschema

    jsonschema.validate(report, json.loads((SCHEMAS_DIR / "extract_report.schema.json").read_text()))
    n_pairs = sum(len(v) for v in cases.PAIRS.values())
    other = collections.Counter()
    for name in FILE_ORDER:
        other.update({k: v for k, v in cases.OTHER[name].items() if v})
    reasons = collections.Counter(r for r, _, _ in want_rejects)
    assert report == {
        "schema_version": "1.0",
        "input_files": 4,
        "records": report["records"],  # checked by the identity below
        "other_records": dict(sorted(other.items())),
        "pages": report["pages"],
        "images": n_pairs + sum(reasons[r] for r in ("data_uri", "bad_url", "tracking_pixel", "no_text")),
        "candidates": n_pairs,
        "pairs": len(want_pairs),
        "rejects": {r: reasons.get(r, 0) for r in report["rejects"]},
        "accounting_ok": True,
    }
    page_rejects = sum(reasons[r] for r in ("bad_record", "not_html", "decode_error", "page_opt_out"))
    assert report["records"] == sum(other.values()) + report["pages"] + page_rejects
    # Pages parsed: main 9 (p1, p2, p3, broken HTML, 3 charset cases, the header scoped to another agent,
    # no-type.html), broken.warc.gz 1, the WAT 1, the page list 2.
    assert report["pages"] == 9 + 1 + 1 + 2
    config = json.loads((out / "config.json").read_text())
    assert config["extract"]["dedup"]["max_captions_per_url"] == 2
    assert not [p for p in out.rglob("*") if "temp" in p.name or p.suffix == ".partial"]


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "notes.zip").write_bytes(b"PK")
    assert main(["run", "extract", "--input", str(tmp_path / "*"), "--output", str(tmp_path / "o")]) == 2
    assert "cannot tell the input kind" in capsys.readouterr().err
    assert main(["run", "extract", "--input", str(tmp_path / "nothing-*.warc.gz"), "--output", str(tmp_path / "o")]) == 2
    assert "no input file matches" in capsys.readouterr().err


# ------------------------------------------------------------------ extract -> curate


@pytest.fixture(scope="module")
def web():
    with LocalWeb() as server:
        yield server


def _jpeg(web: LocalWeb, path: str, seed: int, size=(640, 560)) -> str:
    web.add(path, webcorpus.jpeg(webcorpus.render(seed, size, "red", "circle")))
    return web.url(path)


def write_web_crawl(web: LocalWeb, root: Path) -> tuple[str, dict[str, tuple]]:
    """A WARC whose pages point at images on `web`; returns (glob, expected
    fate per image URL: ("kept", caption) or (stage, reason))."""
    base = web.base_url
    good = [_jpeg(web, f"/img/good{i}.jpg", i) for i in range(5)]
    small = _jpeg(web, "/img/small.jpg", 10, size=(200, 150))
    web.add("/img/gone.jpg", b"not found", status=404, content_type="text/plain")
    page1 = b"""<html lang="en"><body>
      <img src="/img/good0.jpg" alt="a red circle on a patterned background">
      <img src="/img/good1.jpg" srcset="/img/good1.jpg 1x, /img/good2.jpg 2x" alt="a large red circle, two times">
      <figure><img src="img/good3.jpg"><figcaption>a figure with a red circle</figcaption></figure>
      <img src="/img/small.jpg" alt="a small red circle thumbnail">
      <img src="/img/gone.jpg" alt="an image that is gone now">
      <img src="/img/pixel.gif" width="1" height="1" alt="tracking">
    </body></html>"""
    page2 = b"""<html><body><img src="/img/good0.jpg" alt="a red circle on a patterned background">
      <img src="../img/good4.jpg" alt="img"></body></html>"""
    warcgen.write_warc(root / "web.warc.gz", [
        warcgen.request(f"{base}/"),
        warcgen.response(f"{base}/index.html", page1),
        warcgen.response(f"{base}/sub/page2.html", page2),
        warcgen.response(f"{base}/style.css", b"body{}", content_type="text/css"),
    ])
    expected = {
        good[0]: ("kept", "a red circle on a patterned background"),  # page2's copy is a duplicate pair
        good[2]: ("kept", "a large red circle, two times"),
        good[3]: ("kept", "a figure with a red circle"),
        small: ("decode", "too_small"),
        web.url("/img/gone.jpg"): ("crawl", "http_error"),
        good[4]: ("caption", "boilerplate_caption"),
    }
    return str(root / "*.warc.gz"), expected


CURATE_CONFIG = {"crawl": {"timeout_s": 2.0, "threads": 4}, "shards": {"samples_per_shard": 10, "writers": 1}}


def check_curated(out: Path, expected: dict) -> None:
    index = pq.read_table(out / "index.parquet").to_pylist()
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    got = {r["url"]: ("kept", r["caption_original"]) for r in index}
    got |= {r["url"]: (r["stage"], r["reason"]) for r in rejects}
    assert len(got) == len(index) + len(rejects)
    assert got == expected
    report = json.loads((out / "report.json").read_text())
    assert report["accounting_ok"] and report["input_rows"] == len(expected)
    assert report["kept"] == sum(1 for v in expected.values() if v[0] == "kept")


def test_extract_then_curate_two_commands(tmp_path, web):
    pattern, expected = write_web_crawl(web, tmp_path)
    (tmp_path / "curate.yaml").write_text(yaml.safe_dump(CURATE_CONFIG | {"read": {"width_col": "width", "height_col": "height"}}))
    assert main(["run", "extract", "--input", pattern, "--output", str(tmp_path / "pairs")]) == 0
    assert main([
        "run", "curate", "--input", str(tmp_path / "pairs" / "*.parquet"), "--output", str(tmp_path / "curated"),
        "--config", str(tmp_path / "curate.yaml"), "--allow-private-network",
    ]) == 0
    check_curated(tmp_path / "curated", expected)


def run_chained(tmp_path: Path, web: LocalWeb, beam_args=()) -> tuple[Path, dict]:
    pattern, expected = write_web_crawl(web, tmp_path)
    (tmp_path / "curate.yaml").write_text(yaml.safe_dump(CURATE_CONFIG))
    out = tmp_path / "out"
    code = main([
        "run", "extract-curate", "--input", pattern, "--output", str(out), "--config", str(tmp_path / "curate.yaml"),
        "--allow-private-network", *beam_args,
    ])
    assert code == 0
    return out, expected


def check_chained(out: Path, expected: dict) -> None:
    check_curated(out, expected)
    # No pairs folder in between: extract leaves only its report and rejects.
    assert not list(out.rglob("pairs-*.parquet"))
    report = json.loads((out / "extract" / "report.json").read_text())
    assert (report["pages"], report["images"], report["pairs"]) == (2, 8, len(expected))
    assert {k: v for k, v in report["rejects"].items() if v} == {"tracking_pixel": 1, "duplicate_pair": 1, "not_html": 1}
    # Curate keys are (WARC file ordinal, image index in the file), so they follow the page order.
    index = pq.read_table(out / "index.parquet").to_pylist()
    assert sorted(r["key"] for r in index) == ["00000000000000", "00000000000001", "00000000000002"]


def test_extract_curate_in_one_pipeline(tmp_path, web):
    out, expected = run_chained(tmp_path, web)
    check_chained(out, expected)


@pytest.mark.portable
def test_extract_curate_on_portable_runner(tmp_path, web, portable_services):  # noqa: F811
    """The chained pipeline on Beam's portable runner, whose workers get the
    project only from the staged sdist."""
    out, expected = run_chained(tmp_path, web, portable_services.argv)
    check_chained(out, expected)

"""One input folder with every kind of broken file and value: the run finishes,
each bad row is a reject with its reason, each file that failed part-way is an
input error with the rows read before the failure, and the exit status says so.
Also the pre-run refusals (unknown options, unwritable or used output folders)."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import runs
from pipelines.cli import main
from pipelines.testing import webcorpus
from pipelines.testing.localweb import LocalWeb


@pytest.fixture(scope="module")
def web():
    with LocalWeb() as server:
        for i in range(8):
            server.add(f"/img{i}.jpg", webcorpus.jpeg(webcorpus.render(100 + i, (640, 560))))
        yield server


def _corrupt_parquet(path: Path, web) -> int:
    """A parquet file whose footer is intact but whose second row group's data
    pages are garbage. Returns the rows of the first (readable) row group."""
    rows = [{"url": web.url(f"/p{i}.jpg"), "caption": f"a red kite number {i}", "width": 640, "height": 560} for i in range(40)]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=20, compression="NONE")
    meta = pq.ParquetFile(path).metadata
    column = meta.row_group(1).column(0)
    start = column.dictionary_page_offset if column.has_dictionary_page else column.data_page_offset
    data = bytearray(path.read_bytes())
    data[start + 8 : start + column.total_compressed_size - 8] = os.urandom(column.total_compressed_size - 16)
    path.write_bytes(bytes(data))
    return 20


def build_inputs(folder: Path, web) -> dict:
    """Write the files; return what must happen to them."""
    folder.mkdir()
    good = [
        {"url": web.url("/img0.jpg"), "caption": "a lighthouse on a cliff", "width": 640, "height": 560},
        {"url": web.url("/img1.jpg"), "caption": "a harbour at dawn", "width": 999_999, "height": 999_999},
    ]
    bad_values = [
        {"url": web.url("/img2.jpg"), "caption": "a boat with a huge declared width", "width": 1e999, "height": 560},
        {"url": web.url("/img3.jpg"), "caption": "a boat with a NaN-free absurd width", "width": 1e15, "height": 560},
        {"url": web.url("/img4.jpg") + "?" + "q" * 5000, "caption": "a very long url", "width": 640, "height": 560},
        {"url": web.url("/img5.jpg"), "caption": "word " * 1000, "width": 640, "height": 560},
        {"url": web.url("/img6.jpg"), "caption": "a caption with a NUL\x00 inside", "width": 640, "height": 560},
        {"url": web.url("/img7.jpg"), "caption": "a caption with a bell \x07 inside", "width": 640, "height": 560},
    ]
    pq.write_table(pa.Table.from_pylist(good + bad_values), folder / "a_values.parquet")

    readable_rows = _corrupt_parquet(folder / "b_corrupt_pages.parquet", web)

    deep = "[" * 100_000 + "]" * 100_000
    (folder / "c_deep.jsonl").write_text(
        "\n".join([json.dumps({"url": web.url("/d0.jpg"), "caption": "x", "width": 1, "height": 1}), deep,
                   json.dumps({"url": web.url("/d1.jpg"), "caption": "y"})]) + "\n"
    )

    (folder / "d_bigfield.csv").write_text(
        "url,caption,width,height\n" + f"{web.url('/e0.jpg')},{'z' * 200_000},1,1\n"
        + f"{web.url('/e1.jpg')},fine caption,1,1\n"
    )

    lines = "".join(json.dumps({"url": web.url(f"/t{i}.jpg"), "caption": f"cut {i}", "width": 1, "height": 1}) + "\n" for i in range(2000))
    packed = gzip.compress(lines.encode())
    (folder / "e_truncated.jsonl.gz").write_bytes(packed[: len(packed) // 2])

    return {"readable_rows_of_corrupt": readable_rows}


def test_every_broken_file_and_value_is_reported_and_the_run_finishes(tmp_path, web, capsys):
    expected = build_inputs(tmp_path / "in", web)
    out = tmp_path / "out"
    config = tmp_path / "config.yaml"
    config.write_text("read: {width_col: width, height_col: height}\ncrawl: {timeout_s: 1.0}\n")
    code = main(["run", "curate", "--input", str(tmp_path / "in" / "*"), "--output", str(out),
                 "--config", str(config), "--allow-private-network"])
    captured = capsys.readouterr()
    assert code == runs.EXIT_INPUT_ERRORS
    assert "Traceback" not in captured.err

    report = json.loads((out / "report.json").read_text())
    errors = {Path(e["path"]).name: e for e in report["input_errors"]}
    assert set(errors) == {"b_corrupt_pages.parquet", "e_truncated.jsonl.gz"}
    assert errors["b_corrupt_pages.parquet"]["rows_read"] == expected["readable_rows_of_corrupt"]
    # The gzip stream was cut in half: some rows were read, not all 2000, and none silently.
    assert 0 < errors["e_truncated.jsonl.gz"]["rows_read"] < 2000
    assert "EOFError" in errors["e_truncated.jsonl.gz"]["error"]
    for name in errors:
        assert name in captured.err

    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    reasons = {(Path(r["source_file"]).name, r["source_row"]): r["reason"] for r in rejects}
    assert reasons[("a_values.parquet", 2)] == "invalid_declared_size"
    assert reasons[("a_values.parquet", 3)] == "invalid_declared_size"
    assert reasons[("a_values.parquet", 4)] == "url_too_long"
    assert reasons[("a_values.parquet", 5)] == "caption_too_long"
    assert reasons[("a_values.parquet", 6)] == "control_characters"
    assert reasons[("a_values.parquet", 7)] == "control_characters"
    assert reasons[("c_deep.jsonl", 1)] == "unparseable_row"
    assert reasons[("d_bigfield.csv", 0)] == "unparseable_row"
    # Reject rows stay bounded: the long URL is cut to the limit.
    assert max(len(r["url"]) for r in rejects) <= 4096

    index = pq.read_table(out / "index.parquet").to_pylist()
    assert {r["url"] for r in index} == {web.url("/img0.jpg"), web.url("/img1.jpg")}
    assert [r["declared_width"] for r in sorted(index, key=lambda r: r["url"])] == [640, 999_999]

    # Accounting: rows read (input_rows) = kept + rejected; the unread tails are not rows.
    total_rows = 8 + expected["readable_rows_of_corrupt"] + 3 + 2 + errors["e_truncated.jsonl.gz"]["rows_read"]
    assert report["input_rows"] == total_rows == report["kept"] + report["rejected"]
    assert not list(out.glob("_staging*")) and not list((out / "shards").glob(".tmp*"))
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


def _tiny_input(tmp_path: Path, web) -> str:
    path = tmp_path / "urls.parquet"
    pq.write_table(pa.Table.from_pylist([{"url": web.url("/img0.jpg"), "caption": "a lighthouse on a cliff"}]), path)
    return str(path)


def test_a_mistyped_option_is_refused_before_any_work(tmp_path, web, capsys):
    code = main(["run", "curate", "--input", _tiny_input(tmp_path, web), "--output", str(tmp_path / "out"),
                 "--allow-private-network", "--resmue", "--direct_num_workers=1"])
    err = capsys.readouterr().err
    assert code == runs.EXIT_REFUSED
    assert "--resmue" in err and "--direct_num_workers" not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_an_unwritable_output_is_one_line(tmp_path, web, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code = main(["run", "curate", "--input", _tiny_input(tmp_path, web), "--output", str(blocker / "out"),
                 "--allow-private-network"])
    err = capsys.readouterr().err
    assert code == runs.EXIT_REFUSED
    assert str(blocker / "out") in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_used_output_folder_is_refused_then_overwritten(tmp_path, web, capsys):
    urls = _tiny_input(tmp_path, web)
    out = tmp_path / "out"
    argv = ["run", "curate", "--input", urls, "--output", str(out), "--allow-private-network"]
    assert main(argv) == runs.EXIT_OK
    first_run = json.loads((out / "run.json").read_text())["run_id"]
    # Something of the user's beside the outputs, and a leftover of an earlier run.
    (out / "notes.txt").write_text("mine")
    (out / "shards" / "000099.tar").write_bytes(b"an earlier, larger run's shard")
    capsys.readouterr()

    assert main(argv) == runs.EXIT_REFUSED
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err
    assert json.loads((out / "run.json").read_text())["run_id"] == first_run

    assert main([*argv, "--overwrite"]) == runs.EXIT_OK
    assert json.loads((out / "run.json").read_text())["run_id"] != first_run
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["000000.json", "000000.tar"]
    assert (out / "notes.txt").read_text() == "mine"


def test_overwrite_never_deletes_from_a_folder_that_is_not_an_output(tmp_path, web, capsys):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"precious")
    code = main(["run", "curate", "--input", _tiny_input(tmp_path, web), "--output", str(out),
                 "--allow-private-network", "--overwrite"])
    assert code == runs.EXIT_REFUSED
    assert "not an imagemill output" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["holiday.jpg"]


def test_a_failing_run_is_one_line_and_status_4_with_the_traceback_under_verbose(tmp_path, web, capsys, monkeypatch):
    import pipelines.outputs

    def broken(*args, **kwargs):
        raise OSError("disk on fire")

    monkeypatch.setattr(pipelines.outputs, "read_report", broken)
    argv = ["run", "curate", "--input", _tiny_input(tmp_path, web), "--output", str(tmp_path / "out"),
            "--allow-private-network"]
    assert main(argv) == runs.EXIT_FAILED
    err = capsys.readouterr().err
    assert "disk on fire" in err and "Traceback" not in err and "--verbose" in err
    assert main([*argv[:-1], "--output", str(tmp_path / "out2"), "--allow-private-network", "--verbose"]) == runs.EXIT_FAILED
    assert "Traceback" in capsys.readouterr().err

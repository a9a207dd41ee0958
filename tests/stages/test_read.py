import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas import ReadConfig, RejectReason
from stages.core.read import InputError, row_to_record
from stages.read import ReadUrlLists, check_input, iter_rows, match_inputs

ROWS = [{"url": "http://a/1.jpg", "caption": "one"}, {"url": "http://a/2.jpg", "caption": "two"}]


def write(path, fmt, rows=ROWS):
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif fmt in ("csv", "tsv"):
        sep = "," if fmt == "csv" else "\t"
        lines = [sep.join(rows[0])] + [sep.join(str(v) for v in r.values()) for r in rows]
        opener = gzip.open if str(path).endswith(".gz") else open
        with opener(path, "wt") as f:
            f.write("\n".join(lines) + "\n")
    else:
        opener = gzip.open if str(path).endswith(".gz") else open
        with opener(path, "wt") as f:
            f.write("\n".join(json.dumps(r) for r in rows) + "\n")


@pytest.mark.parametrize("name", ["in.parquet", "in.csv", "in.tsv", "in.jsonl", "in.jsonl.gz", "in.csv.gz"])
def test_every_format_streams_its_rows(tmp_path, name):
    path = tmp_path / name
    write(path, name.split(".")[1])
    check_input(str(path), ReadConfig())
    rows = list(iter_rows(str(path), ReadConfig()))
    assert [(i, r["url"], r["caption"]) for i, r, _ in rows] == [(0, "http://a/1.jpg", "one"), (1, "http://a/2.jpg", "two")]


def test_missing_column_is_an_error_naming_file_and_column(tmp_path):
    path = tmp_path / "in.parquet"
    write(path, "parquet", [{"link": "http://a", "caption": "x"}])
    with pytest.raises(InputError, match=r"in\.parquet.*'url'"):
        check_input(str(path), ReadConfig())
    check_input(str(path), ReadConfig(url_col="link"))


def test_unreadable_file_and_empty_glob_are_errors(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="bad.parquet"):
        check_input(str(bad), ReadConfig())
    with pytest.raises(InputError, match="no input file matches"):
        match_inputs(str(tmp_path / "nothing-*.csv"))
    with pytest.raises(InputError, match="cannot tell the format"):
        check_input(str(tmp_path / "x.txt"), ReadConfig())


def test_bad_rows_become_rejects_not_crashes(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"url": "http://a/1.jpg", "caption": "ok"}\nnot json\n{"url": null, "caption": "no url"}\n[1, 2]\n')
    results = [row_to_record(str(path), 3, i, item, err, ReadConfig()) for i, item, err in iter_rows(str(path), ReadConfig())]
    reasons = [drop.reason if drop else None for _, drop in results]
    assert reasons == [None, RejectReason.UNPARSEABLE_ROW, RejectReason.MISSING_URL, RejectReason.UNPARSEABLE_ROW]
    assert [r.key for r, _ in results] == ["00003000000000", "00003000000001", "00003000000002", "00003000000003"]


def test_declared_sizes_are_read_when_configured(tmp_path):
    path = tmp_path / "in.parquet"
    write(path, "parquet", [{"url": "http://a/1.jpg", "caption": "c", "WIDTH": 640, "HEIGHT": None}])
    config = ReadConfig(width_col="WIDTH", height_col="HEIGHT")
    [(i, item, err)] = list(iter_rows(str(path), config))
    record, drop = row_to_record(str(path), 0, i, item, err, config)
    assert drop is None and record.declared_width == 640 and record.declared_height is None


def test_glob_reads_files_in_sorted_order(tmp_path):
    write(tmp_path / "b.csv", "csv")
    write(tmp_path / "a.jsonl", "jsonl")
    transform = ReadUrlLists(str(tmp_path / "*"), ReadConfig())
    assert [p.rsplit("/", 1)[-1] for p in transform.paths] == ["a.jsonl", "b.csv"]

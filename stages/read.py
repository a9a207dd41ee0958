"""Read URL lists: parquet, csv, tsv or jsonl, optionally gzipped, from any
path Beam's FileSystems accept (local, gs://, s3://, ...).

Every input row becomes a `SampleRecord` or, if it is unusable, a rejection
(`missing_url`, `unparseable_row`, and the row bounds below): nothing is
dropped silently. Files are checked (readable, required columns present)
before any work starts.

Row bounds are in `stages/core/read.py`. A csv field over the csv module's limit (131,072 characters) or a
jsonl line nested too deeply to parse is an `unparseable_row`.

A file that cannot be read to its end (corrupt parquet pages, truncated
gzip/bz2/xz data, an I/O error mid-file) keeps the rows read before the
failure and becomes one `InputFileError` on the `input_errors` output, naming
the file and the number of rows read: the run goes on and reports it.

Keys are `FFFFFRRRRRRRRR`: the input file's ordinal in the sorted match list
(5 digits; an `--append` run's files are numbered after the dataset's earlier
ones) and the row number in that file (9 digits), so they are stable across
runs and sort in input order.
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import gzip
import io
import json
import lzma
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from schemas import InputFileError, ReadConfig, Stage
from stages.base import INPUT_ERRORS, REJECTS, StageMetrics, rejection
from stages.core.read import MAX_FILES, InputError, detect_format, required_columns, row_to_record


class UnreadableFile(Exception):
    """A file failed part-way through; `rows_read` rows before it were emitted."""

    def __init__(self, rows_read: int, error: BaseException):
        super().__init__(f"{type(error).__name__}: {error}")
        self.rows_read = rows_read


def match_inputs(pattern: str) -> list[str]:
    """Files matching `pattern` (a path or glob), sorted. Raises InputError if none."""
    try:
        results = FileSystems.match([pattern])
    except Exception as err:
        raise InputError(f"{pattern}: cannot list input files: {err}") from err
    paths = sorted(m.path for r in results for m in r.metadata_list)
    if not paths:
        raise InputError(f"{pattern}: no input file matches")
    if len(paths) > MAX_FILES:
        raise InputError(f"{pattern}: {len(paths)} files; at most {MAX_FILES} are supported in one run")
    return paths


# Python's own decompressors raise EOFError on a truncated stream, where Beam's
# CompressedFile stops quietly at the cut and the rest of the file would vanish.
_DECOMPRESSORS = {
    ".gz": lambda raw: gzip.GzipFile(fileobj=raw, mode="rb"),
    ".bz2": lambda raw: bz2.BZ2File(raw, mode="rb"),
    ".xz": lambda raw: lzma.LZMAFile(raw, mode="rb"),
    ".lzma": lambda raw: lzma.LZMAFile(raw, mode="rb"),
}


@contextlib.contextmanager
def _open_binary(path: str):
    opener = next((o for ext, o in _DECOMPRESSORS.items() if path.lower().endswith(ext)), None)
    if opener is None:
        # Uncompressed, or a compression only Beam knows (.deflate, .zst).
        with FileSystems.open(path, compression_type=CompressionTypes.AUTO) as f:
            yield f
        return
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as raw, opener(raw) as f:
        yield f


class _RawReader(io.RawIOBase):
    """Gives Beam's file objects (compressed ones included) the raw-IO surface
    that io.TextIOWrapper needs."""

    def __init__(self, f):
        self._f = f

    def readable(self):
        return True

    def readinto(self, buffer):
        data = self._f.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self):
        self._f.close()
        super().close()


@contextlib.contextmanager
def _text_stream(path: str):
    with _open_binary(path) as f:
        raw = io.BufferedReader(_RawReader(f), buffer_size=1 << 20)
        yield io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace", newline="")


def check_input(path: str, config: ReadConfig) -> None:
    """Open `path` and check that the configured columns exist. For jsonl, the
    first non-empty line is checked; later rows missing a column are rejected
    per row."""
    fmt = detect_format(path, config.format)
    wanted = required_columns(config)
    try:
        if fmt == "parquet":
            with _open_binary(path) as f:
                columns = pq.ParquetFile(f).schema_arrow.names
        elif fmt in ("csv", "tsv"):
            with _text_stream(path) as f:
                header = next(csv.reader(f, delimiter="," if fmt == "csv" else "\t"), None)
            if header is None:
                raise InputError(f"{path}: empty file, no header row")
            columns = header
        else:
            with _text_stream(path) as f:
                first = next((line for line in f if line.strip()), None)
            if first is None:
                columns = wanted  # an empty jsonl file has no rows to reject
            else:
                try:
                    columns = list(json.loads(first))
                except (json.JSONDecodeError, TypeError, RecursionError) as err:
                    raise InputError(f"{path}: first line is not a JSON object: {type(err).__name__}: {str(err)[:200]}") from err
    except InputError:
        raise
    except Exception as err:
        raise InputError(f"{path}: cannot read as {fmt}: {err}") from err
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise InputError(
            f"{path}: missing column(s) {missing}; found {list(columns)[:20]}. "
            "Set read.url_col / read.caption_col / read.width_col / read.height_col in the config."
        )


def iter_rows(path: str, config: ReadConfig) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
    """Yield (row number, row or None, error) for every row of `path`, streaming.

    Raises `UnreadableFile` when the file fails part-way; the rows yielded
    before that stand."""
    rows_read = 0
    try:
        for item in _iter_rows(path, config):
            yield item
            rows_read += 1
    except Exception as err:  # noqa: BLE001 - any failure of the file is reported, not raised
        raise UnreadableFile(rows_read, err) from err


def _iter_rows(path: str, config: ReadConfig) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
    fmt = detect_format(path, config.format)
    if fmt == "parquet":
        with _open_binary(path) as f:
            pf = pq.ParquetFile(f)
            row = 0
            # Row group by row group, so a corrupt group loses only itself and
            # what follows it, never the groups read before it.
            for group in range(pf.num_row_groups):
                for batch in pf.iter_batches(batch_size=8192, row_groups=[group], columns=required_columns(config)):
                    for item in batch.to_pylist():
                        yield row, item, ""
                        row += 1
    elif fmt in ("csv", "tsv"):
        with _text_stream(path) as f:
            reader = csv.reader(f, delimiter="," if fmt == "csv" else "\t")
            header = next(reader, [])
            row = 0
            while True:
                try:
                    values = next(reader)
                except StopIteration:
                    break
                except csv.Error as err:
                    # The reader has consumed the offending record and goes on after it.
                    yield row, None, f"csv: {err}"
                else:
                    if len(values) != len(header):
                        yield row, None, f"{len(values)} fields where the header has {len(header)}"
                    else:
                        yield row, dict(zip(header, values)), ""
                row += 1
    else:
        with _text_stream(path) as f:
            row = 0
            for line in f:
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                    if not isinstance(item, dict):
                        raise TypeError(f"expected an object, got {type(item).__name__}")
                    yield row, item, ""
                except (json.JSONDecodeError, TypeError) as err:
                    yield row, None, f"invalid JSON: {err}"
                except RecursionError:
                    yield row, None, "invalid JSON: nested too deeply to parse"
                row += 1


class ReadRowsDoFn(beam.DoFn):
    """(file ordinal, path) -> one SampleRecord per row; bad rows to `rejects`."""

    def __init__(self, config: ReadConfig):
        self.config = config
        self.metrics = StageMetrics(Stage.READ)
        self.input_errors = beam.metrics.Metrics.counter(Stage.READ.value, "input_errors")

    def process(self, element: tuple[int, str]):
        ordinal, path = element
        try:
            for row, item, error in iter_rows(path, self.config):
                record, drop = row_to_record(path, ordinal, row, item, error, self.config)
                if drop is None:
                    self.metrics.kept.inc()
                    yield record
                else:
                    self.metrics.dropped(drop.reason).inc()
                    yield beam.pvalue.TaggedOutput(REJECTS, rejection(record, Stage.READ, drop))
        except UnreadableFile as err:
            self.input_errors.inc()
            yield beam.pvalue.TaggedOutput(INPUT_ERRORS, InputFileError(path=path, rows_read=err.rows_read, error=str(err)[:1000]))


class ReadUrlLists(beam.PTransform):
    """Reads every file matching `pattern`; returns (records, rejects, input_errors).

    Files are matched and checked when the pipeline is built, so a typo or a
    missing column fails before any work starts.
    """

    def __init__(self, pattern: str, config: ReadConfig, first_ordinal: int = 0):
        super().__init__()
        self.paths = match_inputs(pattern)
        if first_ordinal + len(self.paths) > MAX_FILES:
            raise InputError(f"{pattern}: with the dataset's earlier inputs, over {MAX_FILES} input files")
        for path in self.paths:
            check_input(path, config)
        self.config = config
        # An --append run numbers its files after the dataset's earlier inputs, so keys stay unique.
        self.first_ordinal = first_ordinal

    def expand(self, pbegin):
        outputs = (
            pbegin
            | "Files" >> beam.Create(list(enumerate(self.paths, start=self.first_ordinal)))
            | "Rows" >> beam.ParDo(ReadRowsDoFn(self.config)).with_outputs(REJECTS, INPUT_ERRORS, main="records")
        )
        return outputs.records, outputs[REJECTS], outputs[INPUT_ERRORS]


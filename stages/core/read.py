"""Reading URL lists, the plain-Python part: stable keys, format detection,
required columns and one input row -> `SampleRecord` or the `Drop` that says why
not (`missing_url`, `unparseable_row`). `stages/read.py` opens the files through
Beam's FileSystems and is the Beam adapter.

Keys are `FFFFFRRRRRRRRR`: the input file's ordinal in the sorted match list
(5 digits) and the row number in that file (9 digits), so they are stable
across runs and sort in input order.
"""

from __future__ import annotations

import functools
import importlib.metadata
from typing import Any

from schemas import Provenance, ReadConfig, RejectReason, SampleRecord
from stages.core.verdict import Drop

@functools.cache
def pipeline_version() -> str | None:
    """The installed imagemill's version (package metadata), which every record's
    `provenance.pipeline_version` carries; None when the code runs from a source tree
    that was never installed (`pip install -e .` fixes that)."""
    try:
        return importlib.metadata.version("imagemill")
    except importlib.metadata.PackageNotFoundError:
        return None


MAX_FILES = 10**5
MAX_ROWS_PER_FILE = 10**9


class InputError(ValueError):
    """An input file that cannot be used; raised before the pipeline starts."""


def make_key(file_ordinal: int, row: int) -> str:
    if file_ordinal >= MAX_FILES or row >= MAX_ROWS_PER_FILE:
        raise InputError(f"key space exhausted: file #{file_ordinal}, row {row} (max {MAX_FILES} files of {MAX_ROWS_PER_FILE} rows)")
    return f"{file_ordinal:05d}{row:09d}"


def detect_format(path: str, configured: str) -> str:
    if configured != "auto":
        return configured
    name = path.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for ext, fmt in ((".parquet", "parquet"), (".csv", "csv"), (".tsv", "tsv"), (".jsonl", "jsonl"), (".json", "jsonl")):
        if name.endswith(ext):
            return fmt
    raise InputError(f"{path}: cannot tell the format from the extension; set read.format to parquet, csv, tsv or jsonl")


def required_columns(config: ReadConfig) -> list[str]:
    cols = [config.url_col, config.caption_col]
    cols += [c for c in (config.width_col, config.height_col) if c]
    return cols


def _as_int(value: Any) -> int | None:
    if value is None or value == "":
        return None
    try:
        number = int(float(value))
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


def row_to_record(path: str, ordinal: int, row: int, item: dict[str, Any] | None, error: str, config: ReadConfig):
    """Build the record for one input row, or the Drop that explains why not."""
    provenance = Provenance(source_file=path, source_row=row, pipeline_version=pipeline_version())
    key = make_key(ordinal, row)
    if item is None:
        placeholder = SampleRecord(key=key, url="", caption_original="", provenance=provenance)
        return placeholder, Drop(RejectReason.UNPARSEABLE_ROW, error)
    url = item.get(config.url_col)
    caption = item.get(config.caption_col)
    record = SampleRecord(
        key=key,
        url="" if url is None else str(url),
        caption_original="" if caption is None else str(caption),
        declared_width=_as_int(item.get(config.width_col)) if config.width_col else None,
        declared_height=_as_int(item.get(config.height_col)) if config.height_col else None,
        provenance=provenance,
    )
    if not record.url.strip():
        return record, Drop(RejectReason.MISSING_URL, f"empty {config.url_col!r}")
    return record, None

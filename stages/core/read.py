"""Reading URL lists, the plain-Python part: stable keys, format detection,
required columns and one input row -> `SampleRecord` or the `Drop` that says why
not. `stages/read.py` opens the files through Beam's FileSystems and is the
Beam adapter.

Row bounds (rejected at the read stage, before any fetch): `missing_url`,
`unparseable_row`, `url_too_long` (over `read.max_url_chars`),
`caption_too_long` (over `read.max_caption_chars`), `control_characters` (NUL
or another C0/C1 control character in the caption; tab and newlines are
allowed), `invalid_declared_size` (a declared width or height that is
infinite, NaN or over `read.max_declared_side`). Missing, empty, zero,
negative or non-numeric declared sizes stay "not declared".

Keys are `FFFFFRRRRRRRRR`: the input file's ordinal in the sorted match list
(5 digits) and the row number in that file (9 digits), so they are stable
across runs and sort in input order.
"""

from __future__ import annotations

import functools
import importlib.metadata
import math
from typing import Any

from pydantic import ValidationError

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


class _BadNumber(ValueError):
    pass


def _declared_side(value: Any, limit: int) -> int | None:
    """A declared width/height: None when absent or not a positive number;
    `_BadNumber` when it is infinite, NaN or over `limit`."""
    if value is None or value == "" or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(number):
        raise _BadNumber(f"{value!r} is not finite")
    if number > limit:
        raise _BadNumber(f"{value!r} is over {limit}")
    number = int(number)
    return number if number > 0 else None


def _has_control_characters(text: str) -> bool:
    return any((ord(c) < 32 and c not in "\t\n\r") or 127 <= ord(c) < 160 for c in text)


def row_to_record(path: str, ordinal: int, row: int, item: dict[str, Any] | None, error: str, config: ReadConfig):
    """Build the record for one input row, or the Drop that explains why not."""
    provenance = Provenance(source_file=path, source_row=row, pipeline_version=pipeline_version())
    key = make_key(ordinal, row)
    placeholder = SampleRecord(key=key, url="", caption_original="", provenance=provenance)
    if item is None:
        return placeholder, Drop(RejectReason.UNPARSEABLE_ROW, error)
    url = item.get(config.url_col)
    caption = item.get(config.caption_col)
    url = "" if url is None else str(url)
    caption = "" if caption is None else str(caption)
    if len(url) > config.max_url_chars:
        # Keep the reject row bounded too: the URL is cut in the rejects table.
        placeholder.url = url[: config.max_url_chars]
        return placeholder, Drop(RejectReason.URL_TOO_LONG, f"{len(url)} characters, over {config.max_url_chars}")
    sizes = {}
    for field, column in (("declared_width", config.width_col), ("declared_height", config.height_col)):
        try:
            sizes[field] = _declared_side(item.get(column), config.max_declared_side) if column else None
        except _BadNumber as err:
            placeholder.url = url
            return placeholder, Drop(RejectReason.INVALID_DECLARED_SIZE, f"{column}: {err}")
    try:
        record = SampleRecord(key=key, url=url, caption_original=caption, provenance=provenance, **sizes)
    except ValidationError as err:
        placeholder.url = url
        return placeholder, Drop(RejectReason.UNPARSEABLE_ROW, f"invalid value: {err.errors()[0]['msg']}")
    if len(caption) > config.max_caption_chars:
        record.caption_original = caption[: config.max_caption_chars]
        return record, Drop(RejectReason.CAPTION_TOO_LONG, f"{len(caption)} characters, over {config.max_caption_chars}")
    if _has_control_characters(caption):
        return record, Drop(RejectReason.CONTROL_CHARACTERS, f"caption holds control characters: {caption[:80]!r}")
    if not record.url.strip():
        return record, Drop(RejectReason.MISSING_URL, f"empty {config.url_col!r}")
    return record, None

"""Evaluation sets to decontaminate against (`dedup.eval_sets`), without Beam.

An entry is `PATH` or `NAME=PATH` (the name defaults to PATH's base name
without extension). PATH is one of

* a folder: every image file under it (jpg, jpeg, png, webp, bmp, gif), the
  item id being its path relative to the folder;
* a WebDataset `.tar`: one item per sample with an image member, the item id
  being the sample key;
* a `.parquet` file: one item per row, the image bytes in the column
  `image` (bytes, or a struct with `bytes` as Hugging Face datasets write it),
  `jpg`, `png` or `webp`; the item id is the `key`, `id` or `__key__` column
  when there is one, else the row number.

Items are listed on the launcher (`list_items`: names and positions only, so
the size of each set is known before the pipeline runs) and read on the
workers (`read_item`).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

from stages.core.tario import index_tar, read_range

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
PARQUET_IMAGE_COLUMNS = ("image", "jpg", "png", "webp")
PARQUET_ID_COLUMNS = ("key", "id", "__key__")


class EvalSetError(ValueError):
    """An evaluation set cannot be read; raised before the pipeline starts."""


class EvalItem(NamedTuple):
    """Where one evaluation image is: `kind` file / tar / parquet; `where` the
    member name (tar) or row number (parquet)."""

    set_name: str
    item: str
    kind: str
    path: str
    where: str


def parse_spec(spec: str) -> tuple[str, str]:
    """`NAME=PATH` or `PATH` -> (name, path)."""
    name, sep, path = spec.partition("=")
    if not sep or os.sep in name:
        path = spec
        name = os.path.splitext(os.path.basename(spec.rstrip("/")))[0]
    if not name or not path:
        raise EvalSetError(f"dedup.eval_sets entry {spec!r}: expected PATH or NAME=PATH")
    return name, path


def list_items(spec: str) -> list[EvalItem]:
    name, path = parse_spec(spec)
    if os.path.isdir(path):
        items = []
        for root, _, files in os.walk(path):
            for file in sorted(files):
                if file.lower().endswith(IMAGE_EXTENSIONS):
                    full = os.path.join(root, file)
                    items.append(EvalItem(name, os.path.relpath(full, path), "file", full, ""))
        items.sort()
    elif path.endswith(".tar"):
        items = _tar_items(name, path)
    elif path.endswith(".parquet"):
        items = _parquet_items(name, path)
    else:
        raise EvalSetError(f"dedup.eval_sets {spec!r}: {path} is not a folder, a .tar or a .parquet file")
    if not items:
        raise EvalSetError(f"dedup.eval_sets {spec!r}: no images found in {path}")
    return items


def _tar_items(name: str, path: str) -> list[EvalItem]:
    """One item per image member of a WebDataset tar (the one tar index,
    `stages/core/tario.py`); `where` is the member's byte range."""
    try:
        samples = index_tar(path)
    except OSError as err:
        raise EvalSetError(f"dedup.eval_sets: {path} is not a readable tar: {err}") from err
    items = []
    for sample in samples:
        for extension, (offset, size) in sample.members.items():
            if "." + extension in IMAGE_EXTENSIONS:
                items.append(EvalItem(name, sample.key, "tar", path, f"{offset}:{size}"))
    return items


def _parquet_items(name: str, path: str) -> list[EvalItem]:
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as err:
        raise EvalSetError(f"dedup.eval_sets: {path} is not a readable parquet file: {err}") from err
    image = next((c for c in PARQUET_IMAGE_COLUMNS if c in schema.names), None)
    if image is None:
        raise EvalSetError(f"dedup.eval_sets: {path} has no image column (one of {', '.join(PARQUET_IMAGE_COLUMNS)})")
    id_column = next((c for c in PARQUET_ID_COLUMNS if c in schema.names), None)
    if id_column is None:
        ids = [str(i) for i in range(pq.ParquetFile(path).metadata.num_rows)]
    else:
        ids = [str(v) for v in pq.read_table(path, columns=[id_column])[id_column].to_pylist()]
    return [EvalItem(name, item, "parquet", path, f"{row}:{image}") for row, item in enumerate(ids)]


def read_item(item: EvalItem) -> bytes:
    """The encoded image bytes of one item."""
    if item.kind == "file":
        with open(item.path, "rb") as f:
            return f.read()
    if item.kind == "tar":
        offset, size = (int(v) for v in item.where.split(":"))
        with open(item.path, "rb") as f:
            return read_range(f, offset, size, item.path)
    row, column = item.where.split(":", 1)
    import pyarrow.parquet as pq

    # Only the row group that holds the row: reading the whole image column per
    # item would make a large parquet eval set quadratic.
    parquet = pq.ParquetFile(item.path)
    index = int(row)
    for group in range(parquet.num_row_groups):
        rows_in_group = parquet.metadata.row_group(group).num_rows
        if index < rows_in_group:
            break
        index -= rows_in_group
    value = parquet.read_row_group(group, columns=[column])[column][index].as_py()
    if isinstance(value, dict):
        value = value.get("bytes")
    if not isinstance(value, (bytes, bytearray)):
        raise EvalSetError(f"{item.path} row {row}: column {column} holds no image bytes")
    return bytes(value)


def nearest_hash(phash: int, hashes: np.ndarray) -> tuple[int, int]:
    """(index, Hamming distance) of the closest of `hashes` (uint64) to `phash`."""
    distances = np.bitwise_count(hashes ^ np.uint64(phash))
    best = int(np.argmin(distances))
    return best, int(distances[best])

"""CLIP embeddings written beside the shards, for kNN indices and semantic dedup.

Layout (what autofaiss's `build_index --embeddings` and clip-retrieval's
`index` step read; clip-retrieval's own `inference` writes the same files):

    DIR/embeddings/img_emb_NNNN.npy         float16 [rows, D], L2-normalised image embeddings
    DIR/embeddings/metadata_NNNN.parquet    key, url, caption, shard, clip_similarity, pixels
                                            (row i describes row i of img_emb_NNNN.npy)
    DIR/embeddings/text_emb/text_emb_NNNN.npy   the captions' embeddings, same rows
                                            (with `embeddings.text`; in a subfolder so the
                                            image folder holds only image .npy files)

Only samples that reached a shard are written (the rows of `index.parquet`);
`caption` is the one in KEY.txt. `NNNN` is a partition of the key space
(`embeddings.partitions`, CRC-32 of the key): a partition without kept
samples has no files, so numbers may skip. Rows are sorted by key.

How the embeddings get here: the CLIP step emits each sample's embedding once
on a side output (`EmbeddingRow`: key, rank fields, float16 bytes), never on the
record, so they do not ride through selection, recaption and the shard
shuffle. Here they meet the written records in one keyed shuffle per
partition, each partition holding about N / partitions rows. A file is
written under a temporary name beside its final one and renamed when
complete, as shards are: no partial file is ever visible under a final name.
"""

from __future__ import annotations

import io
import logging
import uuid
import zlib
from collections.abc import Iterator
from typing import NamedTuple

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from schemas import SampleRecord
from schemas.config import EmbeddingsConfig

LOG = logging.getLogger(__name__)

EMBEDDINGS_DIR = "embeddings"
TEXT_DIR = "text_emb"
NAMESPACE = "embeddings"
DTYPE = np.float16
METADATA_COLUMNS = ("key", "url", "caption", "shard", "clip_similarity", "pixels")


class EmbeddingRow(NamedTuple):
    """One sample's embeddings as they travel (a plain tuple on the wire):
    `image` / `text` are float16 bytes of L2-normalised vectors (`text` empty
    when not kept)."""

    key: str
    clip_similarity: float | None
    pixels: int
    image: bytes
    text: bytes


def embedding_row(record: SampleRecord, image: np.ndarray, text: np.ndarray | None = None) -> tuple:
    """The EmbeddingRow tuple of a scored record (embeddings float32 [D])."""
    return (
        record.key,
        record.clip_similarity,
        record.pixels,
        np.asarray(image, dtype=DTYPE).tobytes(),
        b"" if text is None else np.asarray(text, dtype=DTYPE).tobytes(),
    )


def vectors(blobs: list[bytes]) -> np.ndarray:
    """float16 bytes -> [N, D] float16 array."""
    if not blobs:
        return np.zeros((0, 0), dtype=DTYPE)
    return np.frombuffer(b"".join(blobs), dtype=DTYPE).reshape(len(blobs), -1)


def partition_of(key: str, partitions: int) -> int:
    return zlib.crc32(key.encode()) % partitions


def file_name(prefix: str, partition: int, suffix: str) -> str:
    return f"{prefix}_{partition:04d}.{suffix}"


def write_atomically(path: str, data: bytes) -> None:
    """Write `data` under a temporary name beside `path`, then rename."""
    tmp = f"{path}.{uuid.uuid4().hex}.partial"
    with FileSystems.create(tmp, compression_type="uncompressed") as f:
        f.write(data)
    FileSystems.rename([tmp], [path])


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _parquet_bytes(columns: dict[str, list]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("key", pa.string()),
            ("url", pa.string()),
            ("caption", pa.string()),
            ("shard", pa.string()),
            ("clip_similarity", pa.float64()),
            ("pixels", pa.int64()),
        ]
    )
    buffer = io.BytesIO()
    pq.write_table(pa.table(columns, schema=schema), buffer)
    return buffer.getvalue()


def _written_row(record: SampleRecord) -> tuple:
    return (record.key, record.url, record.caption or record.caption_original, record.shard)


class WritePartitionDoFn(beam.DoFn):
    """(partition, [("written", meta) | ("embedding", EmbeddingRow)]) -> the
    number of rows written. A written record without an embedding is an error
    with `require_all` (in curate every scored sample has one), else counted
    (`written_without_embedding`: `beam run select` re-admitting samples from
    `unselected/`, whose embeddings were not kept); embeddings of samples that
    were not written (dropped later) are skipped."""

    def __init__(self, output_dir: str, text: bool, require_all: bool = True):
        self.output_dir = output_dir
        self.text = text
        self.require_all = require_all
        self.rows = Metrics.counter(NAMESPACE, "rows_written")
        self.files = Metrics.counter(NAMESPACE, "files_written")
        self.missing = Metrics.counter(NAMESPACE, "written_without_embedding")

    def process(self, element) -> Iterator[int]:
        partition, tagged = element
        written: dict[str, tuple] = {}
        rows: dict[str, tuple] = {}
        for tag, value in tagged:
            (written if tag == "written" else rows)[value[0]] = value
        if not written:
            return
        missing = sorted(set(written) - set(rows))
        if missing and self.require_all:
            raise ValueError(f"embeddings: written samples without an embedding: {missing[:5]}")
        self.missing.inc(len(missing))
        keys = sorted(set(written) & set(rows))
        if not keys:
            return
        image = vectors([rows[k][3] for k in keys])
        folder = FileSystems.join(self.output_dir, EMBEDDINGS_DIR)
        metadata = {
            "key": keys,
            "url": [written[k][1] for k in keys],
            "caption": [written[k][2] for k in keys],
            "shard": [written[k][3] for k in keys],
            "clip_similarity": [rows[k][1] for k in keys],
            "pixels": [rows[k][2] for k in keys],
        }
        if self.text:
            text = vectors([rows[k][4] for k in keys])
            if text.shape != image.shape:
                raise ValueError(f"embeddings: partition {partition} lacks text embeddings; was embeddings.text on?")
            write_atomically(FileSystems.join(folder, TEXT_DIR, file_name("text_emb", partition, "npy")), _npy_bytes(text))
        # The metadata first, the embeddings last: a reader that finds img_emb_NNNN.npy finds its metadata.
        write_atomically(FileSystems.join(folder, file_name("metadata", partition, "parquet")), _parquet_bytes(metadata))
        write_atomically(FileSystems.join(folder, file_name("img_emb", partition, "npy")), _npy_bytes(image))
        self.rows.inc(len(keys))
        self.files.inc()
        yield len(keys)


class WriteEmbeddings(beam.PTransform):
    """(written records, EmbeddingRows) -> PCollection of row counts, one per
    file written. See the module docstring for the layout."""

    def __init__(self, output_dir: str, config: EmbeddingsConfig, require_all: bool = True):
        super().__init__()
        self.output_dir = output_dir
        self.config = config
        self.require_all = require_all

    def expand(self, inputs):
        written, rows = inputs
        partitions = self.config.partitions
        by_partition = (
            (
                written
                | "WrittenByPartition"
                >> beam.Map(lambda r: (partition_of(r.key, partitions), ("written", _written_row(r)))),
                rows | "RowsByPartition" >> beam.Map(lambda t: (partition_of(t[0], partitions), ("embedding", t))),
            )
            | "Flatten" >> beam.Flatten()
            | "GroupByPartition" >> beam.GroupByKey()
        )
        return by_partition | "Write" >> beam.ParDo(
            WritePartitionDoFn(self.output_dir, self.config.text, self.require_all)
        )


# ---------------------------------------------------------------- reading them back


def has_embeddings(output_dir: str) -> bool:
    return bool(embedding_files(output_dir))


def has_text_embeddings(output_dir: str) -> bool:
    folder = FileSystems.join(output_dir, EMBEDDINGS_DIR, TEXT_DIR)
    return bool(FileSystems.match([FileSystems.join(folder, "text_emb_*.npy")])[0].metadata_list)


def embedding_files(output_dir: str) -> list[tuple[str, str]]:
    """(img_emb path, metadata path) pairs of an output, by partition number."""
    folder = FileSystems.join(output_dir, EMBEDDINGS_DIR)
    found = FileSystems.match([FileSystems.join(folder, "img_emb_*.npy")])[0].metadata_list
    pairs = []
    for meta in sorted(found, key=lambda m: m.path):
        number = meta.path.rsplit("img_emb_", 1)[1][: -len(".npy")]
        pairs.append((meta.path, FileSystems.join(folder, f"metadata_{number}.parquet")))
    return pairs


def read_embedding_file(paths: tuple[str, str]) -> Iterator[tuple]:
    """(img_emb path, metadata path) -> EmbeddingRow tuples (with the text
    embeddings when text_emb/ holds the matching file)."""
    import pyarrow.parquet as pq

    npy_path, parquet_path = paths
    with FileSystems.open(npy_path, compression_type="uncompressed") as f:
        image = np.load(io.BytesIO(f.read()), allow_pickle=False)
    with FileSystems.open(parquet_path, compression_type="uncompressed") as f:
        table = pq.read_table(io.BytesIO(f.read()), columns=["key", "clip_similarity", "pixels"])
    if table.num_rows != len(image):
        raise ValueError(f"{npy_path} has {len(image)} rows but {parquet_path} has {table.num_rows}")
    image = image.astype(DTYPE, copy=False)
    folder, name = npy_path.rsplit("/", 1)
    text_path = FileSystems.join(folder, TEXT_DIR, name.replace("img_emb_", "text_emb_", 1))
    text = None
    if FileSystems.exists(text_path):
        with FileSystems.open(text_path, compression_type="uncompressed") as f:
            text = np.load(io.BytesIO(f.read()), allow_pickle=False).astype(DTYPE, copy=False)
    columns = table.to_pydict()
    for i, key in enumerate(columns["key"]):
        text_bytes = b"" if text is None else text[i].tobytes()
        yield (key, columns["clip_similarity"][i], int(columns["pixels"][i] or 0), image[i].tobytes(), text_bytes)


class ReadEmbeddings(beam.PTransform):
    """An output folder's DIR/embeddings -> EmbeddingRow tuples (no model needed)."""

    def __init__(self, output_dir: str):
        super().__init__()
        self.output_dir = output_dir

    def expand(self, pbegin):
        return (
            pbegin
            | "Files" >> beam.Create(embedding_files(self.output_dir))
            | "Spread" >> beam.Reshuffle()
            | "Read" >> beam.FlatMap(read_embedding_file)
        )

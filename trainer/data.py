"""Training data: curated WebDataset shards or a latent cache, streamed so resume is exact.

The order (which worker of which rank reads which rows of which file, and how a resumed
run skips to its position without reading) is `trainer/stream.py`'s; this module reads
what it names.

Samples are read by random access, from any fsspec URL (local paths, `gs://`, `s3://`,
`https://`): cache files by byte range through their safetensors header (one ranged read
per tensor row), tar shards through the one tar index (`stages/core/tario.py`: member
offsets from the headers; webdataset's sequential readers cannot seek, which is why they
are not used here). Transient read errors are retried. Memory per worker: one batch plus
the indices.

What "position" means for a remote file: nothing about a stream is saved. A sample is
(file index in the list, row in the file), located by the file's own header (safetensors)
or tar index, so a resumed run reads the same rows from the same objects by range,
whatever the storage.

Files that cannot be read: a truncated shard contributes the samples before the cut (the
rest are reported as lost, by name; the shard manifest `NNNNNN.json` beside it says how
many it had). A cache file that is missing at start or fails during the run (vanished,
unreadable after retries) is reported by name with its sample count, and its rows are
replaced by the same rows of the next readable file in the manifest's order: the stream
itself never changes, so resume stays exact (as long as the files are in the same state
over the remaining steps). `fit` refuses to start only when no file is readable.
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from pydantic import ValidationError
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from schemas.records import SampleRecord, ShardManifest
from schemas.trainer import LatentCacheManifest
from stages.core.tario import (
    OpenFiles,
    RangeReader,
    TarSample,
    TruncatedTarError,
    open_for_index,
    open_url,
    read_range,
    scan_tar,
    with_retries,
)

from trainer.buckets import load_rgb
from trainer.stream import StreamDataset

logger = logging.getLogger(__name__)

# Tensor names inside a cache file.
LATENTS = "latents"
HAS_SYNTHETIC = "has_synthetic"
ORIGINAL_SIZE = "original_size"  # (N, 2) int32 (h, w) of the source image
CROP_TOP_LEFT = "crop_top_left"  # (N, 2) int32 (top, left) of the crop in the resized image
TARGET_SIZE = "target_size"  # (N, 2) int32 (h, w) of the bucket
MICRO_KEYS = (ORIGINAL_SIZE, CROP_TOP_LEFT, TARGET_SIZE)


def text_key(kind: str) -> str:
    return f"text.{kind}"


def pooled_key(kind: str) -> str:
    return f"pooled.{kind}"


def join_url(base: str, name: str) -> str:
    """`base/name` for a local path or a URL (pathlib would collapse `s3://` to `s3:/`)."""
    return base.rstrip("/") + "/" + name


def url_fs(url: str):
    """(fsspec file system, path in it) for a local path or URL."""
    from fsspec.core import url_to_fs

    return url_to_fs(url)


def expand_shards(spec: str) -> list[str]:
    """Brace-expand a shard spec ('DIR/shards/{000000..000099}.tar', or 's3://bucket/...');
    every file must exist."""
    from braceexpand import braceexpand

    paths = [p for p in braceexpand(spec) if p]
    if not paths:
        raise ValueError(f"shard spec {spec!r} names no files")
    fs, _ = url_fs(paths[0])
    missing = [p for p in paths if not fs.isfile(url_fs(p)[1])]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of the {len(paths)} shards named by {spec!r} do not exist (first: {missing[0]}); "
            "check the path and the brace range"
        )
    return paths


# ---- tar shards ----------------------------------------------------------------------------


def index_tar(path: str) -> list[TarSample]:
    """The samples of a complete WebDataset tar (any fsspec URL) that have an image, in file
    order, with each member's data offset (the one tar index, `stages.core.tario`).
    Samples without an image are left out and logged; a truncated tar raises."""
    with open_for_index(path) as handle:
        found = scan_tar(handle, path)
    if found.truncated:
        raise TruncatedTarError(f"{path}: truncated tar ({found.detail})")
    return _with_images(found.samples, path)


def _with_images(samples: list[TarSample], path: str) -> list[TarSample]:
    kept = [s for s in samples if s.image_extension is not None]
    if len(kept) < len(samples):
        logger.warning("%s: %d sample(s) without an image member skipped", path, len(samples) - len(kept))
    return kept


def manifest_samples(shard: str) -> int | None:
    """How many samples the shard's manifest (`NNNNNN.json` beside `NNNNNN.tar`) says it
    holds; None without a readable manifest."""
    if not shard.endswith(".tar"):
        return None
    try:
        with open_url(shard[:-4] + ".json") as handle:
            return ShardManifest.model_validate_json(handle.read()).num_samples
    except Exception:  # no manifest (not a curated shard) or unreadable: the count is unknown
        return None


def lost_text(lost: int | None) -> str:
    return f"{lost} sample(s) lost" if lost is not None else "an unknown number of samples lost (no shard manifest)"


def read_member(handle, offset: int, size: int) -> bytes:
    return read_range(handle, offset, size)


def captions_of(sample: TarSample, read: Callable[[str], bytes], where: str) -> tuple[str, str | None]:
    """(original, synthetic or None) from KEY.json (a SampleRecord); KEY.txt if the record is missing."""
    if "json" in sample.members:
        try:
            record = SampleRecord.model_validate_json(read("json"))
            return record.caption_original, record.caption_synthetic
        except ValidationError as error:
            logger.warning("%s: KEY.json of %s is not a SampleRecord (%s); using KEY.txt", where, sample.key, error.error_count())
    if "txt" in sample.members:
        return read("txt").decode("utf-8").strip(), None
    return "", None


class SafetensorsRows:
    """Rows of the tensors of one safetensors file, read by byte range (any fsspec URL).

    The file starts with an 8-byte little-endian header length and a JSON header giving
    each tensor's dtype, shape and data offsets; row r of a tensor of shape (N, ...) is
    one contiguous range, so a row costs one ranged read and nothing else is fetched.
    """

    DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "BOOL": torch.bool, "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8}

    def __init__(self, url: str, handle):
        self.url = url
        (length,) = struct.unpack("<Q", read_range(handle, 0, 8, url))
        header = json.loads(read_range(handle, 8, length, url))
        header.pop("__metadata__", None)
        self.data_start = 8 + length
        self.tensors = {name: (self.DTYPES[info["dtype"]], info["shape"], info["data_offsets"]) for name, info in header.items()}

    def row(self, handle, name: str, index: int) -> torch.Tensor:
        dtype, shape, (begin, end) = self.tensors[name]
        if not 0 <= index < shape[0]:
            raise IndexError(f"{self.url}: row {index} of {name} (shape {shape})")
        row_bytes = (end - begin) // shape[0]
        data = read_range(handle, self.data_start + begin + index * row_bytes, row_bytes, self.url)
        return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape[1:])


class CachedLatents(StreamDataset):
    """Batches from a latent cache: {"latents" (B, C, h, w), "text" (B, L, D), "pooled" (B, P)}
    in the cache's storage dtype, and with `micro` "micro" (B, 6) int32 (original h, w, crop
    top, left, target h, w in pixels: three more ranged reads per sample, so only when the
    model is size-conditioned); each sample's caption is the synthetic
    one with probability `synthetic_prob` (when the cache has both). A bucketed cache gives
    batches of one bucket each, of `batch_sizes[bucket]` samples (default `batch_size`). The
    cache may be on any fsspec URL; unreadable files are replaced (by files of the same
    bucket) as the module doc says."""

    def __init__(self, cache_dir: str, manifest: LatentCacheManifest, *, synthetic_prob: float, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, num_workers: int = 0, span: int = 4, start_batches: int = 0, unreadable: set[int] | None = None, batch_sizes: dict[tuple[int, int], int] | None = None, micro: bool = False):
        super().__init__(len(manifest.files), batch_size, seed, rank, world_size, num_workers, span, start_batches, "cache files")
        self.paths = [join_url(str(cache_dir), f.file) for f in manifest.files]
        self.sizes = [f.num_samples for f in manifest.files]
        kinds = {"original": ["original"], "synthetic": ["synthetic"], "both": ["original", "synthetic"]}[manifest.spec.captions]
        self.kinds = kinds
        self.micro = micro
        self.synthetic_prob = synthetic_prob if len(kinds) == 2 else (1.0 if kinds == ["synthetic"] else 0.0)
        self.unreadable: set[int] = set(unreadable or ())
        if len(self.unreadable) == len(self.paths):
            raise ValueError("no file of the latent cache is readable")
        self._files: OpenFiles | None = None
        self._headers: dict[int, SafetensorsRows] = {}
        buckets = [tuple(b) for b in manifest.spec.buckets or []]
        self.bucket_of_file = [buckets.index(tuple(f.bucket)) if buckets else 0 for f in manifest.files]
        self.bucket_sizes = [(batch_sizes or {}).get(b, batch_size) for b in buckets] if buckets else [batch_size]

    def bucket_plan(self) -> tuple[list[int], list[int]] | None:
        return (self.bucket_of_file, self.bucket_sizes) if len(self.bucket_sizes) > 1 else None

    def size_of(self, file: int) -> int:
        return self.sizes[file]

    def _read_row(self, file: int, row: int, kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        path = self.paths[file]

        def read():
            handle = self._files.get(path)
            if file not in self._headers:
                self._headers[file] = SafetensorsRows(path, handle)
            rows = self._headers[file]
            values = [rows.row(handle, LATENTS, row), rows.row(handle, text_key(kind), row), rows.row(handle, pooled_key(kind), row)]
            if self.micro:
                if ORIGINAL_SIZE not in rows.tensors:
                    raise KeyError(f"{path} has no size/crop conditions (an older cache): rebuild it with `trainer cache`")
                values.append(torch.cat([rows.row(handle, key, row) for key in MICRO_KEYS]))  # (6,)
            return values

        return with_retries(read, f"reading row {row} of {path}", on_retry=lambda: self._files.discard(path))

    def _substitute(self, file: int) -> int:
        """The next readable file of the same bucket after `file` in manifest order (cyclic)."""
        for step in range(1, len(self.paths) + 1):
            candidate = (file + step) % len(self.paths)
            if candidate not in self.unreadable and self.bucket_of_file[candidate] == self.bucket_of_file[file]:
                return candidate
        raise ValueError(f"no file of the latent cache is readable any more (in the bucket of {self.paths[file]})")

    def load_batch(self, rows, rng) -> dict:
        if self._files is None:
            self._files = OpenFiles(open_url)
        use_synthetic = rng.random(len(rows)) < self.synthetic_prob
        latents, text, pooled, micro = [], [], [], []
        for (_, file, row), synthetic in zip(rows, use_synthetic):
            kind = "synthetic" if synthetic else "original"
            while True:
                if file in self.unreadable:
                    file = self._substitute(file)
                    row = row % self.sizes[file]
                    continue
                try:
                    values = self._read_row(file, row, kind)
                    break
                except (OSError, ValueError, KeyError) as error:
                    self.unreadable.add(file)
                    self._files.discard(self.paths[file])
                    logger.error(
                        "cache file %s cannot be read (%s): its %d sample(s) are lost; their rows are replaced by rows of "
                        "the next readable file", self.paths[file], error, self.sizes[file],
                    )
            latents.append(values[0])
            text.append(values[1])
            pooled.append(values[2])
            micro.extend(values[3:])
        batch = {"latents": torch.stack(latents), "text": torch.stack(text), "pooled": torch.stack(pooled)}
        if self.micro:
            batch["micro"] = torch.stack(micro)
        return batch


def check_cache_files(cache_dir: str, manifest: LatentCacheManifest) -> set[int]:
    """Indices of the cache files that are missing or have the wrong size; each is logged
    by name with the samples it holds. Raises when none is usable."""
    fs, root = url_fs(str(cache_dir))
    unreadable = set()
    for i, entry in enumerate(manifest.files):
        path = join_url(root, entry.file)
        try:
            fs.info(path)
        except FileNotFoundError:
            unreadable.add(i)
            logger.error("cache file %s is missing: its %d sample(s) are lost; their rows are replaced by rows of the next readable file", join_url(str(cache_dir), entry.file), entry.num_samples)
    if len(unreadable) == len(manifest.files):
        raise FileNotFoundError(f"no file of the latent cache {cache_dir} exists; nothing to train on (rebuild it with `trainer cache`)")
    if unreadable:
        lost = sum(manifest.files[i].num_samples for i in unreadable)
        logger.error("latent cache %s: %d of %d files missing, %d of %d samples lost", cache_dir, len(unreadable), len(manifest.files), lost, manifest.num_samples)
    return unreadable


class RawShards(StreamDataset):
    """Batches decoded from curated shards: {"pixels" uint8 (B, 3, R, R), "input_ids" (B, L),
    "attention_mask" (B, L)}. An image that fails to decode is replaced by the next row of its
    shard (deterministically) and logged."""

    def __init__(self, paths: list[str], *, resolution: int, tokenizer, max_text_length: int, synthetic_prob: float, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, num_workers: int = 0, span: int = 4, start_batches: int = 0):
        super().__init__(len(paths), batch_size, seed, rank, world_size, num_workers, span, start_batches, "shards")
        self.paths = paths
        self.resolution = resolution
        self.tokenizer = tokenizer
        self.max_text_length = max_text_length
        self.synthetic_prob = synthetic_prob
        self._index: dict[int, list[TarSample]] = {}
        self._reader: RangeReader | None = None

    def samples(self, file: int) -> list[TarSample]:
        """The file's usable samples: all of them, the ones before the cut of a truncated
        shard, none of an unreadable one (each reported by name)."""
        if file not in self._index:
            path = self.paths[file]
            try:
                with open_for_index(path) as handle:
                    found = with_retries(lambda: scan_tar(handle, path), f"indexing {path}")
                samples = _with_images(found.samples, path)
                if found.truncated:
                    total = manifest_samples(path)
                    logger.error("%s is truncated (%s): %d usable, %s", path, found.detail, len(samples), lost_text(None if total is None else total - len(samples)))
            except (OSError, ValueError) as error:
                logger.error("%s cannot be read (%s): %s", path, error, lost_text(manifest_samples(path)))
                samples = []
            self._index[file] = samples
        return self._index[file]

    def size_of(self, file: int) -> int:
        return len(self.samples(file))

    def read_sample(self, file: int, row: int) -> tuple[np.ndarray, str, str | None]:
        if self._reader is None:
            self._reader = RangeReader(open_url)
        sample = self.samples(file)[row]
        path = self.paths[file]

        def read(extension: str) -> bytes:
            return self._reader.read(path, *sample.members[extension])

        pixels = load_rgb(read(sample.image_extension), self.resolution)
        original, synthetic = captions_of(sample, read, self.paths[file])
        return pixels, original, synthetic

    def read_decodable(self, file: int, row: int) -> tuple[np.ndarray, str, str | None]:
        # A sample that fails to decode is replaced by the next rows of the same shard, so the
        # stream itself (and with it the resume arithmetic) is untouched.
        size = self.size_of(file)
        for attempt in range(size):
            candidate = (row + attempt) % size
            try:
                return self.read_sample(file, candidate)
            except (OSError, ValueError, Image.DecompressionBombError) as error:
                logger.warning("%s row %d: cannot decode (%s); using the next row", self.paths[file], candidate, error)
        raise ValueError(f"{self.paths[file]}: no sample decodes")

    def load_batch(self, rows, rng) -> dict:
        pixels, captions = [], []
        use_synthetic = rng.random(len(rows)) < self.synthetic_prob
        for (_, file, row), synthetic_wanted in zip(rows, use_synthetic):
            image, original, synthetic = self.read_decodable(file, row)
            pixels.append(torch.from_numpy(image).permute(2, 0, 1))  # (3, R, R)
            captions.append(synthetic if synthetic_wanted and synthetic else original)
        tokens = self.tokenizer(captions, padding="max_length", max_length=self.max_text_length, truncation=True, return_tensors="pt")
        return {"pixels": torch.stack(pixels), "input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask}


class SyntheticLatents(IterableDataset):
    """Random cached-latent-shaped batches (for `trainer bench`): a pool of `pool` batches
    made once per worker and cycled, so the loader's cost is what a cache read costs
    after decoding (collation and transfer), not random-number generation."""

    def __init__(self, batch_size: int, latent_shape: tuple[int, int, int], text_shape: tuple[int, int], pooled_dim: int, dtype: torch.dtype = torch.bfloat16, pool: int = 4, seed: int = 0):
        self.batch_size = batch_size
        self.latent_shape = latent_shape
        self.text_shape = text_shape
        self.pooled_dim = pooled_dim
        self.dtype = dtype
        self.pool = pool
        self.seed = seed

    def __iter__(self):
        info = get_worker_info()
        generator = torch.Generator().manual_seed(self.seed + (info.id if info else 0))
        batches = [
            {
                "latents": torch.randn((self.batch_size, *self.latent_shape), generator=generator).to(self.dtype),
                "text": torch.randn((self.batch_size, *self.text_shape), generator=generator).to(self.dtype),
                "pooled": torch.randn((self.batch_size, self.pooled_dim), generator=generator).to(self.dtype),
            }
            for _ in range(self.pool)
        ]
        i = 0
        while True:
            # A fresh copy, as a real read would produce (and so pinning sees new memory).
            yield {k: v.clone() for k, v in batches[i % self.pool].items()}
            i += 1


def _worker_init(_: int) -> None:
    # Decoding is parallel across workers; threads inside each would only contend.
    torch.set_num_threads(1)


def make_loader(dataset: IterableDataset, num_workers: int, prefetch_factor: int, pin_memory: bool) -> DataLoader:
    """The DataLoader around a batch-yielding dataset (its batch_size is None)."""
    kwargs = {"prefetch_factor": prefetch_factor, "worker_init_fn": _worker_init} if num_workers > 0 else {}
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory, **kwargs)

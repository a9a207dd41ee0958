"""Training data: curated WebDataset shards or a latent cache, streamed so resume is exact.

The unit of splitting is a *file* (a shard `.tar`, or a cache `.safetensors` file). Every
epoch the file list is shuffled with the run seed; global data-loader worker
`g = rank * num_workers + worker` reads files `order[g::ranks * num_workers]`, so within
an epoch every file is read by exactly one worker of one rank. A worker shuffles the
samples of `shuffle_span` consecutive files of its list together (a block shuffle),
then moves on; at the end of its list it starts its next epoch. Each worker's stream is
infinite, so the DataLoader hands out batches round-robin forever (batch i comes from
worker i % num_workers) and no rank runs out before another. (When readers' files hold
different numbers of samples their epochs drift apart; the per-epoch reshuffle of the
assignment evens this out over epochs.)

The whole stream is a pure function of (seed, file sizes, ranks, workers, batch size), so
the data position in a checkpoint is one number: micro-batches consumed. On resume each
worker works out how many of those it produced and skips that many samples by index
arithmetic, without reading them. Caption choices are drawn from a generator seeded by
(seed, worker, batch index), never from a worker's global RNG.

Samples are read by random access: cache files with `safetensors.safe_open` slices, tar
shards through an index of member offsets built from the tar headers (webdataset's
sequential readers cannot seek, which is why they are not used here). Shards must be
local (or mounted) uncompressed tars. Memory per worker: one batch plus the indices.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
import posixpath
import tarfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pydantic import ValidationError
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from schemas.records import SampleRecord
from schemas.trainer import LatentCacheManifest

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")

# Tensor names inside a cache file.
LATENTS = "latents"
HAS_SYNTHETIC = "has_synthetic"


def text_key(kind: str) -> str:
    return f"text.{kind}"


def pooled_key(kind: str) -> str:
    return f"pooled.{kind}"


def expand_shards(spec: str) -> list[str]:
    """Brace-expand a shard spec ('DIR/shards/{000000..000099}.tar'); every file must exist."""
    from braceexpand import braceexpand

    paths = [p for p in braceexpand(spec) if p]
    if not paths:
        raise ValueError(f"shard spec {spec!r} names no files")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of the {len(paths)} shards named by {spec!r} do not exist (first: {missing[0]}); "
            "check the path and the brace range"
        )
    return paths


# ---- tar shards ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TarSample:
    key: str
    members: dict[str, tuple[int, int]]  # extension -> (byte offset of the data, size)

    @property
    def image_extension(self) -> str | None:
        return next((ext for ext in IMAGE_EXTENSIONS if ext in self.members), None)


def index_tar(path: str) -> list[TarSample]:
    """The samples of a WebDataset tar in file order, with each member's data offset.

    Keys follow WebDataset: a member `dir/KEY.ext` belongs to key `dir/KEY` (up to the first
    dot of the file name). Samples without an image are left out and logged.
    """
    groups: OrderedDict[str, dict[str, tuple[int, int]]] = OrderedDict()
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            directory, name = posixpath.split(member.name)
            stem, dot, extension = name.partition(".")
            if not dot:
                continue
            key = posixpath.join(directory, stem) if directory else stem
            groups.setdefault(key, {})[extension.lower()] = (member.offset_data, member.size)
    samples = [TarSample(key, members) for key, members in groups.items()]
    kept = [s for s in samples if s.image_extension is not None]
    if len(kept) < len(samples):
        logger.warning("%s: %d sample(s) without an image member skipped", path, len(samples) - len(kept))
    return kept


class _OpenFiles:
    """A few open file handles per worker, least recently used closed first."""

    def __init__(self, opener: Callable[[str], object], limit: int = 16):
        self.opener = opener
        self.limit = limit
        self.handles: OrderedDict[str, object] = OrderedDict()

    def get(self, path: str):
        handle = self.handles.pop(path, None)
        if handle is None:
            handle = self.opener(path)
            while len(self.handles) >= self.limit:
                _, old = self.handles.popitem(last=False)
                close = getattr(old, "close", None)
                if close:
                    close()
        self.handles[path] = handle
        return handle


def read_member(handle, offset: int, size: int) -> bytes:
    handle.seek(offset)
    return handle.read(size)


def load_rgb(data: bytes, resolution: int) -> np.ndarray:
    """Decode, resize the shorter side to `resolution` (bicubic) and center-crop: (R, R, 3) uint8."""
    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
        width, height = image.size
        scale = resolution / min(width, height)
        size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
        left = (size[0] - resolution) // 2
        top = (size[1] - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
        return np.array(image, dtype=np.uint8)  # a writable copy (torch.from_numpy wants one)


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


# ---- the sample stream ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StreamSlot:
    """Which part of the data one data-loader worker of one rank reads."""

    rank: int
    world_size: int
    worker: int
    num_workers: int

    @property
    def index(self) -> int:
        return self.rank * self.num_workers + self.worker

    @property
    def total(self) -> int:
        return self.world_size * self.num_workers


def check_split(num_files: int, world_size: int, num_workers: int, what: str) -> None:
    """Fail fast when some worker would get no file at all."""
    readers = world_size * max(1, num_workers)
    if num_files < readers:
        raise ValueError(
            f"{num_files} {what} cannot be split across {world_size} rank(s) x {max(1, num_workers)} data-loader "
            f"worker(s) = {readers} readers: every reader needs at least one file. Lower data.num_workers, "
            "or write more, smaller files (cache.samples_per_file, or the curation's shards.samples_per_shard)."
        )


def epoch_files(num_files: int, seed: int, epoch: int, slot: StreamSlot) -> list[int]:
    """The files `slot` reads in `epoch`, in reading order."""
    order = np.random.default_rng([seed, epoch, 1]).permutation(num_files)
    return [int(f) for f in order[slot.index :: slot.total]]


def sample_order(
    size_of: Callable[[int], int], num_files: int, seed: int, slot: StreamSlot, span: int, skip: int = 0
) -> Iterator[tuple[int, int, int]]:
    """Endless (epoch, file, row) stream of `slot`, after skipping its first `skip` samples
    (by arithmetic: skipped blocks are never permuted or read)."""
    epoch = 0
    while True:
        files = epoch_files(num_files, seed, epoch, slot)
        epoch_total = 0
        for start in range(0, len(files), span):
            block = files[start : start + span]
            counts = [size_of(f) for f in block]
            total = sum(counts)
            epoch_total += total
            if skip >= total:
                skip -= total
                continue
            bounds = np.cumsum(counts)
            permutation = np.random.default_rng([seed, epoch, slot.index, start, 2]).permutation(total)
            for flat in permutation[skip:]:
                j = int(np.searchsorted(bounds, flat, side="right"))
                yield epoch, block[j], int(flat - (bounds[j - 1] if j else 0))
            skip = 0
        if epoch_total == 0:
            raise ValueError(f"data-loader reader {slot.index} got only empty files in epoch {epoch}")
        epoch += 1


def batches_before(consumed: int, worker: int, num_workers: int) -> int:
    """How many of the first `consumed` round-robin batches came from `worker`."""
    return max(0, (consumed - worker + num_workers - 1) // num_workers)


class StreamDataset(IterableDataset):
    """Base of the training datasets: yields whole batches (the DataLoader's batch_size is None)."""

    def __init__(self, num_files: int, batch_size: int, seed: int, rank: int, world_size: int, num_workers: int, span: int, start_batches: int, what: str):
        check_split(num_files, world_size, num_workers, what)
        self.num_files = num_files
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.span = span
        self.start_batches = start_batches

    def _slot(self) -> StreamSlot:
        info = get_worker_info()
        if info is None:
            return StreamSlot(self.rank, self.world_size, 0, 1)
        if info.num_workers != max(1, self.num_workers):
            raise RuntimeError(f"dataset built for {self.num_workers} workers runs under {info.num_workers}")
        # A restarted loader's worker i hands out global batches start + i, start + i + W, ...:
        # those belong to the stream of worker (start + i) % W of the original numbering.
        return StreamSlot(self.rank, self.world_size, (info.id + self.start_batches) % info.num_workers, info.num_workers)

    def size_of(self, file: int) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def load_batch(self, rows: list[tuple[int, int, int]], rng: np.random.Generator) -> dict:  # pragma: no cover
        raise NotImplementedError

    def __iter__(self):
        slot = self._slot()
        done = batches_before(self.start_batches, slot.worker, slot.num_workers)
        stream = sample_order(self.size_of, self.num_files, self.seed, slot, self.span, skip=done * self.batch_size)
        batch_index = done
        while True:
            rows = [next(stream) for _ in range(self.batch_size)]
            rng = np.random.default_rng([self.seed, slot.index, batch_index, 3])
            yield self.load_batch(rows, rng)
            batch_index += 1


class CachedLatents(StreamDataset):
    """Batches from a latent cache: {"latents" (B, C, h, w), "text" (B, L, D), "pooled" (B, P)}
    in the cache's storage dtype; each sample's caption is the synthetic one with
    probability `synthetic_prob` (when the cache has both)."""

    def __init__(self, cache_dir: str | Path, manifest: LatentCacheManifest, *, synthetic_prob: float, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, num_workers: int = 0, span: int = 4, start_batches: int = 0):
        super().__init__(len(manifest.files), batch_size, seed, rank, world_size, num_workers, span, start_batches, "cache files")
        self.paths = [str(Path(cache_dir) / f.file) for f in manifest.files]
        self.sizes = [f.num_samples for f in manifest.files]
        kinds = {"original": ["original"], "synthetic": ["synthetic"], "both": ["original", "synthetic"]}[manifest.spec.captions]
        self.kinds = kinds
        self.synthetic_prob = synthetic_prob if len(kinds) == 2 else (1.0 if kinds == ["synthetic"] else 0.0)
        self._files: _OpenFiles | None = None

    def size_of(self, file: int) -> int:
        return self.sizes[file]

    def _open(self, path: str):
        from safetensors import safe_open

        return safe_open(path, framework="pt")

    def load_batch(self, rows, rng) -> dict:
        if self._files is None:
            self._files = _OpenFiles(self._open)
        use_synthetic = rng.random(len(rows)) < self.synthetic_prob
        latents, text, pooled = [], [], []
        for (_, file, row), synthetic in zip(rows, use_synthetic):
            handle = self._files.get(self.paths[file])
            kind = "synthetic" if synthetic else "original"
            latents.append(handle.get_slice(LATENTS)[row])
            text.append(handle.get_slice(text_key(kind))[row])
            pooled.append(handle.get_slice(pooled_key(kind))[row])
        return {"latents": torch.stack(latents), "text": torch.stack(text), "pooled": torch.stack(pooled)}


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
        self._files: _OpenFiles | None = None

    def samples(self, file: int) -> list[TarSample]:
        if file not in self._index:
            self._index[file] = index_tar(self.paths[file])
        return self._index[file]

    def size_of(self, file: int) -> int:
        return len(self.samples(file))

    def read_sample(self, file: int, row: int) -> tuple[np.ndarray, str, str | None]:
        if self._files is None:
            self._files = _OpenFiles(lambda p: open(p, "rb"))
        sample = self.samples(file)[row]
        handle = self._files.get(self.paths[file])

        def read(extension: str) -> bytes:
            return read_member(handle, *sample.members[extension])

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


# ---- sequential reading for `trainer cache` ------------------------------------------------


def file_sha256(path: str) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


class ShardReader(IterableDataset):
    """Reads whole shards in order for caching; shards are split across workers.

    Yields per-shard batches: {"shard": index into `paths`, "keys", "pixels" uint8 (b, 3, R, R),
    "original", "synthetic" (lists of str / None), "last": bool, and with the last batch
    "sha256", "size_bytes", "num_samples", "skipped"}. A shard with no decodable sample
    yields just its last (empty) batch.
    """

    def __init__(self, paths: list[str], resolution: int, batch_size: int):
        self.paths = paths
        self.resolution = resolution
        self.batch_size = batch_size

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for shard in range(worker, len(self.paths), workers):
            yield from self._read(shard)

    def _read(self, shard: int):
        path = self.paths[shard]
        sha256, size = file_sha256(path)
        samples = index_tar(path)
        skipped = 0
        batch: dict = self._empty(shard)
        with open(path, "rb") as handle:
            for sample in samples:

                def read(extension: str, sample=sample) -> bytes:
                    return read_member(handle, *sample.members[extension])

                try:
                        pixels = load_rgb(read(sample.image_extension), self.resolution)
                except (OSError, ValueError, Image.DecompressionBombError) as error:
                    logger.warning("%s: sample %s cannot be decoded (%s); skipped", path, sample.key, error)
                    skipped += 1
                    continue
                original, synthetic = captions_of(sample, read, path)
                batch["keys"].append(sample.key)
                batch["pixels"].append(torch.from_numpy(pixels).permute(2, 0, 1))
                batch["original"].append(original)
                batch["synthetic"].append(synthetic)
                if len(batch["keys"]) == self.batch_size:
                    yield self._finish(batch)
                    batch = self._empty(shard)
        batch["last"] = True
        batch.update(sha256=sha256, size_bytes=size, num_samples=len(samples) - skipped, skipped=skipped)
        yield self._finish(batch)

    def _empty(self, shard: int) -> dict:
        return {"shard": shard, "keys": [], "pixels": [], "original": [], "synthetic": [], "last": False}

    def _finish(self, batch: dict) -> dict:
        pixels = batch["pixels"]
        batch["pixels"] = torch.stack(pixels) if pixels else torch.zeros((0, 3, self.resolution, self.resolution), dtype=torch.uint8)
        return batch

"""Sequential reading of whole shards for `trainer cache`: each image decoded, put in its
aspect bucket and cropped (`trainer.buckets`), the shard hashed on the same pass.

Apart from `trainer/data.py` (random access for training) because caching reads shards
front to back once, which is what lets it hash them too.
"""

from __future__ import annotations

import hashlib
import logging

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from stages.core.decode import decode_rgb
from stages.core.tario import TarSample, open_for_index, scan_tar, with_retries
from trainer.buckets import Bucket, fit_to_bucket, nearest_bucket
from trainer.data import _with_images, captions_of, lost_text, manifest_samples

logger = logging.getLogger(__name__)


def file_sha256(path: str) -> tuple[str, int]:
    """(SHA-256, size in bytes) of a file at any fsspec URL, streamed."""
    digest = hashlib.sha256()
    size = 0
    with open_for_index(path) as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


class _HashingRanges:
    """Reads increasing byte ranges of one open file, hashing every byte of the file
    along the way (the gaps between ranges too), so a shard is read once for its
    samples and its checksum."""

    def __init__(self, handle, name: str):
        self.handle = handle
        self.name = name
        self.digest = hashlib.sha256()
        self.position = 0
        handle.seek(0)

    def _advance(self, size: int) -> bytes:
        data = self.handle.read(size)
        self.digest.update(data)
        self.position += len(data)
        return data

    def read(self, offset: int, size: int) -> bytes:
        if offset < self.position:
            raise ValueError(f"{self.name}: ranges must increase ({offset} < {self.position})")
        while self.position < offset:
            if not self._advance(min(offset - self.position, 1 << 20)):
                raise OSError(f"{self.name}: file ended at byte {self.position}")
        data = self._advance(size)
        if len(data) != size:
            raise OSError(f"{self.name}: expected {size} bytes at offset {offset}, got {len(data)}")
        return data

    def finish(self) -> tuple[str, int]:
        while self._advance(1 << 20):
            pass
        return self.digest.hexdigest(), self.position


class ShardReader(IterableDataset):
    """Reads whole shards in order for caching; shards are split across workers.

    Yields per-shard batches of one bucket each: {"shard": index into `paths`, "bucket":
    (W, H), "keys", "pixels" uint8 (b, 3, H, W), "original_size" (b, 2) and "crop_top_left"
    (b, 2) int32 in pixels ((h, w) and (top, left), SDXL's conditions), "original",
    "synthetic" (lists of str / None), "last": bool}; the shard's last batch is empty and
    carries "sha256", "size_bytes", "num_samples", "skipped", "lost", "problem". Each image
    goes to its nearest bucket of `buckets` (`trainer.buckets`; default: the one square
    `resolution` bucket, i.e. shorter side resized and centre-cropped).

    Each shard (any fsspec URL) is read twice, sequentially: its headers (the tar index),
    then its members in file order, which also hashes it. A shard that is truncated keeps
    the samples before the cut; one that cannot be read at all, or vanishes while being
    read, keeps what was read before; either way the shard is named in the log with the
    samples lost (from its manifest when it has one), and `problem` says what happened.
    """

    def __init__(self, paths: list[str], resolution: int, batch_size: int, buckets: list[Bucket] | None = None):
        self.paths = paths
        self.resolution = resolution
        self.batch_size = batch_size
        self.buckets = list(buckets) if buckets else [(resolution, resolution)]

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for shard in range(worker, len(self.paths), workers):
            yield from self._read(shard)

    def _read(self, shard: int):
        path = self.paths[shard]
        skipped, done = 0, 0
        problem = None
        samples: list[TarSample] = []
        sha256, size = "", 0
        pending: dict[Bucket, dict] = {}
        try:
            with open_for_index(path) as handle:
                found = with_retries(lambda: scan_tar(handle, path), f"indexing {path}")
                samples = _with_images(found.samples, path)
                if found.truncated:
                    problem = f"truncated ({found.detail})"
                ranges = _HashingRanges(handle, path)
                for sample in samples:
                    members = {ext: ranges.read(*span) for ext, span in sorted(sample.members.items(), key=lambda kv: kv[1][0])}
                    done += 1

                    def read(extension: str, members=members) -> bytes:
                        return members[extension]

                    try:
                        image = decode_rgb(read(sample.image_extension))
                        bucket = nearest_bucket(image.width, image.height, self.buckets)
                        pixels, top, left = fit_to_bucket(image, bucket)
                    except (OSError, ValueError, Image.DecompressionBombError) as error:
                        logger.warning("%s: sample %s cannot be decoded (%s); skipped", path, sample.key, error)
                        skipped += 1
                        continue
                    original, synthetic = captions_of(sample, read, path)
                    batch = pending.setdefault(bucket, self._empty(shard, bucket))
                    batch["keys"].append(sample.key)
                    batch["pixels"].append(torch.from_numpy(pixels).permute(2, 0, 1))
                    batch["original_size"].append((image.height, image.width))
                    batch["crop_top_left"].append((top, left))
                    batch["original"].append(original)
                    batch["synthetic"].append(synthetic)
                    if len(batch["keys"]) == self.batch_size:
                        yield self._finish(pending.pop(bucket))
                sha256, size = ranges.finish()
        except (OSError, ValueError) as error:
            problem = f"vanished while being read ({error})" if isinstance(error, FileNotFoundError) else f"unreadable ({error})"
        usable = done - skipped
        lost = 0
        if problem is not None:
            total = manifest_samples(path)
            lost = max(0, total - done) if total is not None else max(1, len(samples) - done)
            logger.error("%s is %s: %d sample(s) read, %s", path, problem, done, lost_text(lost if total is not None else None))
        for bucket in sorted(pending, key=self.buckets.index):  # partial batches, in bucket order
            yield self._finish(pending[bucket])
        batch = self._empty(shard, self.buckets[0])
        batch["last"] = True
        batch.update(sha256=sha256, size_bytes=size, num_samples=usable, skipped=skipped, lost=lost, problem=problem)
        yield self._finish(batch)

    def _empty(self, shard: int, bucket: Bucket) -> dict:
        return {"shard": shard, "bucket": bucket, "keys": [], "pixels": [], "original_size": [], "crop_top_left": [], "original": [], "synthetic": [], "last": False}

    def _finish(self, batch: dict) -> dict:
        pixels = batch["pixels"]
        width, height = batch["bucket"]
        batch["pixels"] = torch.stack(pixels) if pixels else torch.zeros((0, 3, height, width), dtype=torch.uint8)
        for key in ("original_size", "crop_top_left"):
            batch[key] = torch.tensor(batch[key], dtype=torch.int32).reshape(-1, 2)
        return batch

"""Aspect-ratio buckets: the bucket set, which bucket an image goes to, how it is cropped,
and how a stream of samples becomes batches of one bucket each.

Follows SDXL (Podell et al. 2023, sec. 2.3) and the trainers that train it (kohya's
sd-scripts, SimpleTuner): every bucket has about the stage's pixel count (resolution^2),
sides divisible by `step` (the VAE factor times the patch size, so a bucket is a whole
token grid) and an aspect ratio of at most `max_aspect`; an image goes to the bucket whose
aspect ratio is closest to its own (in log ratio, so 1:2 and 2:1 are equally far from 1:1),
is resized to cover it (the smaller scale that fills both sides) and cropped at the centre
of the excess, the minimum crop. The crop offsets and the original size are kept with the
latent: they are the model's size and crop conditions (`trainer/model.py`).

Batching (`bucket_batches`): the sample stream of a data-loader worker (`trainer/data.py`,
a pure function of the seed and the file list) is dealt into one queue per bucket; a queue
that holds its bucket's batch size is emitted as a batch. No sample is dropped (a queue
carries over block and epoch ends; a rare bucket waits until it fills), a batch never
mixes buckets, and the batch sequence is a pure function of the sample stream, so resume
replays the index arithmetic (no reads) to the batch it stopped at. With one bucket this
is exactly the unbucketed stream cut into consecutive batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
from PIL import Image

from stages.core.decode import decode_rgb

Bucket = tuple[int, int]  # (width, height) in pixels


def bucket_name(bucket: Bucket) -> str:
    return f"{bucket[0]}x{bucket[1]}"


def parse_bucket(text: str) -> Bucket:
    """'WxH' -> (W, H); raises ValueError naming the text."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"bucket {text!r} is not WIDTHxHEIGHT in pixels (e.g. 384x192)") from None
    return width, height


def bucket_set(resolution: int, step: int, max_aspect: float) -> list[Bucket]:
    """Buckets of about `resolution`^2 pixels, sides multiples of `step`, aspect <= `max_aspect`,
    ordered from tallest to widest; always includes the square (resolution, resolution) when
    `resolution` is a multiple of `step`.

    Landscape candidates: for each height h (a multiple of `step`, at most the square side)
    the width nearest to resolution^2 / h, and for each width w (at least the square side) the
    height nearest to resolution^2 / w, both rounded to multiples of `step`; portrait buckets
    are their mirrors.
    """
    if resolution % step:
        raise ValueError(f"resolution {resolution} is not a multiple of {step} (VAE factor x patch size)")
    if max_aspect < 1:
        raise ValueError(f"max_aspect must be >= 1, got {max_aspect}")
    area = resolution * resolution
    landscape = set()
    candidates = [(max(step, round(area / h / step) * step), h) for h in range(step, resolution + 1, step)]
    candidates += [(w, max(step, round(area / w / step) * step)) for w in range(resolution, int(resolution * max_aspect) + step, step)]
    for width, height in candidates:
        if width >= height and width / height <= max_aspect + 1e-9:
            landscape.add((width, height))
    both = landscape | {(h, w) for w, h in landscape}
    return sorted(both, key=lambda b: b[0] / b[1])


def nearest_bucket(width: int, height: int, buckets: list[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is closest (in log ratio) to width/height; ties go to the
    earlier (taller) bucket."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - ratio))


def fit_to_bucket(image: Image.Image, bucket: Bucket) -> tuple[np.ndarray, int, int]:
    """Resize (bicubic) to cover `bucket` and centre-crop the excess: ((H, W, 3) uint8, crop
    top, crop left), offsets in pixels of the resized image (SDXL's crop coordinates)."""
    target_w, target_h = bucket
    width, height = image.size
    scale = max(target_w / width, target_h / height)
    size = (max(target_w, round(width * scale)), max(target_h, round(height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    left = (size[0] - target_w) // 2
    top = (size[1] - target_h) // 2
    image = image.crop((left, top, left + target_w, top + target_h))
    return np.array(image, dtype=np.uint8), top, left  # a writable copy (torch.from_numpy wants one)


def load_rgb(data: bytes, resolution: int) -> np.ndarray:
    """Decode (the stages' one decoder), resize the shorter side to `resolution`
    (bicubic) and center-crop: (R, R, 3) uint8 (the square bucket)."""
    return fit_to_bucket(decode_rgb(data), (resolution, resolution))[0]


def bucket_batch_sizes(buckets: list[Bucket], batch_size: int, resolution: int, step: int) -> dict[Bucket, int]:
    """Per-bucket batch sizes with about the same number of tokens per batch as `batch_size`
    square images: floor(batch_size * square tokens / bucket tokens), at least 1, so no
    bucket's batch holds more tokens (memory) than the square batch."""
    square = (resolution // step) ** 2
    return {b: max(1, (batch_size * square) // ((b[0] // step) * (b[1] // step))) for b in buckets}


def bucket_batches(
    stream: Iterator[tuple[int, int, int]], bucket_of_file: list[int], batch_sizes: list[int]
) -> Iterator[tuple[int, list[tuple[int, int, int]]]]:
    """(bucket index, rows) batches from an endless (epoch, file, row) stream, every file
    holding one bucket: rows are queued per bucket and a full queue is emitted (see module doc)."""
    queues: list[list[tuple[int, int, int]]] = [[] for _ in batch_sizes]
    for item in stream:
        bucket = bucket_of_file[item[1]]
        queue = queues[bucket]
        queue.append(item)
        if len(queue) == batch_sizes[bucket]:
            queues[bucket] = []
            yield bucket, queue


def bucket_histogram(counts: dict[str, int]) -> str:
    """A text histogram of samples per bucket (aspect order), one line per bucket."""
    if not counts:
        return "(no samples)"
    total = sum(counts.values())
    widest = max(counts.values())
    lines = []
    for name, count in counts.items():
        bar = "#" * max(1, round(40 * count / widest)) if count else ""
        lines.append(f"  {name:>9}  {count:7d}  {100 * count / total:5.1f}%  {bar}")
    return "\n".join(lines)

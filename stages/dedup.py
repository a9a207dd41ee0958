"""Deduplication across the whole dataset: exact (SHA-256) and near (64-bit pHash).

What is dropped, and in favour of what
--------------------------------------
* **Exact duplicates**: records with the same `image_sha256` (SHA-256 of the
  downloaded bytes). One survivor per hash; the others are rejected as
  `exact_duplicate`.
* **Near duplicates**: among the exact survivors, records whose `phash` (64-bit
  DCT perceptual hash, `imagehash.phash` semantics) differ in at most
  `DedupConfig.hamming_threshold` bits (default measured in
  `benchmarks/dedup_bench.py`). Rejected as `near_duplicate`.
* **Survivor rank**: more decoded pixels (`original_width * original_height`)
  wins, then the smaller `key` (string order). Every reject row's
  `duplicate_of` names a sample that is *kept*.
* Records without `image_sha256` skip exact dedup, records without `phash` skip
  near dedup (counted as `missing_sha256` / `missing_phash`); neither is dropped
  for it. `exact=False` / `near=False` disable a kind.

The near-duplicate rule, and why it is sound
--------------------------------------------
Near-duplicate pairs form a graph. A node is dropped iff it has a higher-ranked
neighbour; its parent is its best-ranked such neighbour (ties cannot happen: keys
are unique). Parents rank strictly higher, so parent chains are acyclic and end
at a node with no higher-ranked neighbour, which is kept. Hence no two kept
images are within the threshold (the lower-ranked one of such a pair would have
a higher-ranked neighbour) and every drop can name a kept root. In a chain
A~B, B~C with A !~ C (A best), both B and C are dropped and both name A: C is
a transitive duplicate (its reject `detail` names B, the neighbour it is within
the threshold of). Choosing kept nodes greedily instead (keep C because B was
dropped) would be a sequential, order-dependent pass; this rule needs only
local decisions.

Roots are found by pointer jumping: every dropped node (near, and exact
duplicates pointing at their sha-survivor) holds a pointer; each round looks up
the pointer's own pointer (one `GroupByKey` over partitions of the pointer
space) and jumps to it, so pointer distances double. `max_survivor_rounds` rounds resolve chains of up to
`2 ** rounds - 1` links (`max_chain_links`); a longer chain is not guessed:
its records are rejected with `duplicate_of=None`, a detail asking to raise
`max_survivor_rounds`, an ERROR log line and the `unresolved_survivor_chains`
counter.

Finding the pairs without comparing all pairs (multi-index hashing)
-------------------------------------------------------------------
Norouzi et al., "Fast Search in Hamming Space with Multi-Index Hashing" (CVPR
2012). The 64 bits are split into `t + 1` contiguous bands (t = threshold). By
the pigeonhole principle two hashes within distance t agree exactly on at least
one band. Each hash is emitted once per band, keyed by `(band, partition)` where
the partition is a mix of the band value modulo `partitions_per_band`; inside a
partition, hashes are sorted by band value and only hashes with equal band value
are compared (XOR + popcount, vectorised with numpy, in tiles that bound
memory). A pair that agrees on several bands is emitted only from the first
band it agrees on, so each pair comes out once without another shuffle.
Identical hashes are collapsed to their best copy before comparing, first in
each batch (local pre-aggregation, before the shuffle), then in each partition;
the other copies become distance-0 pairs. So a flood of identical hashes (blank
or placeholder images) adds at most one entry per batch to a partition and is
never compared quadratically. A copy's parent is then the best copy in its
batch or partition rather than the global best; the kept set is the same, and
the root it resolves to is too.

Cost model (uniform hashes): bands are 64/(t+1) bits wide, so a band value is
shared by about `N / 2**(64/(t+1))` hashes and the comparisons are about
`(t+1) * N**2 / 2**(64/(t+1) + 1)`: 6e9 for N = 1e6 at t = 6 (~1 ns each).
Memory per partition is bounded: about `N / min(partitions_per_band,
2**band_bits)` hashes (`band_bits` = 9 at t = 6), compared in tiles. Compute
is not: it grows as N**2 (6e15 comparisons at N = 1e9, t = 6), the price of an
exact answer with the band layout the threshold dictates.

Scale
-----
Only keys, ranks and hashes go through shuffles (records carry metadata only;
image bytes never do), and no worker holds all hashes, pairs or pointers.
Records, sha256 members and pointers are batched on the worker
(`beam.BatchElements`, `batch_size`) and shuffled as one chunk per (batch, key
partition); each of the `key_partitions` partitions then groups or joins in
memory what falls in it (about N / key_partitions entries; a sha256 with a
million copies costs one entry), streaming its chunks twice. A keyed shuffle of
one element per record would cost ~30 us per record on FnApiRunner. Records are
joined back with the decisions by key as their JSON (`exclude_defaults`, so the
round trip is exact), which pydantic writes and reads ~2x faster than pickle.

pHash computed fast
-------------------
`compute_phash` decodes JPEGs with PIL's draft mode (libjpeg's scaled IDCT: 1/2,
1/4 or 1/8 size, luma only), which gives the 8x8 (or 4x4, 2x2) block means of
the full image. Instead of resizing that small image with LANCZOS (which blurs
twice and flips ~1 bit in 2), it applies the *full-resolution* LANCZOS weights
that `imagehash.phash`'s `resize((32, 32), LANCZOS)` would use, summed over each
block, with the same horizontal-then-vertical 8-bit rounding; the 32x32 result
then goes through `imagehash.phash` itself (DCT, median). EXIF orientation is
applied as `ImageOps.exif_transpose` does, so the hash describes the image as
it will be stored. Other formats (and JPEGs too small to scale) are decoded in
full and hashed by `imagehash.phash` unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import logging
import zlib
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import apache_beam as beam
import imagehash
import numpy as np
import scipy.fftpack
from apache_beam.metrics import Metrics
from PIL import Image

from schemas import DedupConfig, RejectReason, SampleRecord, Stage
from stages.base import REJECTS, Drop, StageMetrics, rejection

logger = logging.getLogger(__name__)

PHASH_BITS = 64
PHASH_HEX_DIGITS = PHASH_BITS // 4
_HASH_SIZE = 8  # imagehash.phash default hash_size
_HASH_SIDE = _HASH_SIZE * 4  # imagehash.phash resizes to 32x32 (highfreq_factor 4)

# EXIF Orientation -> transposition, the same table as PIL.ImageOps.exif_transpose.
_EXIF_ORIENTATION = 0x0112
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = {5, 6, 7, 8}
_DRAFT_FORMATS = {"JPEG", "MPO"}  # MPO: multi-picture JPEG from cameras


# --------------------------------------------------------------------------- hashing


def sha256_hex(data: bytes) -> str:
    """SHA-256 of the bytes as 64 lowercase hex digits (the exact-dedup key)."""
    return hashlib.sha256(data).hexdigest()


@dataclasses.dataclass(frozen=True)
class ImageDigest:
    """What one draft decode tells about an image.

    `width`/`height` are the full decoded size after EXIF orientation (what
    `SampleRecord.original_width/height` hold), not the reduced draft size.
    """

    phash: str
    width: int
    height: int
    format: str | None


def digest_image(data: bytes) -> ImageDigest:
    """Decode `data` at reduced size and return its pHash and full size.

    The whole entropy-coded stream is still decoded, so truncated or corrupt
    images raise as a full decode would (PIL's `OSError`,
    `UnidentifiedImageError`, `DecompressionBombError`); callers that validate
    images can use this instead of a full decode when they do not resize.
    """
    with Image.open(io.BytesIO(data)) as img:
        image_format = img.format
        full_width, full_height = img.size
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
        transpose = _ORIENTATION_TRANSPOSE.get(orientation)
        scale = 1
        if image_format in _DRAFT_FORMATS and min(full_width, full_height) >= 2 * _HASH_SIDE:
            # Ask for >= 32 px per side: libjpeg picks the largest of 1/2, 1/4, 1/8.
            drafted = img.draft("L", (_HASH_SIDE, _HASH_SIDE))
            if drafted is not None:
                scale = round(full_width / drafted[1][2])
        if scale == 1:
            # Full decode: imagehash.phash unchanged (after EXIF orientation).
            img.load()
            oriented = img.transpose(transpose) if transpose is not None else img
            phash = str(imagehash.phash(oriented, hash_size=_HASH_SIZE))
        else:
            luma = img if img.mode == "L" else img.convert("L")  # CMYK JPEGs keep their mode
            luma = np.asarray(luma, dtype=np.float64)  # (h/scale, w/scale), block means
            phash = _phash_from_block_means(luma, full_width, full_height, scale, transpose, orientation)
    if orientation in _SWAPS_AXES:
        full_width, full_height = full_height, full_width
    return ImageDigest(phash=phash, width=full_width, height=full_height, format=image_format)


def compute_phash(data: bytes) -> str:
    """64-bit DCT pHash of encoded image bytes, 16 hex digits (`imagehash.phash`,
    hash_size 8, of the EXIF-oriented image), computed from a reduced decode.

    Matches `imagehash.phash(ImageOps.exif_transpose(Image.open(...)))` bit for
    bit on most JPEGs and within 2 bits on the rest (see the module docstring
    and `benchmarks/dedup_bench.py`). Pure function; raises on undecodable
    bytes like `digest_image`.
    """
    return digest_image(data).phash


def _lanczos(x: np.ndarray) -> np.ndarray:
    """PIL's LANCZOS kernel sinc(x) * sinc(x / 3) on |x| < 3, in float32 (one
    SIMD sine: sin(pi x) = s (3 - 4 s^2) with s = sin(pi x / 3)); float32 is
    finer than the 22-bit fixed point PIL applies the weights in."""
    x = np.asarray(x, dtype=np.float32)
    s2 = np.sin(np.float32(np.pi / 3.0) * x)
    s2 *= s2
    px2 = np.float32(np.pi * np.pi) * x * x
    with np.errstate(divide="ignore", invalid="ignore"):
        value = np.float32(3.0) * s2 * (np.float32(3.0) - np.float32(4.0) * s2) / px2
    value[px2 == 0] = 1.0
    value[px2 >= np.float32(9.0 * np.pi * np.pi)] = 0.0  # |x| >= 3
    return value


@functools.lru_cache(maxsize=1024)
def _resize_weights(in_size: int, block: int) -> np.ndarray:
    """Weights of PIL's LANCZOS resize from `in_size` to 32 pixels (one axis),
    summed over runs of `block` input pixels: shape (32, ceil(in_size / block)).

    Follows PIL's `precompute_coeffs` for a downscale: support 3 * scale, centre
    (j + 0.5) * scale, window [int(centre - support + 0.5), int(centre + support
    + 0.5)), weights normalised per output pixel.
    """
    scale = in_size / _HASH_SIDE
    filter_scale = max(scale, 1.0)
    support = 3.0 * filter_scale
    centers = (np.arange(_HASH_SIDE) + 0.5) * scale
    lo = np.maximum((centers - support + 0.5).astype(np.int64), 0)  # int() truncates toward 0, as in C
    hi = np.minimum((centers + support + 0.5).astype(np.int64), in_size)
    x = lo[:, None] + np.arange(int((hi - lo).max()))[None, :]  # (32, window) input pixels
    weights = _lanczos((x - centers[:, None] + 0.5) / filter_scale)  # float32 (32, window)
    weights *= x < hi[:, None]
    blocks = -(-in_size // block)
    cells = np.arange(_HASH_SIDE)[:, None] * blocks + np.minimum(x // block, blocks - 1)  # zero weight past the edge
    summed = np.bincount(cells.ravel(), weights=weights.ravel(), minlength=_HASH_SIDE * blocks)
    summed = summed.reshape(_HASH_SIDE, blocks)
    summed /= summed.sum(axis=1, keepdims=True)  # normalised per output pixel, in float64
    summed.setflags(write=False)
    return summed


# OpenBLAS runs a GEMM of up to 65536 * 4 multiply-adds on one thread; a larger
# one starts its thread pool, which on a busy worker costs more than the product.
_SINGLE_THREAD_GEMM = 65536 * 4


def _gemm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b, split into products small enough to stay single-threaded."""
    m, k = a.shape
    n = b.shape[1]
    if m * n * k <= _SINGLE_THREAD_GEMM:
        return a @ b
    if m >= n:
        step = max(1, _SINGLE_THREAD_GEMM // (k * n))
        return np.concatenate([a[i : i + step] @ b for i in range(0, m, step)], axis=0)
    step = max(1, _SINGLE_THREAD_GEMM // (m * k))
    return np.concatenate([a @ b[:, j : j + step] for j in range(0, n, step)], axis=1)


def _phash_of_pixels(pixels: np.ndarray) -> str:
    """The end of `imagehash.phash` on a 32x32 8-bit image (given as its pixel
    values): the same scipy DCT, low 8x8 frequencies, median, hex string."""
    dct = scipy.fftpack.dct(scipy.fftpack.dct(pixels, axis=0), axis=1)
    low = dct[:_HASH_SIZE, :_HASH_SIZE]
    middle = _HASH_SIZE * _HASH_SIZE // 2
    ordered = np.sort(low, axis=None)
    median = (ordered[middle - 1] + ordered[middle]) / 2  # np.median's arithmetic, without its overhead
    # str(imagehash.ImageHash(bits)): the row-major bits as big-endian hex.
    return np.packbits(low > median).tobytes().hex()


def _phash_from_block_means(
    luma: np.ndarray,
    full_width: int,
    full_height: int,
    block: int,
    transpose: Image.Transpose | None,
    orientation: int,
) -> str:
    rows, cols = luma.shape
    wx_t = _resize_weights(full_width, block)[:, :cols].T  # (w/block, 32)
    wy = _resize_weights(full_height, block)[:, :rows]  # (32, h/block)
    # PIL resizes horizontally first, rounding to 8 bits in between; after a
    # 90-degree EXIF rotation the stored image's vertical axis is the horizontal one.
    if orientation in _SWAPS_AXES:
        tmp = np.clip(np.rint(_gemm(wy, luma)), 0, 255)  # (32, w/block)
        small = np.clip(np.rint(_gemm(tmp, wx_t)), 0, 255)  # (32, 32)
    else:
        tmp = np.clip(np.rint(_gemm(luma, wx_t)), 0, 255)  # (h/block, 32)
        small = np.clip(np.rint(_gemm(wy, tmp)), 0, 255)  # (32, 32)
    if transpose is not None:
        small = np.asarray(Image.fromarray(small.astype(np.uint8), "L").transpose(transpose), dtype=np.float64)
    return _phash_of_pixels(small)


def phash_to_int(phash: str) -> int:
    """Parse a 16-hex-digit pHash (as `str(imagehash.ImageHash)` writes it)."""
    try:
        raw = bytes.fromhex(phash) if len(phash) == PHASH_HEX_DIGITS else b""
    except ValueError:
        raw = b""
    if len(raw) != PHASH_BITS // 8:
        raise ValueError(f"pHash {phash!r} is not {PHASH_HEX_DIGITS} hex digits")
    return int.from_bytes(raw, "big")


def phashes_to_array(phashes: Iterable[str]) -> np.ndarray:
    """Hex pHashes -> uint64 array (vectorised: one bytes.fromhex per hash)."""
    raw = b"".join(bytes.fromhex(p) for p in phashes)
    if len(raw) % 8:
        raise ValueError("a pHash is not 16 hex digits")
    return np.frombuffer(raw, dtype=">u8").astype(np.uint64)


def hamming(a: str, b: str) -> int:
    """Hamming distance between two hex pHashes."""
    return (phash_to_int(a) ^ phash_to_int(b)).bit_count()


# --------------------------------------------------------------------------- ranking


def rank(pixels: int, key: str) -> tuple[int, str]:
    """Sort key of the survivor order: smaller is better (more pixels, then smaller key)."""
    return (-pixels, key)


# ------------------------------------------------------------- multi-index hashing core


class BandLayout(NamedTuple):
    """The 64 bits split into contiguous bands: `shifts[b]`, `widths[b]` (bits)."""

    shifts: tuple[int, ...]
    widths: tuple[int, ...]

    @property
    def bands(self) -> int:
        return len(self.widths)

    def mask(self, band: int) -> np.uint64:
        return np.uint64(((1 << self.widths[band]) - 1) << self.shifts[band])


@functools.lru_cache(maxsize=None)
def band_layout(threshold: int) -> BandLayout:
    """`threshold + 1` contiguous bands as equal as possible (pigeonhole: a pair
    within `threshold` bits agrees exactly on at least one band)."""
    bands = threshold + 1
    if not 1 <= bands <= PHASH_BITS:
        raise ValueError(f"hamming_threshold must be in [0, {PHASH_BITS - 1}], got {threshold}")
    base, extra = divmod(PHASH_BITS, bands)
    widths = tuple(base + (1 if b < extra else 0) for b in range(bands))
    shifts = tuple(int(s) for s in np.concatenate([[0], np.cumsum(widths[:-1])]))
    return BandLayout(shifts=shifts, widths=widths)


def band_values(hashes: np.ndarray, layout: BandLayout, band: int) -> np.ndarray:
    """Value of `band` for each hash (uint64 array)."""
    width_mask = np.uint64((1 << layout.widths[band]) - 1)
    return (hashes >> np.uint64(layout.shifts[band])) & width_mask


_MIX = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: spreads band values over partitions


def partition_of(values: np.ndarray, partitions: int) -> np.ndarray:
    """Partition of each band value, in [0, partitions)."""
    with np.errstate(over="ignore"):
        mixed = (values * _MIX) >> np.uint64(32)
    return (mixed % np.uint64(partitions)).astype(np.int64)


_SMALL_RUN = 32  # runs up to this long are compared all at once by shifting
_TILE_ROWS = 128
_TILE_COLS = 16384  # a tile is 128 x 16384 uint64 = 16 MiB


def _pairs_in_run(h: np.ndarray, threshold: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All i < j with popcount(h[i] ^ h[j]) <= threshold, in tiles (bounded memory)."""
    out_i, out_j, out_d = [], [], []
    n = len(h)
    for r0 in range(0, n - 1, _TILE_ROWS):
        r1 = min(r0 + _TILE_ROWS, n)
        rows = h[r0:r1, None]
        for c0 in range(r0 + 1, n, _TILE_COLS):
            c1 = min(c0 + _TILE_COLS, n)
            dist = np.bitwise_count(rows ^ h[None, c0:c1])  # (rows, cols) uint8
            hits = np.flatnonzero(dist <= threshold)
            if hits.size:
                i, j = np.divmod(hits, c1 - c0)
                i += r0
                j += c0
                keep = j > i
                out_i.append(i[keep])
                out_j.append(j[keep])
                out_d.append(dist.ravel()[hits][keep])
    return _concat(out_i, out_j, out_d)


def _concat(out_i, out_j, out_d) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not out_i:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty.copy(), np.empty(0, dtype=np.uint8)
    return (
        np.concatenate(out_i).astype(np.int64),
        np.concatenate(out_j).astype(np.int64),
        np.concatenate(out_d).astype(np.uint8),
    )


def pairs_in_partition(
    hashes: np.ndarray, band: int, layout: BandLayout, threshold: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i, j, distance), i < j, of `hashes` that agree on `band`, differ in
    at most `threshold` bits, and agree on no earlier band (so over all bands
    each pair within the threshold is reported exactly once).

    Only hashes sharing the band value are compared: short runs all at once by
    shifting the sorted array, long runs in tiles.
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    values = band_values(hashes, layout, band)
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    starts = np.flatnonzero(np.concatenate([[True], sorted_values[1:] != sorted_values[:-1]]))
    lengths = np.diff(np.concatenate([starts, [len(values)]]))
    out_i, out_j, out_d = [], [], []

    # Short runs: element k of the compacted sorted array vs element k + shift.
    in_small = np.repeat((lengths > 1) & (lengths <= _SMALL_RUN), lengths)
    small_idx = order[in_small]
    small_values = sorted_values[in_small]
    small_hashes = hashes[small_idx]
    for shift in range(1, _SMALL_RUN):
        same = np.flatnonzero(small_values[:-shift] == small_values[shift:])
        if same.size == 0:
            break
        dist = np.bitwise_count(small_hashes[same] ^ small_hashes[same + shift])
        near = dist <= threshold
        a, b = small_idx[same[near]], small_idx[same[near] + shift]
        out_i.append(np.minimum(a, b))
        out_j.append(np.maximum(a, b))
        out_d.append(dist[near])

    # Long runs: tiled all-pairs inside the run.
    for start, length in zip(starts[lengths > _SMALL_RUN], lengths[lengths > _SMALL_RUN]):
        idx = order[start : start + length]
        i, j, d = _pairs_in_run(hashes[idx], threshold)
        a, b = idx[i], idx[j]
        out_i.append(np.minimum(a, b))
        out_j.append(np.maximum(a, b))
        out_d.append(d)

    i, j, d = _concat(out_i, out_j, out_d)
    if band and i.size:
        xor = hashes[i] ^ hashes[j]
        first = np.ones(i.size, dtype=bool)
        for earlier in range(band):
            first &= (xor & layout.mask(earlier)) != 0
        i, j, d = i[first], j[first], d[first]
    return i, j, d


def near_pairs(hashes: np.ndarray, threshold: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair (i < j) within `threshold` bits, each once, all in memory.

    The single-machine form of what `Deduplicate` does per partition; for tests,
    benchmarks and small data.
    """
    layout = band_layout(threshold)
    parts = [pairs_in_partition(hashes, band, layout, threshold) for band in range(layout.bands)]
    return _concat([p[0] for p in parts], [p[1] for p in parts], [p[2] for p in parts])


def collapse_identical(
    hashes: np.ndarray, neg_pixels: np.ndarray, keys: list[str]
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Collapse identical hashes to their best-ranked copy.

    Returns the indices to keep (one per distinct hash, sorted) and
    `(loser, winner)` index pairs for the other copies. Only the (rare) groups of
    identical hashes are handled in Python.
    """
    order = np.argsort(hashes, kind="stable")
    sorted_hashes = hashes[order]
    starts = np.flatnonzero(np.concatenate([[True], sorted_hashes[1:] != sorted_hashes[:-1]]))
    if len(starts) == len(hashes):
        return np.arange(len(hashes)), []
    lengths = np.diff(np.concatenate([starts, [len(hashes)]]))
    keep = np.ones(len(hashes), dtype=bool)
    losers: list[tuple[int, int]] = []
    for start, length in zip(starts[lengths > 1].tolist(), lengths[lengths > 1].tolist()):
        group = order[start : start + length].tolist()
        best = min(group, key=lambda i: (int(neg_pixels[i]), keys[i]))
        for i in group:
            if i != best:
                keep[i] = False
                losers.append((i, best))
    return np.flatnonzero(keep), losers


class KeyBlob:
    """Many short strings as one UTF-8 blob plus end offsets: one `bytes` to
    shuffle instead of a list of strings, sliced with numpy, decoded only for
    the few keys that are needed (those in a pair)."""

    def __init__(self, data: bytes | np.ndarray, ends: np.ndarray):
        self.data = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes) else data
        self.ends = ends

    @classmethod
    def of(cls, keys: Iterable[str]) -> KeyBlob:
        encoded = [k.encode() for k in keys]
        ends = np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)))
        return cls(b"".join(encoded), ends)

    @classmethod
    def from_bytes(cls, data: bytes, ends: bytes) -> KeyBlob:
        return cls(data, np.frombuffer(ends, dtype="<i8").astype(np.int64))

    def to_bytes(self) -> tuple[bytes, bytes]:
        return self.data.tobytes(), self.ends.astype("<i8").tobytes()

    @classmethod
    def concat(cls, blobs: list[KeyBlob]) -> KeyBlob:
        if not blobs:
            return cls(b"", np.empty(0, dtype=np.int64))
        shifts = np.cumsum([0] + [len(b.data) for b in blobs[:-1]])
        return cls(
            np.concatenate([b.data for b in blobs]),
            np.concatenate([b.ends + shift for b, shift in zip(blobs, shifts)]),
        )

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, i: int) -> str:
        start = self.ends[i - 1] if i else 0
        return self.data[start : self.ends[i]].tobytes().decode()

    def take(self, idx: np.ndarray) -> KeyBlob:
        """The keys at `idx`, in that order (vectorised)."""
        starts = np.concatenate([[0], self.ends[:-1]])[idx]
        lengths = self.ends[idx] - starts
        new_ends = np.cumsum(lengths)
        positions = np.repeat(starts - (new_ends - lengths), lengths) + np.arange(int(new_ends[-1]) if len(idx) else 0)
        return KeyBlob(self.data[positions], new_ends)


# ---------------------------------------------------------- survivor resolution core


class Link(NamedTuple):
    """A dropped record waiting for its survivor: it points at `pointer` (an
    exact survivor, or a higher-ranked near duplicate)."""

    key: str
    reason: str  # RejectReason value
    detail: str
    in_table: bool  # a near drop: other links may point at it


class TableEntry(NamedTuple):
    """A near drop's current pointer, and whether that pointer is known kept."""

    pointer: str
    resolved: bool


class Decision(NamedTuple):
    """A dropped record's verdict; `survivor` None when its chain was not resolved."""

    reason: str
    survivor: str | None
    detail: str


def max_chain_links(rounds: int) -> int:
    """Longest chain of pointers that `rounds` pointer-jumping rounds resolve."""
    return 2**rounds - 1


def jump_link(pointer: str, own: TableEntry | None, link: Link) -> Iterator[tuple[str, tuple]]:
    """One pointer-jumping step for one link pointing at `pointer`.

    `own` is `pointer`'s own table entry (None: `pointer` is not a near drop, so
    it is kept). Yields tagged outputs: ("decision", (key, Decision)) when the
    survivor is known, else ("link", (new_pointer, Link)); and, for a near drop,
    ("table", (key, TableEntry)) with its new pointer.
    """
    if own is None or own.resolved:
        survivor = pointer if own is None else own.pointer
        yield "decision", (link.key, Decision(link.reason, survivor, link.detail))
        if link.in_table:
            yield "table", (link.key, TableEntry(survivor, True))
    else:
        yield "link", (own.pointer, link)
        if link.in_table:
            yield "table", (link.key, TableEntry(own.pointer, False))


def jump(pointer: str, own: TableEntry | None, links: Iterable[Link]) -> Iterator[tuple[str, tuple]]:
    """`jump_link` for every link pointing at `pointer`; a resolved `own` entry
    is carried forward (an unresolved one is updated by its own link)."""
    if own is not None and own.resolved:
        yield "table", (pointer, own)
    for link in links:
        yield from jump_link(pointer, own, link)


def unresolved(link: Link, rounds: int) -> Decision:
    return Decision(
        link.reason,
        None,
        f"{link.detail}; survivor not found: the near-duplicate chain is longer than "
        f"{max_chain_links(rounds)} links (raise max_survivor_rounds)",
    )


def resolve_links(
    links: Iterable[tuple[str, Link]], rounds: int
) -> dict[str, Decision]:
    """In-memory pointer jumping over `(pointer, Link)` pairs, round by round as
    `Deduplicate` does it. Returns key -> Decision."""
    pending = list(links)
    table = {link.key: TableEntry(pointer, False) for pointer, link in pending if link.in_table}
    decisions: dict[str, Decision] = {}
    for _ in range(rounds):
        if not pending:
            break
        by_pointer: dict[str, list[Link]] = {}
        for pointer, link in pending:
            by_pointer.setdefault(pointer, []).append(link)
        groups = set(by_pointer) | set(table)
        pending, new_table = [], {}
        for pointer in groups:
            for tag, value in jump(pointer, table.get(pointer), by_pointer.get(pointer, ())):
                if tag == "decision":
                    decisions[value[0]] = value[1]
                elif tag == "link":
                    pending.append(value)
                else:
                    new_table[value[0]] = value[1]
        table = new_table
    for _, link in pending:
        decisions[link.key] = unresolved(link, rounds)
    return decisions


# ------------------------------------------------------------- exact / identical groups


class Member(NamedTuple):
    """What dedup needs of a record: its rank and hash. `neg_pixels` is
    `-pixels` so that tuples sort best first."""

    neg_pixels: int
    key: str
    phash: str | None


def group_links(
    members: Iterable[Member | tuple], reason: RejectReason, detail: str, in_table: bool
) -> tuple[Member, Iterator[tuple[str, Link]]]:
    """The best member of a group and a link for each other member pointing at
    it. Iterates `members` twice (a re-iterable, e.g. a GroupByKey value) and
    holds only the best member. Members may be plain `(neg_pixels, key, phash)`
    tuples, as they come out of a shuffle."""
    best = Member._make(min(members, key=_member_rank))
    links = (
        (best.key, Link(m[1], reason.value, detail.format(survivor=best.key), in_table))
        for m in members
        if m[1] != best.key
    )
    return best, links


def _member_rank(member: Member | tuple) -> tuple[int, str]:
    return member[0], member[1]


@dataclasses.dataclass(frozen=True)
class DedupItem:
    """A record reduced to what deduplication reads (for `plan_dedup`)."""

    key: str
    pixels: int
    sha256: str | None
    phash: str | None

    @classmethod
    def of(cls, record: SampleRecord) -> DedupItem:
        return cls(record.key, record.pixels, record.image_sha256, record.phash)


_EXACT_DETAIL = "same sha256 as {survivor}"
# Identical hashes are collapsed in stages (per batch, then per partition), so the
# copy a record was compared with depends on batching: name none.
_SAME_PHASH_DETAIL = "identical pHash (Hamming distance 0)"


def _near_detail(distance: int, threshold: int, neighbour: str) -> str:
    if distance == 0:
        return _SAME_PHASH_DETAIL
    return f"pHash Hamming distance {distance} <= {threshold} to {neighbour}"


def plan_dedup(items: Iterable[DedupItem], config: DedupConfig) -> dict[str, Decision]:
    """All of `Deduplicate`'s decisions computed in memory: key -> Decision for
    every dropped item, by the same rules, naming the same survivors with the
    same details; the steps are simpler (global dicts). For tests and small data."""
    items = list(items)
    links: list[tuple[str, Link]] = []
    near_input: list[Member] = []
    by_sha: dict[str, list[Member]] = {}
    for item in items:
        member = Member(-item.pixels, item.key, item.phash)
        if config.exact and item.sha256 is not None:
            by_sha.setdefault(item.sha256, []).append(member)
        else:
            near_input.append(member)
    for group in by_sha.values():
        best, group_out = group_links(group, RejectReason.EXACT_DUPLICATE, _EXACT_DETAIL, False)
        links.extend(group_out)
        near_input.append(best)
    if config.near:
        by_phash: dict[str, list[Member]] = {}
        for member in near_input:
            if member.phash is not None:
                by_phash.setdefault(member.phash, []).append(member)
        reps = []
        for group in by_phash.values():
            best, group_out = group_links(group, RejectReason.NEAR_DUPLICATE, _SAME_PHASH_DETAIL, True)
            links.extend(group_out)
            reps.append(best)
        hashes = phashes_to_array(m.phash for m in reps)
        best_parent: dict[str, tuple[int, str, int]] = {}
        for i, j, d in zip(*near_pairs(hashes, config.hamming_threshold)):
            a, b = reps[i], reps[j]
            winner, loser = (a, b) if _member_rank(a) < _member_rank(b) else (b, a)
            candidate = (winner.neg_pixels, winner.key, int(d))
            if loser.key not in best_parent or candidate < best_parent[loser.key]:
                best_parent[loser.key] = candidate
        for loser, (_, winner, d) in best_parent.items():
            detail = _near_detail(d, config.hamming_threshold, winner)
            links.append((winner, Link(loser, RejectReason.NEAR_DUPLICATE.value, detail, True)))
    if not config.near:
        return {link.key: Decision(link.reason, pointer, link.detail) for pointer, link in links}
    return resolve_links(links, config.max_survivor_rounds)


# --------------------------------------------------------------------------- Beam


class DedupOutputs(NamedTuple):
    kept: beam.PCollection
    rejects: beam.PCollection


_NS = Stage.DEDUP.value

# Elements that cross a shuffle are plain tuples of str/int/bool/bytes: Beam's
# fast coder encodes those natively but pickles NamedTuples (3x slower). The
# NamedTuples above name the fields; `Link._make(t)` etc. rebuild them.
#
# Keyed shuffles of one element per record cost ~30 us per element on
# FnApiRunner, so records, sha256 members and pointers are batched on the
# worker (`beam.BatchElements`) and shuffled as one chunk per (batch, key
# partition); each partition then does its join or grouping in memory, holding
# about N / key_partitions entries, streaming its chunks twice.


def key_partition(key: str, partitions: int) -> int:
    """Stable partition of a string key (CRC-32; Python's hash() is salted per process)."""
    return zlib.crc32(key.encode()) % partitions


class _Chunk(beam.DoFn):
    """A batch of tuples -> `(partition, (tag, [tuples]))`, one element per
    partition present in the batch; the partition is that of `t[key_index]`."""

    def __init__(self, tag: str, key_index: int, partitions: int):
        self.tag = tag
        self.key_index = key_index
        self.partitions = partitions

    def process(self, batch: list[tuple]):
        by_partition: dict[int, list[tuple]] = {}
        for element in batch:
            by_partition.setdefault(key_partition(element[self.key_index], self.partitions), []).append(element)
        for partition, elements in by_partition.items():
            yield partition, (self.tag, elements)


def _chunked(pcoll, label: str, tag: str, key_index: int, config: DedupConfig):
    return (
        pcoll
        | f"Batch{label}" >> beam.BatchElements(min_batch_size=config.batch_size, max_batch_size=config.batch_size)
        | f"Chunk{label}" >> beam.ParDo(_Chunk(tag, key_index, config.key_partitions))
    )


def _tagged(chunks: Iterable[tuple[str, list]], tag: str) -> Iterator[tuple]:
    for chunk_tag, elements in chunks:
        if chunk_tag == tag:
            yield from elements


def _row(record: SampleRecord) -> tuple[str, bytes, str | None, int, str | None]:
    """Record -> `(key, record JSON, sha256, neg_pixels, phash)`: primitives,
    so batches of rows are cheap to encode (Beam pickles pydantic models, and
    samples whole batches to estimate their size)."""
    if record.phash is not None:
        try:
            phash_to_int(record.phash)
        except ValueError as error:  # fail here, naming the record, rather than deep in a batch
            raise ValueError(f"dedup: record {record.key!r}: {error}") from None
    # exclude_defaults: validation restores every default, so the round trip is exact.
    record_json = record.model_dump_json(exclude_defaults=True).encode()
    return record.key, record_json, record.image_sha256, -record.pixels, record.phash


class _Split(beam.DoFn):
    """A batch of rows (see `_row`) -> chunks for the shuffles that follow:
    `(key partition, ("record", [(key, record JSON)]))` for the join (main),
    `(sha256 partition, ("exact", [(sha256, neg_pixels, key, phash)]))` for exact
    dedup, and a list of `(neg_pixels, key, phash)` straight to near dedup for
    records without a sha256 (or all of them when exact is off)."""

    EXACT = "exact"
    NEAR = "near"

    def __init__(self, exact: bool, near: bool, key_partitions: int):
        self.exact = exact
        self.near = near
        self.partitions = key_partitions

    def setup(self):
        self.missing_sha = Metrics.counter(_NS, "missing_sha256")
        self.missing_phash = Metrics.counter(_NS, "missing_phash")

    def process(self, batch: list[tuple]):
        records: dict[int, list] = {}
        exact: dict[int, list] = {}
        near = []
        for key, record_json, sha, neg_pixels, phash in batch:
            records.setdefault(key_partition(key, self.partitions), []).append((key, record_json))
            if not self.near:
                phash = None
            elif phash is None:
                self.missing_phash.inc()
            if self.exact and sha is not None:
                exact.setdefault(key_partition(sha, self.partitions), []).append((sha, neg_pixels, key, phash))
            else:
                if self.exact:
                    self.missing_sha.inc()
                if phash is not None:
                    near.append((neg_pixels, key, phash))
        for partition, chunk in records.items():
            yield partition, ("record", chunk)
        for partition, chunk in exact.items():
            yield beam.pvalue.TaggedOutput(self.EXACT, (partition, ("exact", chunk)))
        if near:
            yield beam.pvalue.TaggedOutput(self.NEAR, near)


class _ExactSurvivors(beam.DoFn):
    """One sha256 partition -> a list of the best member of each sha256 (main
    output; those with a pHash) and `(survivor, link)` for every other copy. Holds one entry
    per distinct sha256 in the partition (a sha256 with millions of copies
    costs one)."""

    LINKS = "links"

    def setup(self):
        self.dropped = Metrics.counter(_NS, "exact_duplicates")

    def process(self, element):
        _, chunks = element
        best: dict[str, tuple] = {}
        for sha, neg_pixels, key, phash in _tagged(chunks, "exact"):
            member = (neg_pixels, key, phash)
            if sha not in best or _member_rank(member) < _member_rank(best[sha]):
                best[sha] = member
        for sha, neg_pixels, key, phash in _tagged(chunks, "exact"):
            survivor = best[sha][1]
            if key != survivor:
                self.dropped.inc()
                link = Link(key, RejectReason.EXACT_DUPLICATE.value, _EXACT_DETAIL.format(survivor=survivor), False)
                yield beam.pvalue.TaggedOutput(self.LINKS, (survivor, tuple(link)))
        survivors = [member for member in best.values() if member[2] is not None]
        if survivors:
            yield survivors


class _BandChunks(beam.DoFn):
    """A batch of member lists -> one chunk per (band, partition): the bucket
    key `band * partitions_per_band + partition` and (hashes, neg_pixels, key
    blob, key ends), all bytes (numbers little-endian; see `KeyBlob`).

    Identical hashes in the batch are collapsed first (local pre-aggregation):
    only the best copy goes on; each other copy is emitted (tagged `pairs`) as
    `(loser key, (winner neg_pixels, winner key, 0))`, like a near pair.
    """

    PAIRS = "pairs"

    def __init__(self, threshold: int, partitions_per_band: int):
        self.threshold = threshold
        self.partitions = partitions_per_band

    def setup(self):
        self.identical = Metrics.counter(_NS, "identical_phash")

    def process(self, batch: list[list[tuple]]):
        members = [m for chunk in batch for m in chunk]
        if not members:  # BatchElements may flush an empty batch before an oversized list
            return
        layout = band_layout(self.threshold)
        hashes = phashes_to_array(m[2] for m in members)
        neg_pixels = np.fromiter((m[0] for m in members), dtype=np.int64, count=len(members))
        keys = [m[1] for m in members]
        keep, losers = collapse_identical(hashes, neg_pixels, keys)
        for loser, winner in losers:
            self.identical.inc()
            yield beam.pvalue.TaggedOutput(self.PAIRS, (keys[loser], (int(neg_pixels[winner]), keys[winner], 0)))
        if losers:
            hashes, neg_pixels, keys = hashes[keep], neg_pixels[keep], [keys[i] for i in keep]
        blob = KeyBlob.of(keys)
        for band in range(layout.bands):
            # Sort the batch by partition once, then cut it into one chunk per partition.
            parts = partition_of(band_values(hashes, layout, band), self.partitions)
            order = np.argsort(parts, kind="stable")
            sorted_parts = parts[order]
            band_hashes = hashes[order].astype("<u8")
            band_neg_pixels = neg_pixels[order].astype("<i8")
            band_keys = blob.take(order)
            key_starts = np.concatenate([[0], band_keys.ends[:-1]])
            cuts = np.concatenate([[0], np.flatnonzero(np.diff(sorted_parts)) + 1, [len(order)]])
            for start, end in zip(cuts[:-1].tolist(), cuts[1:].tolist()):
                first_byte = int(key_starts[start])
                chunk = (
                    band_hashes[start:end].tobytes(),
                    band_neg_pixels[start:end].tobytes(),
                    band_keys.data[first_byte : int(band_keys.ends[end - 1])].tobytes(),
                    (band_keys.ends[start:end] - first_byte).astype("<i8").tobytes(),
                )
                yield band * self.partitions + int(sorted_parts[start]), chunk


class _NearPairs(beam.DoFn):
    """One (band, partition) bucket -> `(loser key, (winner neg_pixels, winner
    key, distance))` for each near pair first found in this band.

    Identical hashes (from different batches) are collapsed to their best copy
    first; the band-0 bucket, where identical hashes first agree, emits the
    other copies as distance-0 pairs.
    """

    def __init__(self, threshold: int, partitions_per_band: int):
        self.threshold = threshold
        self.partitions = partitions_per_band

    def setup(self):
        self.pairs = Metrics.counter(_NS, "near_pairs")
        self.identical = Metrics.counter(_NS, "identical_phash")
        self.bucket_size = Metrics.distribution(_NS, "lsh_partition_size")

    def process(self, element):
        bucket, chunks = element
        chunks = list(chunks)
        band = bucket // self.partitions
        hashes = np.frombuffer(b"".join(c[0] for c in chunks), dtype="<u8").astype(np.uint64)
        neg_pixels = np.frombuffer(b"".join(c[1] for c in chunks), dtype="<i8")
        keys = KeyBlob.concat([KeyBlob.from_bytes(c[2], c[3]) for c in chunks])
        self.bucket_size.update(len(keys))
        keep, losers = collapse_identical(hashes, neg_pixels, keys)
        if losers:
            if band == 0:
                self.identical.inc(len(losers))
                for loser, winner in losers:
                    yield keys[loser], (int(neg_pixels[winner]), keys[winner], 0)
            hashes, neg_pixels, keys = hashes[keep], neg_pixels[keep], keys.take(keep)
        i, j, dist = pairs_in_partition(hashes, band, band_layout(self.threshold), self.threshold)
        self.pairs.inc(len(i))
        for a, b, d in zip(i.tolist(), j.tolist(), dist.tolist()):
            rank_a, rank_b = (int(neg_pixels[a]), keys[a]), (int(neg_pixels[b]), keys[b])
            winner, loser = (rank_a, rank_b) if rank_a < rank_b else (rank_b, rank_a)
            yield loser[1], (winner[0], winner[1], d)


class _NearLink(beam.DoFn):
    """(loser, best parent) -> the loser's `(pointer, link)` and its initial
    table entry."""

    TABLE = "table"

    def __init__(self, threshold: int):
        self.threshold = threshold

    def process(self, element):
        loser, (_, winner, distance) = element
        detail = _near_detail(distance, self.threshold, winner)
        yield winner, tuple(Link(loser, RejectReason.NEAR_DUPLICATE.value, detail, True))
        yield beam.pvalue.TaggedOutput(self.TABLE, (loser, tuple(TableEntry(winner, False))))


class _Jump(beam.DoFn):
    """One pointer-jumping round for one partition of the pointer space: its
    table entries (keyed by node) and the links pointing into it (see
    `jump_link`). Resolved table entries are carried forward."""

    def process(self, element):
        _, chunks = element
        table: dict[str, TableEntry] = {}
        for key, entry in _tagged(chunks, "table"):
            if key in table:
                raise ValueError(f"dedup: key {key!r} is dropped twice; sample keys must be unique")
            table[key] = TableEntry._make(entry)
        for key, entry in table.items():
            if entry.resolved:
                yield beam.pvalue.TaggedOutput("table", (key, tuple(entry)))
        for pointer, link in _tagged(chunks, "links"):
            for tag, (key, value) in jump_link(pointer, table.get(pointer), Link._make(link)):
                value = (key, tuple(value))
                yield value if tag == "decision" else beam.pvalue.TaggedOutput(tag, value)


class _Unresolved(beam.DoFn):
    """Links still pending after the last round: dropped without a survivor."""

    def __init__(self, rounds: int):
        self.rounds = rounds

    def setup(self):
        self.counter = Metrics.counter(_NS, "unresolved_survivor_chains")

    def process(self, element):
        link = Link._make(element[1])
        self.counter.inc()
        logger.error(
            "dedup: no survivor found for %s within %d pointer-jumping rounds; raise max_survivor_rounds",
            link.key,
            self.rounds,
        )
        yield link.key, tuple(unresolved(link, self.rounds))


def _exact_decision(pointer_link: tuple[str, tuple]) -> tuple[str, tuple]:
    """Exact only: every sha-survivor is kept, so the pointer is the survivor."""
    pointer, link = pointer_link
    link = Link._make(link)
    return link.key, tuple(Decision(link.reason, pointer, link.detail))


class _Join(beam.DoFn):
    """One key partition: its records (as JSON) and decisions -> kept records,
    or rejections. Holds the partition's decisions and keys."""

    def __init__(self):
        self._metrics: StageMetrics | None = None

    def setup(self):
        self._metrics = StageMetrics(Stage.DEDUP)

    def process(self, element):
        _, chunks = element
        decisions: dict[str, Decision] = {}
        for key, decision in _tagged(chunks, "decision"):
            if key in decisions:
                raise ValueError(f"dedup: key {key!r} has two decisions; sample keys must be unique")
            decisions[key] = Decision._make(decision)
        seen: set[str] = set()
        for key, record_json in _tagged(chunks, "record"):
            if key in seen:
                raise ValueError(
                    f"dedup: key {key!r} appears in two records; sample keys must be unique "
                    "(check the read stage's key assignment)"
                )
            seen.add(key)
            record = SampleRecord.model_validate_json(record_json)
            decision = decisions.get(key)
            if decision is None:
                self._metrics.kept.inc()
                yield record
                continue
            reason = RejectReason(decision.reason)
            self._metrics.dropped(reason).inc()
            drop = Drop(reason=reason, detail=decision.detail, duplicate_of=decision.survivor)
            yield beam.pvalue.TaggedOutput(REJECTS, rejection(record, Stage.DEDUP, drop))
        missing = set(decisions) - seen
        if missing:
            raise ValueError(f"dedup: decisions for keys without a record: {sorted(missing)[:5]}")


class Deduplicate(beam.PTransform):
    """PCollection[SampleRecord] -> DedupOutputs(kept, rejects).

    Drops exact (same `image_sha256`) and near (`phash` within
    `config.hamming_threshold` bits) duplicates across the whole PCollection;
    see the module docstring for the rules, the survivor rank and the cost.
    Rejections carry `duplicate_of` = the kept survivor's key. Counters (namespace
    `dedup`): `kept`, `dropped_<reason>`, `exact_duplicates`, `identical_phash`,
    `near_pairs`, `missing_sha256`, `missing_phash`, `unresolved_survivor_chains`;
    distribution `lsh_partition_size`.
    """

    def __init__(self, config: DedupConfig | None = None, label: str | None = None):
        super().__init__(label)
        self.config = config or DedupConfig()
        band_layout(self.config.hamming_threshold)  # validate early

    def expand(self, records):
        cfg = self.config
        if not (cfg.exact or cfg.near):
            empty = records.pipeline | "NoRejects" >> beam.Create([])
            return DedupOutputs(records, empty)

        split = (
            records
            | "Rows" >> beam.Map(_row)
            | "BatchRows" >> beam.BatchElements(min_batch_size=cfg.batch_size, max_batch_size=cfg.batch_size)
            | "Split"
            >> beam.ParDo(_Split(cfg.exact, cfg.near, cfg.key_partitions)).with_outputs(
                _Split.EXACT, _Split.NEAR, main="record_chunks"
            )
        )
        link_sets, table_sets = [], []
        near_input = [split[_Split.NEAR]]

        if cfg.exact:
            exact = (
                split[_Split.EXACT]
                | "GroupByShaPartition" >> beam.GroupByKey()
                | "ExactSurvivors" >> beam.ParDo(_ExactSurvivors()).with_outputs(_ExactSurvivors.LINKS, main="survivors")
            )
            link_sets.append(exact[_ExactSurvivors.LINKS])
            near_input.append(exact.survivors)

        if cfg.near:
            chunks = (
                near_input
                | "FlattenNearInput" >> beam.Flatten()
                | "BatchForBands"
                >> beam.BatchElements(min_batch_size=cfg.batch_size, max_batch_size=cfg.batch_size, element_size_fn=len)
                | "BandChunks"
                >> beam.ParDo(_BandChunks(cfg.hamming_threshold, cfg.partitions_per_band)).with_outputs(
                    _BandChunks.PAIRS, main="chunks"
                )
            )
            near_pairs_found = (
                chunks.chunks
                | "GroupByBandPartition" >> beam.GroupByKey()
                | "NearPairs" >> beam.ParDo(_NearPairs(cfg.hamming_threshold, cfg.partitions_per_band))
            )
            near = (
                (chunks[_BandChunks.PAIRS], near_pairs_found)
                | "FlattenPairs" >> beam.Flatten()
                | "BestParent" >> beam.CombinePerKey(min)
                | "NearLinks" >> beam.ParDo(_NearLink(cfg.hamming_threshold)).with_outputs(_NearLink.TABLE, main="links")
            )
            link_sets.append(near.links)
            table_sets.append(near[_NearLink.TABLE])

        links = link_sets | "FlattenLinks" >> beam.Flatten()
        if cfg.near:
            decision_sets, leftover = self._resolve(links, table_sets)
            decision_sets.append(leftover | "Unresolved" >> beam.ParDo(_Unresolved(cfg.max_survivor_rounds)))
            decisions = decision_sets | "FlattenDecisions" >> beam.Flatten()
        else:
            decisions = links | "ExactDecisions" >> beam.Map(_exact_decision)

        joined = (
            (
                split.record_chunks,
                _chunked(decisions, "Decisions", "decision", 0, cfg),
            )
            | "FlattenForJoin" >> beam.Flatten()
            | "GroupByKeyPartition" >> beam.GroupByKey()
            | "Decide" >> beam.ParDo(_Join()).with_outputs(REJECTS, main="kept")
        )
        return DedupOutputs(joined.kept, joined[REJECTS])

    def _resolve(self, links, table_sets):
        """`max_survivor_rounds` pointer-jumping rounds; returns the decision
        PCollections and the links still pending."""
        cfg = self.config
        table = table_sets | "FlattenTable" >> beam.Flatten()
        decisions = []
        for round_ in range(1, cfg.max_survivor_rounds + 1):
            step = (
                (
                    _chunked(table, f"Table{round_}", "table", 0, cfg),
                    _chunked(links, f"Links{round_}", "links", 0, cfg),
                )
                | f"FlattenRound{round_}" >> beam.Flatten()
                | f"GroupByPointerPartition{round_}" >> beam.GroupByKey()
                | f"Jump{round_}" >> beam.ParDo(_Jump()).with_outputs("link", "table", main="decision")
            )
            decisions.append(step.decision)
            links, table = step.link, step.table
        return decisions, links


__all__ = [
    "DedupItem",
    "DedupOutputs",
    "Decision",
    "Deduplicate",
    "ImageDigest",
    "band_layout",
    "compute_phash",
    "digest_image",
    "hamming",
    "max_chain_links",
    "near_pairs",
    "pairs_in_partition",
    "phash_to_int",
    "phashes_to_array",
    "plan_dedup",
    "rank",
    "resolve_links",
    "sha256_hex",
]

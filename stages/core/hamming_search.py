"""Finding every pair of 64-bit hashes within a Hamming threshold without
comparing all pairs; the candidate search of near-duplicate dedup. Plain Python
and numpy, no Beam: `stages/dedup.py` runs it per shuffle partition,
`near_pairs` runs it in memory.

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
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np

from stages.core.phash import PHASH_BITS

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

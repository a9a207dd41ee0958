"""Shared builders of the dedup tests: planted hashes, items, records, chains."""

from __future__ import annotations

import math

import numpy as np

from schemas import Provenance, RejectReason, SampleRecord
from stages.core.dedup_plan import DedupItem
from stages.core.phash import phash_to_int


def planted_hashes(rng, n, threshold, clusters=True):
    """Random hashes, a third of them with a partner 0..threshold+2 bits away,
    plus (optionally) tight clusters, so pairs exist on both sides of the threshold."""
    hashes = rng.integers(0, 2**64, size=n, dtype=np.uint64)
    for k in range(0, n - 1, 3):
        flips = rng.choice(64, size=int(rng.integers(0, threshold + 3)), replace=False)
        hashes[k + 1] = hashes[k] ^ np.uint64(sum(1 << int(b) for b in flips))
    if clusters:
        for k in range(0, n - 8, 97):
            for m in range(1, 6):
                flips = rng.choice(64, size=int(rng.integers(0, threshold + 1)), replace=False)
                hashes[k + m] = hashes[k] ^ np.uint64(sum(1 << int(b) for b in flips))
    return hashes


def brute_force(hashes, threshold):
    dist = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    i, j = np.nonzero(np.triu(dist <= threshold, 1))
    return {(int(a), int(b)): int(dist[a, b]) for a, b in zip(i, j)}


def item(key, pixels, sha=None, phash=None):
    return DedupItem(key, pixels, sha, phash)


def drops(decisions):
    return {k: (d.reason, d.survivor) for k, d in decisions.items()}


EXACT, NEAR = RejectReason.EXACT_DUPLICATE.value, RejectReason.NEAR_DUPLICATE.value


def flip(phash: str, *bits: int) -> str:
    value = phash_to_int(phash)
    for b in bits:
        value ^= 1 << b
    return f"{value:016x}"


BASE = "9f3c1a7e5b2d4c60"


def kept_pairs_within(items, decisions, threshold):
    kept = [i for i in items if i.key not in decisions and i.phash is not None]
    hashes = np.array([phash_to_int(i.phash) for i in kept], dtype=np.uint64)
    return len(brute_force(hashes, threshold)) if len(kept) else 0


def random_items(rng, n, threshold):
    """Items whose sha ids are drawn with repeats (exact copies share the pHash,
    as equal bytes do), over hashes with planted near pairs; some items have an
    identical pHash under other bytes, no pHash, or no sha."""
    hashes = planted_hashes(rng, n, threshold)
    sha_ids = rng.integers(0, int(n * 0.9), size=n)
    out = []
    for i in range(n):
        source = sha_ids[i - 1] if i % 41 == 1 else sha_ids[i]
        phash = None if i % 53 == 0 else f"{int(hashes[source]):016x}"
        sha = None if i % 61 == 0 else f"sha{sha_ids[i]}"
        out.append(item(f"k{i:05d}", int(rng.integers(1, 5)) ** 2 * 100, sha, phash))
    return out


def record(it: DedupItem) -> SampleRecord:
    side = math.isqrt(it.pixels)
    assert side * side == it.pixels, "test records use square images"
    return SampleRecord(
        key=it.key,
        url=f"https://example.com/{it.key}.jpg",
        caption_original="a caption",
        original_width=side,
        original_height=it.pixels // side if side else None,
        image_sha256=it.sha256,
        phash=it.phash,
        provenance=Provenance(source_file="part-0.parquet", source_row=int(it.key[1:]) if it.key[1:].isdigit() else 0),
    )


def chain_items(length):
    """A chain of records, each 4 bits from the previous and 8 from the one
    before that; ranks decrease along the chain, so k{i} points at k{i-1}."""
    hashes, current, bit = [], BASE, 0
    for _ in range(length):
        hashes.append(current)
        current = flip(current, bit, bit + 1, bit + 2, bit + 3)
        bit += 4
    return [item(f"k{i:02d}", (20 - i) ** 2, f"s{i}", h) for i, h in enumerate(hashes)]

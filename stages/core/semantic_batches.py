"""Batches of embeddings on their way to the block-pair shuffle of semantic
dedup, without Beam: key hashes, a batch's cluster memberships, and the
chunks that cross the shuffle (`stages/semantic_dedup.py` runs these).

A batch is (keys, clip_similarities, pixels int64 [n], float16 [n, D]). A
chunk is the part of one batch that goes to one block pair (cluster, i, j),
packed as (keys, one bytes record array of block, primary flag, pixels,
clip_similarity (NaN for None) and the float16 vector), so that a runner's
coder copies one bytes object per chunk instead of pickling an array per field.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import numpy as np

from stages.core.semantic import Assignment, block_count


def key_hashes(keys: list[str]) -> np.ndarray:
    """CRC-32 of each key (as `block_of` and the embeddings partitions hash them): uint32 [n]."""
    return np.array([zlib.crc32(key.encode()) for key in keys], dtype=np.uint32)


def memberships(n: int, found: Assignment) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, cluster, is_primary) of every membership of a batch of n rows."""
    rows = np.concatenate([np.arange(n), found.extra_rows])
    clusters = np.concatenate([found.primary, found.extra_clusters])
    is_primary = np.concatenate([np.ones(n, dtype=bool), np.zeros(len(found.extra_rows), dtype=bool)])
    return rows, clusters, is_primary


def _chunk_dtype(dim: int) -> np.dtype:
    return np.dtype(
        [("block", "<i4"), ("primary", "u1"), ("pixels", "<i8"), ("clip", "<f8"), ("vector", "<f2", (dim,))]
    )


def pack_chunk(block, is_primary, keys: list[str], clip: list, pixels, x: np.ndarray) -> tuple[list[str], bytes]:
    """Members of one block pair -> (keys, one bytes record array): what
    crosses the block-pair shuffle, so Beam's coder copies one bytes object
    per chunk instead of pickling an array per field (clip None -> NaN)."""
    packed = np.empty(len(keys), dtype=_chunk_dtype(x.shape[1]))
    packed["block"] = block
    packed["primary"] = is_primary
    packed["pixels"] = pixels
    packed["clip"] = [np.nan if c is None else c for c in clip]
    packed["vector"] = x
    return keys, packed.tobytes()


def unpack_chunks(chunks) -> tuple[np.ndarray, np.ndarray, list[str], list, np.ndarray, np.ndarray]:
    """[(keys, bytes)] -> (block, is_primary, keys, clip_similarities, pixels, float16 [n, D])."""
    keys = [k for chunk_keys, _ in chunks for k in chunk_keys]
    blob = b"".join(data for _, data in chunks)
    if not keys:
        return (np.zeros(0, np.int64), np.zeros(0, bool), [], [], np.zeros(0, np.int64), np.zeros((0, 0), np.float16))
    dim = (len(blob) // len(keys) - _chunk_dtype(0).itemsize) // 2
    packed = np.frombuffer(blob, dtype=_chunk_dtype(dim))
    clip = [None if np.isnan(c) else c for c in packed["clip"].tolist()]
    return (
        packed["block"].astype(np.int64),
        packed["primary"].astype(bool),
        keys,
        clip,
        packed["pixels"],
        packed["vector"],
    )


def to_chunks(batch: tuple, rows, clusters, is_primary, sizes: np.ndarray, max_cluster_size: int) -> Iterator[tuple]:
    """A batch's memberships -> ((cluster, i, j), packed chunk) for every
    block pair they take part in: one pair (0, 0) in a cluster that fits a
    worker, else a member of block b goes to (min(b, o), max(b, o)) for every
    block o of its cluster (`semantic.block_count`, `block_of`)."""
    keys, clip, pixels, x = batch
    present = np.unique(clusters)
    # (A count pass on another machine could break a tie the other way: a cluster it missed counts as small.)
    blocks_of = {
        int(c): block_count(int(sizes[c]) if c < len(sizes) else 1, max_cluster_size) for c in present
    }
    blocks = np.array([blocks_of[c] for c in clusters.tolist()], dtype=np.int64)
    block = np.zeros(len(rows), dtype=np.int64)
    split = np.flatnonzero(blocks > 1)
    if len(split):
        hashes = key_hashes([keys[r] for r in rows[split].tolist()]).astype(np.int64)
        block[split] = hashes % blocks[split]  # semantic.block_of, for arrays
    member = np.repeat(np.arange(len(rows)), blocks)
    other = np.arange(len(member)) - np.repeat(np.cumsum(blocks) - blocks, blocks)
    low = np.minimum(block[member], other)
    high = np.maximum(block[member], other)
    cluster = clusters[member]
    order = np.lexsort((high, low, cluster))
    member, cluster, low, high = member[order], cluster[order], low[order], high[order]
    change = np.flatnonzero((np.diff(cluster) != 0) | (np.diff(low) != 0) | (np.diff(high) != 0)) + 1
    for part in np.split(np.arange(len(member)), change):
        if not len(part):
            continue
        m = member[part]
        r = rows[m]
        r_list = r.tolist()
        yield (
            (int(cluster[part[0]]), int(low[part[0]]), int(high[part[0]])),
            pack_chunk(block[m], is_primary[m], [keys[i] for i in r_list], [clip[i] for i in r_list], pixels[r], x[r]),
        )

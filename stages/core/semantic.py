"""Semantic deduplication by image embeddings (SemDeDup), without Beam.

Abbas et al., "SemDeDup: Data-efficient learning at web-scale through semantic
deduplication" (2023): cluster the L2-normalised CLIP image embeddings with
k-means, and within each cluster treat pairs whose cosine similarity is at
least a threshold as duplicates. NeMo Curator's `SemDedup` does the same.

The pieces, each plain numpy (the Beam wiring is `stages/semantic_dedup.py`):

* `kmeans`: spherical k-means (cosine) on a sample; `assign`: every embedding
  to its most similar centroid. Only pairs inside one cluster are compared, so
  a duplicate pair split across two clusters is missed (measured against
  brute force in `benchmarks/semantic_bench.py`).
* `block_count` / `block_of`: a cluster larger than `max_cluster_size` is cut
  by key hash into blocks of `max_cluster_size / 4` embeddings on average;
  every pair of blocks (a block with itself included) is compared by one
  worker, so a worker holds `max_cluster_size / 2` embeddings on average and
  every pair inside the cluster is still compared exactly once. (Hash blocks
  vary by about the square root of their size: with a bound of thousands, the
  chance that a block pair reaches twice its mean is nil; the `block_rows`
  distribution reports the largest seen.)
* `block_links`: the pairs of one block pair with cosine >= threshold, found
  by matrix products of `batch_rows` rows at a time (no Python loop over
  pairs), reduced as they come to (a) one link per node to a representative
  of its connected component and (b) each node's most similar neighbour. So a
  flood of identical images costs O(n) memory, not O(n**2) pairs.
* `groups`: connected components over the links of a cluster, and the
  survivor of each by `rank`: highest `clip_similarity`, then most decoded
  pixels, then smallest key. Every other member is a `semantic_duplicate`.

Dropping a whole connected component but its best member is transitive: in a
chain A~B~C with A !~ C, C is dropped in favour of A. Each drop names its
survivor and the cosine to its most similar neighbour (the survivor itself in
the usual star-shaped group).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np


def normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, as float32 (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def assign(embeddings: np.ndarray, centroids: np.ndarray, batch_rows: int = 8192) -> np.ndarray:
    """Index of the most similar (cosine) centroid for each row: int64 [N].
    `embeddings` [N, D] and `centroids` [K, D] are assumed L2-normalised."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    centroids = np.asarray(centroids, dtype=np.float32)
    out = np.empty(len(embeddings), dtype=np.int64)
    for start in range(0, len(embeddings), batch_rows):
        sims = embeddings[start : start + batch_rows] @ centroids.T  # [b, K]
        out[start : start + batch_rows] = np.argmax(sims, axis=1)
    return out


def kmeans(sample: np.ndarray, clusters: int, *, iterations: int = 10, seed: int = 0) -> np.ndarray:
    """Spherical k-means (Lloyd's iterations on the unit sphere): L2-normalised
    centroids float32 [min(clusters, N), D] of the rows of `sample` [N, D].

    Seeded by k-means++ (Arthur & Vassilvitskii 2007) with the cosine
    distance 1 - cos, on at most 16 * clusters of the rows; a centroid that loses all its members is re-seeded with
    the row least similar to its own centroid. Deterministic for a given
    sample, `seed` and row order."""
    x = normalise(sample)
    if len(x) == 0:
        raise ValueError("k-means needs at least one embedding")
    k = min(clusters, len(x))
    rng = np.random.default_rng(seed)
    # k-means++ seeding is k sequential passes: seed from at most 16 rows per centroid.
    seeding = x if len(x) <= 16 * k else x[np.sort(rng.choice(len(x), 16 * k, replace=False))]
    centroids = _kmeans_plus_plus(seeding, k, rng)
    for _ in range(iterations):
        labels = assign(x, centroids)
        sums = _cluster_sums(x, labels, k)
        counts = np.bincount(labels, minlength=k)
        empty = np.flatnonzero(counts == 0)
        if len(empty):
            fit = np.einsum("ij,ij->i", x, centroids[labels])  # each row's similarity to its centroid
            worst = np.argsort(fit)[: len(empty)]
            sums[empty] = x[worst]
        new = normalise(sums)
        if np.allclose(new, centroids, atol=1e-6):
            centroids = new
            break
        centroids = new
    return centroids


def _cluster_sums(x: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Sum of the rows of each cluster, [k, D] (a sparse one-hot product; np.add.at is ~50x slower)."""
    from scipy.sparse import csr_matrix

    onehot = csr_matrix((np.ones(len(x), dtype=np.float32), (labels, np.arange(len(x)))), shape=(k, len(x)))
    return np.asarray(onehot @ x, dtype=np.float32)


def _kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    chosen = [int(rng.integers(len(x)))]
    distance = np.maximum(1.0 - x @ x[chosen[0]], 0.0)  # [N] to the nearest chosen centroid
    for _ in range(1, k):
        total = float(distance.sum())
        if total <= 0:  # fewer distinct rows than k: take unused rows
            unused = np.setdiff1d(np.arange(len(x)), chosen)
            chosen.extend(unused[: k - len(chosen)].tolist())
            break
        pick = int(np.searchsorted(np.cumsum(distance), rng.uniform(0, total)))
        pick = min(pick, len(x) - 1)
        chosen.append(pick)
        np.minimum(distance, np.maximum(1.0 - x @ x[pick], 0.0), out=distance)
    return x[chosen].copy()


# ----------------------------------------------------------------- splitting big clusters


def block_count(size: int, max_cluster_size: int) -> int:
    """Blocks a cluster of `size` embeddings is cut into: 1 when it fits one
    worker, else blocks of `max_cluster_size / 4` on average, so a pair of
    blocks holds half the bound on average and stays under it despite the
    spread of hash blocks."""
    if max_cluster_size < 4:
        raise ValueError("max_cluster_size must be >= 4")
    if size <= max_cluster_size:
        return 1
    return -(-size // (max_cluster_size // 4))


def block_of(key: str, blocks: int) -> int:
    """The block a sample falls in (a stable hash of its key)."""
    return zlib.crc32(key.encode()) % blocks if blocks > 1 else 0


def block_pairs(block: int, blocks: int) -> list[tuple[int, int]]:
    """The (i <= j) block pairs a member of `block` takes part in."""
    return [(min(block, other), max(block, other)) for other in range(blocks)]


# ----------------------------------------------------------------- pairs inside a block pair


class BlockLinks(NamedTuple):
    """What one block pair contributes: `root[i]` is a node of the same
    component as node i (i itself when i has no neighbour here);
    `best_sim[i]` / `best[i]` its most similar neighbour (-inf / -1 when none
    reaches the threshold); `compared` the number of pairs compared. Nodes are
    the rows of A then (unless `same`) the rows of B."""

    root: np.ndarray
    best_sim: np.ndarray
    best: np.ndarray
    compared: int


def _components(n: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """For each node, the smallest node index of its connected component."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(u), dtype=np.int8), (u, v)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    first = np.full(labels.max() + 1 if n else 0, n, dtype=np.int64)
    np.minimum.at(first, labels, np.arange(n))
    return first[labels]


def block_links(
    a: np.ndarray, b: np.ndarray | None, threshold: float, *, batch_rows: int = 1024
) -> BlockLinks:
    """Pairs with cosine >= `threshold` between the rows of `a` [Na, D] and
    `b` [Nb, D] (or among the rows of `a` when `b` is None), by matrix products
    of `batch_rows` rows of `a` at a time. Rows must be L2-normalised (float16
    or float32; products are computed in float32)."""
    a = np.asarray(a, dtype=np.float32)
    same = b is None
    b = a if same else np.asarray(b, dtype=np.float32)
    na, nb = len(a), len(b)
    offset = 0 if same else na
    n = na if same else na + nb
    root = np.arange(n, dtype=np.int64)
    best_sim = np.full(n, -np.inf, dtype=np.float32)
    best = np.full(n, -1, dtype=np.int64)
    compared = na * (na - 1) // 2 if same else na * nb
    for start in range(0, na, batch_rows):
        sims = a[start : start + batch_rows] @ b.T  # [r, Nb] cosine
        rows = np.arange(start, start + len(sims))
        if same:
            sims[np.arange(len(sims)), rows] = -np.inf  # not a pair with itself
        # Each row's most similar column, and each column's most similar row.
        col = np.argmax(sims, axis=1)
        row_best = sims[np.arange(len(sims)), col]
        better = row_best > best_sim[rows]
        best_sim[rows[better]] = row_best[better]
        best[rows[better]] = col[better] + offset
        if not same:
            row = np.argmax(sims, axis=0)
            col_best = sims[row, np.arange(nb)]
            cols = np.arange(nb) + offset
            better = col_best > best_sim[cols]
            best_sim[cols[better]] = col_best[better]
            best[cols[better]] = rows[row[better]]
        i, j = np.nonzero(sims >= threshold)
        if len(i):
            # Merge this batch's edges into the components found so far.
            u = np.concatenate([rows[i], np.arange(n)])
            v = np.concatenate([j + offset, root])
            root = _components(n, u, v)
    below = best_sim < threshold
    best_sim[below] = -np.inf
    best[below] = -1
    return BlockLinks(root, best_sim, best, compared)


# ----------------------------------------------------------------- groups and survivors


def rank(clip_similarity: float | None, pixels: int, key: str) -> tuple[float, int, str]:
    """Survivor sort key, smaller is better: highest `clip_similarity`, then
    most decoded pixels, then smallest key."""
    return (-(clip_similarity if clip_similarity is not None else -np.inf), -pixels, key)


class Node(NamedTuple):
    """A member of some duplicate pair, as the grouping step sees it."""

    key: str
    clip_similarity: float | None
    pixels: int
    root: str  # a key of the same component (itself if unknown)
    neighbour: str | None  # most similar other member
    similarity: float  # cosine to `neighbour`


class Duplicate(NamedTuple):
    """One drop: `key` loses to `survivor`; `similarity` is its cosine to
    `neighbour`, its most similar member of the group; `group_size` counts
    the survivor too."""

    key: str
    survivor: str
    neighbour: str
    similarity: float
    group_size: int


def groups(nodes: Iterable[Node | tuple]) -> list[Duplicate]:
    """Connected components of the nodes' `root` links (several nodes per key
    allowed, one per block pair that saw the key; the best neighbour wins) and
    a Duplicate for every member but the best-ranked one of each component."""
    merged: dict[str, list] = {}
    for node in nodes:
        key, clip_similarity, pixels, root, neighbour, similarity = node
        entry = merged.get(key)
        if entry is None:
            merged[key] = [clip_similarity, pixels, [root], neighbour, similarity]
            continue
        entry[2].append(root)
        if neighbour is not None and (entry[3] is None or similarity > entry[4]):
            entry[3], entry[4] = neighbour, similarity
    keys = sorted(set(merged).union(r for e in merged.values() for r in e[2]))
    index = {k: i for i, k in enumerate(keys)}
    u = np.array([index[k] for k, e in merged.items() for _ in e[2]], dtype=np.int64)
    v = np.array([index[r] for e in merged.values() for r in e[2]], dtype=np.int64)
    labels = _components(len(keys), u, v)
    members: dict[int, list[str]] = {}
    for k, label in zip(keys, labels):
        members.setdefault(int(label), []).append(k)
    out = []
    for group in members.values():
        if len(group) < 2:
            continue
        missing = [k for k in group if k not in merged]
        if missing:
            raise ValueError(f"semantic dedup: group members without their own entry: {missing[:5]}")
        survivor = min(group, key=lambda k: rank(merged[k][0], merged[k][1], k))
        for k in sorted(group):
            if k != survivor:
                _, _, _, neighbour, similarity = merged[k]
                out.append(Duplicate(k, survivor, neighbour, float(similarity), len(group)))
    return out


def nodes_of_block(
    keys: Sequence[str],
    clip_similarities: Sequence[float | None],
    pixels: Sequence[int],
    links: BlockLinks,
) -> list[Node]:
    """The Nodes of a block pair (keys etc. in node order): every node that has
    a neighbour at or above the threshold."""
    out = []
    for i in np.flatnonzero(links.best >= 0):
        out.append(
            Node(
                keys[i],
                clip_similarities[i],
                int(pixels[i]),
                keys[links.root[i]],
                keys[links.best[i]],
                float(links.best_sim[i]),
            )
        )
    return out


def semantic_duplicates(
    keys: Sequence[str],
    embeddings: np.ndarray,
    clip_similarities: Sequence[float | None],
    pixels: Sequence[int],
    threshold: float,
    centroids: np.ndarray | None = None,
) -> list[Duplicate]:
    """The whole method in memory, for tests and small data: cluster by
    `centroids` (one cluster when None), pairs within clusters, groups."""
    embeddings = normalise(embeddings)
    labels = np.zeros(len(keys), dtype=np.int64) if centroids is None else assign(embeddings, centroids)
    out = []
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        links = block_links(embeddings[idx], None, threshold)
        out.extend(
            groups(
                nodes_of_block(
                    [keys[i] for i in idx], [clip_similarities[i] for i in idx], [pixels[i] for i in idx], links
                )
            )
        )
    return out


def brute_force_pairs(embeddings: np.ndarray, threshold: float, batch_rows: int = 2048) -> set[tuple[int, int]]:
    """Every pair (i < j) with cosine >= threshold, comparing all pairs (the
    reference the benchmark measures recall against)."""
    x = normalise(embeddings)
    pairs = set()
    for start in range(0, len(x), batch_rows):
        sims = x[start : start + batch_rows] @ x.T
        i, j = np.nonzero(sims >= threshold)
        i = i + start
        keep = i < j
        pairs.update(zip(i[keep].tolist(), j[keep].tolist()))
    return pairs

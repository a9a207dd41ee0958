"""Semantic deduplication by image embeddings (SemDeDup), without Beam.

Abbas et al., "SemDeDup: Data-efficient learning at web-scale through semantic
deduplication" (2023): cluster the L2-normalised CLIP image embeddings with
k-means, and within each cluster treat pairs whose cosine similarity is at
least a threshold as duplicates. NeMo Curator's `SemDedup` does the same.
Unlike both, a pair split by a cluster boundary is not lost (below).

The pieces, each plain numpy (the Beam wiring is `stages/semantic_dedup.py`):

* `kmeans`: spherical k-means (cosine) on a sample.
* `assign_with_boundary`: every embedding to its most similar centroid (its
  *primary* cluster) and, as a *secondary* member, to every other cluster c
  whose bisector with the primary centroid p lies within `boundary` of it:
  h_c(x) = (x.p - x.c) / |p - c| <= boundary (h_c is the Euclidean distance
  from x to the hyperplane {y: y.p = y.c}, which separates the two Voronoi
  cells). At most `max_boundary_clusters` secondaries per embedding, the
  nearest bisectors first; an embedding that has more is counted as capped.
* `block_count` / `block_of`: a cluster larger than `max_cluster_size` is cut
  by key hash into blocks of `max_cluster_size / 4` embeddings on average;
  every pair of blocks (a block with itself included) is compared by one
  worker, so a worker holds `max_cluster_size / 2` embeddings on average.
* `block_links`: the pairs of one block pair with cosine >= threshold among
  primary x primary and primary x secondary members (never secondary x
  secondary), found by matrix products of `batch_rows` rows at a time (no
  Python loop over pairs), reduced as they come to (a) one link per node to a
  representative of its connected component and (b) each node's most similar
  neighbour. So a flood of identical images costs O(n) memory, not O(n**2).
* `stages/core/semantic_groups.py`: connected components over the links of
  every cluster, joined across clusters through the embeddings that are
  members of several; the survivor of each component by `rank`: highest
  `clip_similarity`, then most decoded pixels, then smallest key. Every other
  member is a `semantic_duplicate`.
* `semantic_duplicates`: all of it in memory, for tests and small data.

What is guaranteed
------------------
Let a, b be embeddings with cosine s >= threshold t, primary centroids p_a !=
p_b, and w = p_a - p_b. Then h_{p_b}(a) + h_{p_a}(b) = (a - b).w / |w| (a and
b lie on opposite sides of the bisector), and (a - b).w / |w| <= |a - b| =
sqrt(2 (1 - s)). The pair is compared in p_b if h_{p_b}(a) <= boundary (a is a
secondary there, b a primary), or in p_a if h_{p_a}(b) <= boundary. So a pair
is missed only if the component of a - b along p_a - p_b exceeds 2 * boundary:

* boundary >= sqrt(2 (1 - t)) / 2 (0.158 at t = 0.95) compares *every* pair
  at or above the threshold (exhaustive), as long as no embedding is capped;
* with the default 0.05, at t = 0.95 a pair is missed only if more than a
  third (0.1 / 0.316) of its difference vector lies along the one direction
  p_a - p_b. If a - b pointed in a uniformly random direction of D dimensions,
  that component would be ~ N(0, 2 (1 - s) / D): at D = 512 a miss is a
  7-sigma event (probability ~1e-12 per pair). Real near-duplicates (crops,
  re-encodes) are not random directions: raise `boundary` for a stronger
  guarantee at the cost of more secondaries (`benchmarks/semantic_bench.py`
  reports both);
* boundary = 0 is plain SemDeDup: only pairs inside one cluster.

Dropping a whole connected component but its best member is transitive: in a
chain A~B~C with A !~ C, C is dropped in favour of A. Each drop names its
survivor and the cosine to its most similar neighbour (the survivor itself in
the usual star-shaped group). A pair found in two clusters counts once: a
component is a set of keys.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from stages.core.semantic_groups import Duplicate, Node, components, groups_across


_BLAS = None


def one_blas_thread():
    """A context in which numpy's BLAS runs on one thread. The callers are
    Beam DoFns: a runner gets its parallelism from parallel bundles, and
    OpenBLAS's own threads, spinning for a core, made these products 3-10x
    slower on a busy 2-core machine (a 200 x 410 product: 48 ms on two
    threads, 5 ms on one; k-means++ seeding 34 s against 12 s)."""
    global _BLAS
    if _BLAS is None:
        from threadpoolctl import ThreadpoolController

        _BLAS = ThreadpoolController()
    return _BLAS.limit(limits=1, user_api="blas")


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


# ----------------------------------------------------------------- cluster boundaries


class Assignment(NamedTuple):
    """The clusters of a batch of rows: `primary[i]` is row i's most similar
    centroid; row `extra_rows[m]` is also a secondary member of cluster
    `extra_clusters[m]` (ordered by row, then nearest bisector first);
    `capped` counts the rows that had more than `max_boundary_clusters`
    secondaries within the boundary (the farthest were left out)."""

    primary: np.ndarray  # int64 [N]
    extra_rows: np.ndarray  # int64 [M]
    extra_clusters: np.ndarray  # int64 [M]
    capped: int


def assign_with_boundary(
    embeddings: np.ndarray,
    centroids: np.ndarray,
    boundary: float,
    max_boundary_clusters: int,
    batch_rows: int = 8192,
) -> Assignment:
    """Primary and secondary clusters of each row of `embeddings` [N, D]
    (normalised here) for unit `centroids` [K, D]: see the module docstring
    for the rule and what it guarantees. `boundary` <= 0 or
    `max_boundary_clusters` == 0: primaries only."""
    x = normalise(embeddings)
    c = np.asarray(centroids, dtype=np.float32)
    k = len(c)
    rows_per_batch = max(64, min(batch_rows, 2**22 // max(k, 1)))  # a [rows, K] matrix stays <= 16 MiB
    primary = np.empty(len(x), dtype=np.int64)
    extra_rows, extra_clusters = [], []
    capped = 0
    boundary_on = boundary > 0 and max_boundary_clusters > 0 and k > 1
    for start in range(0, len(x), rows_per_batch):
        sims = x[start : start + rows_per_batch] @ c.T  # [b, K] cosine to each centroid
        label = np.argmax(sims, axis=1)
        primary[start : start + len(sims)] = label
        if not boundary_on:
            continue
        best = sims[np.arange(len(sims)), label]
        # h_c = (x.p - x.c) / |p - c| and |p - c| <= 2, so h_c <= boundary needs x.c >= x.p - 2 * boundary.
        r, cl = np.nonzero(sims >= (best - 2 * boundary)[:, None])
        other = cl != label[r]
        r, cl = r[other], cl[other]
        if not len(r):
            continue
        distance = np.sqrt(np.maximum(2.0 - 2.0 * np.einsum("ij,ij->i", c[label[r]], c[cl]), 0.0))  # |p - c|
        h = (best[r] - sims[r, cl]) / np.maximum(distance, 1e-12)  # distance of x from the bisector of p and c
        within = h <= boundary
        r, cl, h = r[within], cl[within], h[within]
        order = np.lexsort((h, r))  # by row, nearest bisector first
        r, cl = r[order], cl[order]
        counts = np.bincount(r, minlength=len(sims))
        capped += int(np.count_nonzero(counts > max_boundary_clusters))
        place = np.arange(len(r)) - np.repeat(np.cumsum(counts) - counts, counts)  # rank within its row
        keep = place < max_boundary_clusters
        extra_rows.append(r[keep] + start)
        extra_clusters.append(cl[keep])
    empty = np.zeros(0, dtype=np.int64)
    return Assignment(
        primary,
        np.concatenate(extra_rows) if extra_rows else empty,
        np.concatenate(extra_clusters) if extra_clusters else empty,
        capped,
    )


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


class _Links:
    """Accumulates the products of one block pair: each node's best
    neighbour, and the edges at or above the threshold, folded into
    component roots whenever more than max(n, 65536) are pending (O(n)
    memory however many pairs match)."""

    def __init__(self, n: int, threshold: float):
        self.n = n
        self.threshold = threshold
        self.root = np.arange(n, dtype=np.int64)
        self.best_sim = np.full(n, -np.inf, dtype=np.float32)
        self.best = np.full(n, -1, dtype=np.int64)
        self.u: list[np.ndarray] = []
        self.v: list[np.ndarray] = []
        self.pending = 0

    def add(self, rows: np.ndarray, cols: np.ndarray, sims: np.ndarray) -> None:
        """`sims` [len(rows), len(cols)]: cosines between nodes `rows` and `cols` (-inf: not a pair)."""
        if not sims.size:
            return
        col = np.argmax(sims, axis=1)  # each row's most similar column ...
        self._better(rows, sims[np.arange(len(rows)), col], cols[col])
        row = np.argmax(sims, axis=0)  # ... and each column's most similar row
        self._better(cols, sims[row, np.arange(len(cols))], rows[row])
        i, j = np.nonzero(sims >= self.threshold)
        if len(i):
            self.u.append(rows[i])
            self.v.append(cols[j])
            self.pending += len(i)
            if self.pending > max(self.n, 1 << 16):
                self._fold()

    def _better(self, nodes: np.ndarray, sims: np.ndarray, partners: np.ndarray) -> None:
        better = sims > self.best_sim[nodes]
        self.best_sim[nodes[better]] = sims[better]
        self.best[nodes[better]] = partners[better]

    def _fold(self) -> None:
        if self.pending <= 64:
            # A few edges (the usual case): merge them one by one; `root` stays flat (root[root[i]] == root[i]).
            root = self.root
            for a, b in zip(np.concatenate(self.u).tolist(), np.concatenate(self.v).tolist()):
                ra, rb = root[a], root[b]
                if ra != rb:
                    root[root == max(ra, rb)] = min(ra, rb)
        else:
            u = np.concatenate([*self.u, np.arange(self.n)])
            v = np.concatenate([*self.v, self.root])
            self.root = components(self.n, u, v)
        self.u, self.v, self.pending = [], [], 0

    def finish(self, compared: int) -> BlockLinks:
        if self.pending:
            self._fold()
        below = self.best_sim < self.threshold
        self.best_sim[below] = -np.inf
        self.best[below] = -1
        return BlockLinks(self.root, self.best_sim, self.best, compared)


def block_links(
    a: np.ndarray,
    b: np.ndarray | None,
    threshold: float,
    *,
    batch_rows: int = 1024,
    a_primary: int | None = None,
    b_primary: int | None = None,
) -> BlockLinks:
    """Pairs with cosine >= `threshold` between the rows of `a` [Na, D] and
    `b` [Nb, D], or among the rows of `a` (each pair once) when `b` is None,
    by matrix products of `batch_rows` rows at a time. Rows are normalised
    here (float16 or float32 in; products in float32).

    The first `a_primary` rows of `a` (all when None) are primary members of
    the cluster and the rest secondary; likewise `b_primary` for `b`. A pair
    of two secondaries is not compared: it is compared in a cluster where one
    of them is primary, if anywhere (see the module docstring)."""
    a = normalise(a)
    same = b is None
    b = a if same else normalise(b)
    na, nb = len(a), len(b)
    pa = na if a_primary is None else a_primary
    pb = pa if same else (nb if b_primary is None else b_primary)
    offset = 0 if same else na
    links = _Links(na if same else na + nb, threshold)
    if same:
        # Primary rows against themselves and every later row (primaries, then secondaries).
        for start in range(0, pa, batch_rows):
            stop = min(start + batch_rows, pa)
            sims = a[start:stop] @ a[start:].T  # [r, na - start] cosine
            square = sims[:, : stop - start]
            square[np.tril_indices(stop - start)] = -np.inf  # a row with itself, and pairs seen as (j, i)
            links.add(np.arange(start, stop), np.arange(start, na), sims)
        compared = pa * (pa - 1) // 2 + pa * (na - pa)
    else:
        # Primary rows of a against all of b; secondary rows of a against b's primaries.
        for low, high, columns in ((0, pa, nb), (pa, na, pb)):
            if not columns:
                continue
            for start in range(low, high, batch_rows):
                stop = min(start + batch_rows, high)
                sims = a[start:stop] @ b[:columns].T  # [r, columns] cosine
                links.add(np.arange(start, stop), np.arange(columns) + offset, sims)
        compared = pa * nb + (na - pa) * pb
    return links.finish(compared)


# ----------------------------------------------------------------- in memory


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


def cluster_members(assignment: Assignment) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """cluster -> (its primary rows, its secondary rows), for an in-memory run."""
    out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for cluster in np.unique(np.concatenate([assignment.primary, assignment.extra_clusters])):
        out[int(cluster)] = (
            np.flatnonzero(assignment.primary == cluster),
            assignment.extra_rows[assignment.extra_clusters == cluster],
        )
    return out


DEFAULT_BOUNDARY = 0.05  # SemanticDedupConfig.boundary
DEFAULT_MAX_BOUNDARY_CLUSTERS = 16  # SemanticDedupConfig.max_boundary_clusters


def semantic_duplicates(
    keys: Sequence[str],
    embeddings: np.ndarray,
    clip_similarities: Sequence[float | None],
    pixels: Sequence[int],
    threshold: float,
    centroids: np.ndarray | None = None,
    *,
    boundary: float = DEFAULT_BOUNDARY,
    max_boundary_clusters: int = DEFAULT_MAX_BOUNDARY_CLUSTERS,
) -> list[Duplicate]:
    """The whole method in memory, for tests and small data: cluster by
    `centroids` (one cluster when None) with the boundary rule, pairs within
    clusters, groups across them (the defaults are SemanticDedupConfig's)."""
    embeddings = normalise(embeddings)
    if centroids is None:
        centroids = np.zeros((1, embeddings.shape[1]), dtype=np.float32)
    assignment = assign_with_boundary(embeddings, centroids, boundary, max_boundary_clusters)
    clusters = []
    for primaries, secondaries in cluster_members(assignment).values():
        idx = np.concatenate([primaries, secondaries])
        links = block_links(embeddings[idx], None, threshold, a_primary=len(primaries))
        clusters.append(
            nodes_of_block(
                [keys[i] for i in idx], [clip_similarities[i] for i in idx], [pixels[i] for i in idx], links
            )
        )
    return groups_across(clusters)


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

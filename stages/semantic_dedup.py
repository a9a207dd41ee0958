"""Semantic deduplication by CLIP image embeddings (`dedup.semantic`), on Beam.

What is dropped, and in favour of what
--------------------------------------
Samples whose L2-normalised CLIP image embeddings have a cosine similarity of
at least `threshold` (default 0.95) with another sample compared with them
(in the same k-means cluster, or across a cluster boundary, below) are
duplicates; duplicates are connected into groups (connected
components), and each group keeps one survivor: the highest
`clip_similarity`, then the most decoded pixels, then the smallest key. Every
other member is rejected `semantic_duplicate` (stage `dedup`) with
`duplicate_of` = the survivor, `score` = the cosine to its most similar
group member, and a `detail` naming that member. SemDeDup (Abbas et al. 2023)
and NeMo Curator's semantic dedup do the same with a per-cluster threshold.

It runs after scoring (it reuses the embeddings the CLIP step computed; no
image is encoded again) and before selection, so the survivor is chosen among
all copies, by the score the selection thresholds read first.

Steps
-----
    Batch       rows into arrays of BATCH_ROWS (16384) embeddings; from here on
                embeddings travel as arrays, never one element per sample
    Centroids   k-means (`stages/core/semantic.kmeans`) on one worker over a
                sample of `sample_size` embeddings (the rows with the smallest
                key hashes: the same sample every run), or the centroids of an
                earlier run (`centroids`); written to DIR/semantic/centroids.npy
    Count       each embedding to its nearest centroid (primary) and to the
                clusters whose bisector with it lies within `boundary`
                (secondary, at most `max_boundary_clusters`), by matrix products
                over a batch (centroids as a side input: K x D floats); only the
                members per cluster leave this step (K ints per batch)
    Route       the same assignment again, and each membership to its block
                pairs: a cluster of more than `max_cluster_size` members is cut
                into blocks of about max_cluster_size / 4 by key hash, and a
                member goes to each of its B block pairs, so one worker holds at
                most about `max_cluster_size` embeddings. Members cross the
                shuffle packed, one bytes record array per block pair and batch
    Pairs       per block pair, primary x primary and primary x secondary pairs
                >= threshold by matrix products of `batch_rows` rows, reduced to
                component links and each member's best neighbour (`block_links`)
    Components  per cluster, connected components over those links (keys and
                ranks only, no embeddings); per key, its components in several
                clusters merged; the keys that belong to components of two
                clusters (few: duplicates across a boundary) gathered on one
                worker to join those components (a dict of their roots, the side
                input of the next step); per joined component, the survivor
    Join        records with their decision (metadata only)

Which pairs are compared, and what is guaranteed, is in the docstring of
`stages/core/semantic.py`: a pair split by a cluster boundary is found
unless more than 2 * `boundary` of its difference vector lies along the line
between the two centroids (`boundary` >= sqrt(2 (1 - threshold)) / 2 makes
it exhaustive; 0 is plain SemDeDup). `benchmarks/semantic_bench.py` measures
recall against brute force, the pairs compared against all pairs, and the
time per million. Embeddings cross one shuffle here (block pairs; secondaries
add their share) and one in the embeddings writer, never with the records.
Assigning twice (Count, Route) costs one more product per batch but keeps the
batches from being materialised twice. NumPy's BLAS runs on one thread in
these steps (`semantic.one_blas_thread`).

Counters (namespace `semantic_dedup`): `embeddings`, `boundary_assignments`
(secondary memberships), `boundary_capped` (embeddings with more clusters
within the boundary than the cap), `pairs_compared`,
`clusters_with_duplicates`, `members_in_several_clusters` (keys joining
components of different clusters), `kept`, `dropped_semantic_duplicate`;
distribution `block_rows` (embeddings per worker per block pair).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from schemas import RejectReason, SampleRecord, Stage
from schemas.config import SemanticDedupConfig
from stages.base import REJECTS, Drop, rejection
from stages.core import semantic, semantic_groups
from stages.core.semantic_batches import key_hashes, memberships, to_chunks, unpack_chunks
from stages.embeddings import vectors, write_atomically

LOG = logging.getLogger(__name__)

NAMESPACE = "semantic_dedup"
SEMANTIC_DIR = "semantic"
CENTROIDS = "centroids.npy"
BATCH_ROWS = 16384  # embeddings per element once batched (16 MiB of 512-d float16): the fewer elements, the
# less per-element work on the runner; a bundle's last batch may be smaller


def centroids_path(output_dir: str) -> str:
    return FileSystems.join(output_dir, SEMANTIC_DIR, CENTROIDS)


def load_centroids(path: str) -> np.ndarray:
    try:
        with FileSystems.open(path, compression_type="uncompressed") as f:
            centroids = np.load(io.BytesIO(f.read()), allow_pickle=False)
    except Exception as err:
        raise ValueError(f"dedup.semantic.centroids {path!r}: cannot read a centroids .npy ({err})") from err
    if centroids.ndim != 2 or not len(centroids):
        raise ValueError(f"dedup.semantic.centroids {path!r}: expected a [K, D] array, got shape {centroids.shape}")
    return semantic.normalise(centroids)


class _Pack(beam.DoFn):
    """[EmbeddingRow] -> one Batch: (keys, clip_similarities, pixels int64 [n], float16 [n, D]).
    From here on embeddings travel as arrays, up to BATCH_ROWS per element."""

    def process(self, rows: list[tuple]) -> Iterator[tuple]:
        sizes = {len(row[3]) for row in rows}
        if len(sizes) > 1:
            raise ValueError(f"semantic dedup: embeddings of different sizes ({sorted(sizes)} bytes) near key {rows[0][0]}")
        yield (
            [row[0] for row in rows],
            [row[1] for row in rows],
            np.array([row[2] or 0 for row in rows], dtype=np.int64),
            vectors([row[3] for row in rows]),
        )


class _Sample(beam.CombineFn):
    """Batches -> (keys, float16 [n, D]): the `size` rows with the smallest
    CRC-32 key hashes (ties: the smaller key), sorted by key: the same sample
    every run, whatever the bundles. Holds at most about 2 * `size` rows."""

    def __init__(self, size: int):
        self.size = size

    def create_accumulator(self):
        return ([], [], [], 0)  # hashes, keys, vectors (lists of parts), rows

    def add_input(self, acc, batch):
        keys, _, _, x = batch
        hashes, keyparts, parts, rows = acc
        acc = (hashes + [key_hashes(keys)], keyparts + [list(keys)], parts + [x], rows + len(keys))
        return self._trim(acc) if acc[3] > 2 * self.size else acc

    def merge_accumulators(self, accumulators):
        merged = self.create_accumulator()
        for h, k, v, n in accumulators:
            merged = (merged[0] + h, merged[1] + k, merged[2] + v, merged[3] + n)
            if merged[3] > 2 * self.size:
                merged = self._trim(merged)  # as they come: many bundles never hold more than ~3 samples
        return self._trim(merged) if merged[3] > self.size else merged

    def _trim(self, acc):
        hashes, keyparts, parts, rows = acc
        if not rows:
            return acc
        h = np.concatenate(hashes)
        keys = [k for part in keyparts for k in part]
        x = np.concatenate(parts)
        if rows > self.size:
            order = np.argsort(h, kind="stable")
            cut = h[order[self.size - 1]]
            below = np.flatnonzero(h < cut)
            tied = sorted(np.flatnonzero(h == cut).tolist(), key=lambda i: keys[i])[: self.size - len(below)]
            keep = np.sort(np.concatenate([below, np.array(tied, dtype=np.int64)]))
            h, x, keys = h[keep], x[keep], [keys[i] for i in keep.tolist()]
        return ([h], [keys], [x], len(keys))

    def extract_output(self, acc):
        _, keyparts, parts, rows = self._trim(acc)
        if not rows:
            return [], np.zeros((0, 0), dtype=np.float16)
        keys = keyparts[0]
        order = sorted(range(len(keys)), key=keys.__getitem__)  # row order decides the seeding
        return [keys[i] for i in order], parts[0][order]


class _FitCentroids(beam.DoFn):
    """(keys, vectors) sample -> centroids [K, D] float32, written to the output."""

    def __init__(self, config: SemanticDedupConfig, output_dir: str | None):
        self.config = config
        self.output_dir = output_dir

    def process(self, sample: tuple) -> Iterator[np.ndarray]:
        if self.config.centroids is not None:
            centroids = load_centroids(self.config.centroids)
        else:
            keys, x = sample
            if not keys:
                yield np.zeros((1, 1), dtype=np.float32)  # no embeddings at all: nothing will be assigned
                return
            with semantic.one_blas_thread():
                centroids = semantic.kmeans(
                    x, self.config.clusters, iterations=self.config.iterations, seed=self.config.seed
                )
        LOG.info("semantic dedup: %d centroids of %d dims", *centroids.shape)
        if self.output_dir is not None:
            buffer = io.BytesIO()
            np.save(buffer, centroids.astype(np.float32), allow_pickle=False)
            write_atomically(centroids_path(self.output_dir), buffer.getvalue())
        yield centroids


class _Assign(beam.DoFn):
    """Batch -> its cluster memberships (`semantic.assign_with_boundary`):
    with `count`, an int64 [K'] array of members per cluster (and the
    counters); else the batch's block-pair chunks (`to_chunks`), which need
    `sizes`. Assigning twice (once to count, once to route) costs one more
    product per batch but keeps the batches from being materialised twice."""

    def __init__(self, boundary: float, max_boundary_clusters: int, max_cluster_size: int, count: bool):
        self.boundary = boundary
        self.max_boundary_clusters = max_boundary_clusters
        self.max_cluster_size = max_cluster_size
        self.counting = count
        self.count = Metrics.counter(NAMESPACE, "embeddings")
        self.extra = Metrics.counter(NAMESPACE, "boundary_assignments")
        self.capped = Metrics.counter(NAMESPACE, "boundary_capped")

    def process(self, batch: tuple, centroids: np.ndarray, sizes: np.ndarray | None = None) -> Iterator:
        x = batch[3]
        if x.shape[1] != centroids.shape[1]:
            raise ValueError(
                f"semantic dedup: embeddings have {x.shape[1]} dims but the centroids {centroids.shape[1]}; "
                "centroids from another CLIP model?"
            )
        with semantic.one_blas_thread():
            found = semantic.assign_with_boundary(x, centroids, self.boundary, self.max_boundary_clusters)
        rows, clusters, is_primary = memberships(len(x), found)
        if self.counting:
            self.count.inc(len(x))
            self.extra.inc(len(found.extra_rows))
            self.capped.inc(found.capped)
            yield np.bincount(clusters)
        else:
            yield from to_chunks(batch, rows, clusters, is_primary, sizes, self.max_cluster_size)


class _ClusterSizes(beam.CombineFn):
    """Per-batch member counts -> int64 [K']: members (primary and secondary) per cluster."""

    def create_accumulator(self):
        return np.zeros(0, dtype=np.int64)

    def add_input(self, acc, counts):
        return self._add(acc, counts)

    def merge_accumulators(self, accumulators):
        total = np.zeros(0, dtype=np.int64)
        for acc in accumulators:
            total = self._add(total, acc)
        return total

    @staticmethod
    def _add(a, b):
        if len(a) < len(b):
            a, b = b, a
        a = a.copy()
        a[: len(b)] += b
        return a

    def extract_output(self, acc):
        return acc


class _BlockPairs(beam.DoFn):
    """((cluster, i, j), [Chunk]) -> (cluster, Node) for every member with a neighbour >= threshold."""

    def __init__(self, threshold: float, batch_rows: int):
        self.threshold = threshold
        self.batch_rows = batch_rows
        self.pairs = Metrics.counter(NAMESPACE, "pairs_compared")
        self.block_rows = Metrics.distribution(NAMESPACE, "block_rows")

    def process(self, element) -> list[tuple]:
        (cluster, i, j), chunks = element
        block, is_primary, keys, clip, pixels, x = unpack_chunks(list(chunks))
        self.block_rows.update(len(keys))

        def side(b):  # the members of block b, primaries first
            return np.concatenate([np.flatnonzero((block == b) & is_primary), np.flatnonzero((block == b) & ~is_primary)])

        a = side(i)
        b = side(j) if i != j else np.zeros(0, dtype=np.int64)
        a_primary = int(np.count_nonzero(is_primary[a]))
        b_primary = int(np.count_nonzero(is_primary[b]))
        if not len(a) or (i != j and not len(b)) or a_primary + b_primary == 0:
            return []  # an empty block, or secondaries only: no pairs
        with semantic.one_blas_thread():
            links = semantic.block_links(
                x[a],
                None if i == j else x[b],
                self.threshold,
                batch_rows=self.batch_rows,
                a_primary=a_primary,
                b_primary=b_primary,
            )
        self.pairs.inc(links.compared)
        nodes = np.concatenate([a, b]).tolist()
        found = semantic.nodes_of_block([keys[n] for n in nodes], [clip[n] for n in nodes], pixels[nodes], links)
        return [(cluster, tuple(node)) for node in found]


class _LocalComponents(beam.DoFn):
    """(cluster, [Node]) -> (key, Member tuple) for every member of a component of two or more."""

    def __init__(self):
        self.clusters = Metrics.counter(NAMESPACE, "clusters_with_duplicates")

    def process(self, element) -> Iterator[tuple[str, tuple]]:
        _, nodes = element
        self.clusters.inc()
        for member in semantic_groups.local_components(nodes):
            yield member.key, tuple(member)


BRIDGES = "bridges"


class _MergeMembers(beam.DoFn):
    """(key, [Member]) -> its merged Member; on BRIDGES the roots it joins when more than one."""

    def __init__(self):
        self.bridging = Metrics.counter(NAMESPACE, "members_in_several_clusters")

    def process(self, element):
        _, members = element
        member, roots = semantic_groups.merge_members(members)
        if len(roots) > 1:
            self.bridging.inc()
            yield beam.pvalue.TaggedOutput(BRIDGES, roots)
        yield tuple(member)


def _by_component(member: tuple, joined: dict) -> tuple[str, tuple]:
    return joined.get(member[1], member[1]), member


def _survivors(element) -> Iterator[tuple[str, tuple]]:
    _, members = element
    for duplicate in semantic_groups.survivors(members):
        yield duplicate.key, tuple(duplicate)


class SemanticDecisions(beam.PTransform):
    """PCollection[EmbeddingRow] -> PCollection[(key, Duplicate tuple)], one per
    dropped sample. `output_dir` (None: not written) gets DIR/semantic/centroids.npy."""

    def __init__(self, config: SemanticDedupConfig, output_dir: str | None = None):
        super().__init__()
        self.config = config
        self.output_dir = output_dir
        if config.centroids is not None:
            load_centroids(config.centroids)  # fail before the pipeline runs

    def expand(self, rows):
        cfg = self.config
        batches = (
            rows
            | "Batch" >> beam.BatchElements(min_batch_size=BATCH_ROWS, max_batch_size=BATCH_ROWS)
            | "Pack" >> beam.ParDo(_Pack())
        )
        if cfg.centroids is not None:
            sample = rows.pipeline | "NoSample" >> beam.Create([([], None)])
        else:
            sample = batches | "Sample" >> beam.CombineGlobally(_Sample(cfg.sample_size))
        centroids = sample | "Centroids" >> beam.ParDo(_FitCentroids(cfg, self.output_dir))
        centroids = beam.pvalue.AsSingleton(centroids)
        bounds = (cfg.boundary, cfg.max_boundary_clusters, cfg.max_cluster_size)
        sizes = (
            batches
            | "Count" >> beam.ParDo(_Assign(*bounds, count=True), centroids)
            | "ClusterSizes" >> beam.CombineGlobally(_ClusterSizes())
        )
        members = (
            batches
            | "Route" >> beam.ParDo(_Assign(*bounds, count=False), centroids, beam.pvalue.AsSingleton(sizes))
            | "GroupBlockPairs" >> beam.GroupByKey()
            | "Pairs" >> beam.ParDo(_BlockPairs(cfg.threshold, cfg.batch_rows))
            | "GroupByCluster" >> beam.GroupByKey()
            | "LocalComponents" >> beam.ParDo(_LocalComponents())
            | "GroupByKey" >> beam.GroupByKey()
            | "MergeMembers" >> beam.ParDo(_MergeMembers()).with_outputs(BRIDGES, main="members")
        )
        joined = (
            members[BRIDGES]
            | "AllBridges" >> beam.combiners.ToList()
            | "JoinClusters" >> beam.Map(semantic_groups.bridges)
        )
        return (
            members.members
            | "ByComponent" >> beam.Map(_by_component, beam.pvalue.AsSingleton(joined))
            | "GroupByComponent" >> beam.GroupByKey()
            | "Survivors" >> beam.FlatMap(_survivors)
        )


def drop_detail(duplicate: tuple, threshold: float) -> Drop:
    key, survivor, neighbour, similarity, group_size = duplicate
    detail = (
        f"CLIP cosine {similarity:.4f} >= {threshold:g} to {neighbour}; {survivor} kept as the best of "
        f"{group_size} (highest clip_similarity, then pixels, then key)"
    )
    return Drop(RejectReason.SEMANTIC_DUPLICATE, detail, duplicate_of=survivor, score=round(similarity, 6))


class _Decide(beam.DoFn):
    """(key, {"records": [r], "drops": [d]}) -> kept record, or a rejection."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.kept = Metrics.counter(NAMESPACE, "kept")
        self.dropped = Metrics.counter(NAMESPACE, f"dropped_{RejectReason.SEMANTIC_DUPLICATE.value}")

    def process(self, element):
        key, grouped = element
        records, drops = list(grouped["records"]), list(grouped["drops"])
        if not records:
            raise ValueError(f"semantic dedup: a decision for {key}, which has no record")
        for record in records:
            if drops:
                self.dropped.inc()
                yield beam.pvalue.TaggedOutput(REJECTS, rejection(record, Stage.DEDUP, drop_detail(drops[0], self.threshold)))
            else:
                self.kept.inc()
                yield record


class SemanticDedup(beam.PTransform):
    """(PCollection[SampleRecord], PCollection[EmbeddingRow]) -> (kept, rejects).

    A record without an embedding row is kept (it was not compared)."""

    def __init__(self, config: SemanticDedupConfig, output_dir: str | None = None):
        super().__init__()
        self.config = config
        self.decisions = SemanticDecisions(config, output_dir)

    def expand(self, inputs):
        records, rows = inputs
        drops = rows | "Decisions" >> self.decisions
        joined = (
            {"records": records | "RecordsByKey" >> beam.Map(_by_key), "drops": drops}
            | "Join" >> beam.CoGroupByKey()
            | "Decide" >> beam.ParDo(_Decide(self.config.threshold)).with_outputs(REJECTS, main="kept")
        )
        return joined.kept, joined[REJECTS]


def _by_key(record: SampleRecord) -> tuple[str, SampleRecord]:
    return record.key, record

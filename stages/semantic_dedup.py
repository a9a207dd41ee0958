"""Semantic deduplication by CLIP image embeddings (`dedup.semantic`), on Beam.

What is dropped, and in favour of what
--------------------------------------
Samples whose L2-normalised CLIP image embeddings have a cosine similarity of
at least `threshold` (default 0.95) with another sample of the same k-means
cluster are duplicates; duplicates are connected into groups (connected
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
    Centroids   k-means (`stages/core/semantic.kmeans`) on one worker over a
                sample of `sample_size` embeddings (the rows with the smallest
                key hashes: the same sample every run), or the centroids of an
                earlier run (`centroids`); written to DIR/semantic/centroids.npy
    Assign      each embedding to its most similar centroid (matrix products
                over batches of rows; centroids as a side input: K x D floats)
    Blocks      a cluster of more than `max_cluster_size` embeddings is cut
                into B blocks of about max_cluster_size / 2 by key hash, and
                each embedding is sent to its B block pairs; so one worker
                holds at most about `max_cluster_size` embeddings
    Pairs       per block pair, pairs >= threshold by matrix products of
                `batch_rows` rows, reduced to component links and each node's
                best neighbour (`block_links`)
    Groups      per cluster, connected components over those links (keys and
                ranks only, no embeddings) and the survivor of each
    Join        records with their decision (metadata only)

Only pairs within a cluster are compared: a pair split across two clusters
by k-means is missed. `benchmarks/semantic_bench.py` measures recall against
brute force, the pairs compared against all pairs, and the time per million.
Embeddings cross two shuffles here (Blocks and the embeddings writer), never
with the records.

Counters (namespace `semantic_dedup`): `embeddings`, `clusters`,
`pairs_compared`, `kept`, `dropped_semantic_duplicate`; distribution
`block_rows` (embeddings per worker per block pair).
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
from stages.core import semantic
from stages.embeddings import partition_of, vectors, write_atomically

LOG = logging.getLogger(__name__)

NAMESPACE = "semantic_dedup"
SEMANTIC_DIR = "semantic"
CENTROIDS = "centroids.npy"


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


def _sample_order(row: tuple) -> int:
    return partition_of(row[0], 2**32)


class _FitCentroids(beam.DoFn):
    """[EmbeddingRow] (the sample) -> centroids [K, D] float32, written to the output."""

    def __init__(self, config: SemanticDedupConfig, output_dir: str | None):
        self.config = config
        self.output_dir = output_dir

    def process(self, sample: list[tuple]) -> Iterator[np.ndarray]:
        if self.config.centroids is None and not sample:
            yield np.zeros((1, 1), dtype=np.float32)  # no embeddings at all: nothing will be assigned
            return
        if self.config.centroids is not None:
            centroids = load_centroids(self.config.centroids)
        else:
            sample = sorted(sample, key=lambda row: row[0])  # row order decides the seeding
            centroids = semantic.kmeans(
                vectors([row[3] for row in sample]),
                self.config.clusters,
                iterations=self.config.iterations,
                seed=self.config.seed,
            )
        LOG.info("semantic dedup: %d centroids of %d dims", *centroids.shape)
        if self.output_dir is not None:
            buffer = io.BytesIO()
            np.save(buffer, centroids.astype(np.float32), allow_pickle=False)
            write_atomically(centroids_path(self.output_dir), buffer.getvalue())
        yield centroids


class _Assign(beam.DoFn):
    """[EmbeddingRow] batch -> (cluster, row) for each row."""

    def __init__(self):
        self.count = Metrics.counter(NAMESPACE, "embeddings")

    def process(self, batch: list[tuple], centroids: np.ndarray) -> Iterator[tuple[int, tuple]]:
        x = vectors([row[3] for row in batch])
        if x.shape[1] != centroids.shape[1]:
            raise ValueError(
                f"semantic dedup: embeddings have {x.shape[1]} dims but the centroids {centroids.shape[1]}; "
                "centroids from another CLIP model?"
            )
        labels = semantic.assign(x, centroids)
        self.count.inc(len(batch))
        for label, row in zip(labels.tolist(), batch):
            yield label, row


class _ToBlocks(beam.DoFn):
    """(cluster, row) -> ((cluster, i, j), (block, row)) for each block pair (i, j) of the row's block."""

    def __init__(self, max_cluster_size: int):
        self.max_cluster_size = max_cluster_size

    def process(self, element, sizes: dict) -> Iterator[tuple]:
        cluster, row = element
        blocks = semantic.block_count(sizes[cluster], self.max_cluster_size)
        block = semantic.block_of(row[0], blocks)
        for i, j in semantic.block_pairs(block, blocks):
            yield (cluster, i, j), (block, row)


class _BlockPairs(beam.DoFn):
    """((cluster, i, j), [(block, row)]) -> (cluster, Node) for every row with a neighbour >= threshold."""

    def __init__(self, threshold: float, batch_rows: int):
        self.threshold = threshold
        self.batch_rows = batch_rows
        self.pairs = Metrics.counter(NAMESPACE, "pairs_compared")
        self.block_rows = Metrics.distribution(NAMESPACE, "block_rows")

    def process(self, element) -> list[tuple]:
        (cluster, i, j), members = element
        a = [row for block, row in members if block == i]
        b = [row for block, row in members if block == j] if i != j else []
        rows = a + b
        self.block_rows.update(len(rows))
        if not a or (i != j and not b):
            return []  # an empty block: no pairs
        links = semantic.block_links(
            vectors([r[3] for r in a]),
            None if i == j else vectors([r[3] for r in b]),
            self.threshold,
            batch_rows=self.batch_rows,
        )
        self.pairs.inc(links.compared)
        nodes = semantic.nodes_of_block([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], links)
        return [(cluster, tuple(node)) for node in nodes]


class _Groups(beam.DoFn):
    """(cluster, [Node]) -> (key, Duplicate tuple) for every dropped member."""

    def __init__(self):
        self.clusters = Metrics.counter(NAMESPACE, "clusters_with_duplicates")

    def process(self, element) -> Iterator[tuple[str, tuple]]:
        _, nodes = element
        self.clusters.inc()
        for duplicate in semantic.groups(nodes):
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
        if cfg.centroids is not None:
            sample = rows.pipeline | "NoSample" >> beam.Create([[]])
        else:
            sample = rows | "Sample" >> beam.combiners.Top.Of(cfg.sample_size, key=_sample_order, reverse=True)
        centroids = sample | "Centroids" >> beam.ParDo(_FitCentroids(cfg, self.output_dir))
        assigned = (
            rows
            | "BatchForAssign" >> beam.BatchElements(min_batch_size=256, max_batch_size=4096)
            | "Assign" >> beam.ParDo(_Assign(), beam.pvalue.AsSingleton(centroids))
        )
        sizes = (
            assigned
            | "Ones" >> beam.Map(lambda element: (element[0], 1))
            | "ClusterSizes" >> beam.CombinePerKey(sum)
        )
        return (
            assigned
            | "Blocks" >> beam.ParDo(_ToBlocks(cfg.max_cluster_size), beam.pvalue.AsDict(sizes))
            | "GroupBlockPairs" >> beam.GroupByKey()
            | "Pairs" >> beam.ParDo(_BlockPairs(cfg.threshold, cfg.batch_rows))
            | "GroupByCluster" >> beam.GroupByKey()
            | "Groups" >> beam.ParDo(_Groups())
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

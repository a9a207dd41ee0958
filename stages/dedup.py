"""The dedup stage in Beam: exact (SHA-256) and near (64-bit pHash)
deduplication across the whole dataset, distributed.

The rules (what is dropped, which survivor is named) and the in-memory plan are
in `stages/core/dedup_plan.py`; the hash in `stages/core/phash.py`; the
multi-index candidate search in `stages/core/hamming_search.py`. This module is the
Beam wiring: nine DoFns with their tuple protocols and the `Deduplicate`
transform, which computes the same decisions as `plan_dedup` without any worker
holding all hashes, pairs or pointers.

(Over 500 lines on purpose: the DoFns exchange plain tuples across shuffles, and each
tuple protocol is read where it is produced and consumed; splitting the DoFns over
modules would separate them.)

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
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from schemas import DedupConfig, RejectReason, SampleRecord, Stage
from stages.base import REJECTS, Drop, StageMetrics, rejection
from stages.core.dedup_plan import (
    _EXACT_DETAIL,
    Decision,
    DedupItem,
    Link,
    TableEntry,
    _member_rank,
    _near_detail,
    jump_link,
    key_partition,
    max_chain_links,
    plan_dedup,
    rank,
    resolve_links,
    unresolved,
)
from stages.core.hamming_search import (
    KeyBlob,
    band_layout,
    band_values,
    collapse_identical,
    near_pairs,
    pairs_in_partition,
    partition_of,
)
from stages.core.phash import (
    ImageDigest,
    compute_phash,
    digest_image,
    hamming,
    phash_to_int,
    phashes_to_array,
    sha256_hex,
)

logger = logging.getLogger(__name__)

# Added to the pixel count of samples already in the dataset: more than any image has.
EXISTING_PRIORITY = 1 << 48

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


def _unique_by_key(chunks: Iterable[tuple[str, list]], tag: str, make, clash: str) -> dict:
    """key -> make(value) for the `tag` elements of `chunks`; a key seen twice is an
    error (`clash` says how), since sample keys must be unique."""
    out = {}
    for key, value in _tagged(chunks, tag):
        if key in out:
            raise ValueError(f"dedup: key {key!r} {clash}; sample keys must be unique")
        out[key] = make(value)
    return out


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
    # A sample already in the dataset (`--append`: status "kept") outranks every new
    # one, so a new copy of it is the one dropped, naming it.
    priority = EXISTING_PRIORITY if record.status == "kept" else 0
    return record.key, record_json, record.image_sha256, -(record.pixels + priority), record.phash


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
        table = _unique_by_key(chunks, "table", TableEntry._make, "is dropped twice")
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
        decisions = _unique_by_key(chunks, "decision", Decision._make, "has two decisions")
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

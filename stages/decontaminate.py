"""Decontamination against evaluation sets (`dedup.eval_sets`).

What is dropped
---------------
A sample is rejected `eval_overlap` (stage `dedup`) when its pHash is within
`eval_hamming_threshold` bits of an evaluation image's (default 6, the
near-dup default), or, when `scoring.clip` is configured, its CLIP image
embedding has a cosine of at least `eval_cosine_threshold` (default 0.95) with
an evaluation image's. The reject's `detail` names the evaluation set and
item (`set/item`) and the distance; `score` is the Hamming distance or the
cosine. Nothing else is dropped, and evaluation images are never written.

Each evaluation image is read and hashed once (`DecontaminateByPhash`,
right after `Dedup`) and, with CLIP, embedded once by the same
`ClipModelHandler` as the crawl (`DecontaminateByEmbedding`, right after
scoring, before semantic dedup, so a sample dropped here cannot be chosen as a
semantic-duplicate survivor).

Broadcast or join
-----------------
Up to `eval_broadcast_max` evaluation items (default 100 000) travel to every
worker as one side input: 8 bytes per pHash (0.8 MB at the bound) plus, with
CLIP, `2 * D` bytes per float16 embedding (100 MB at D = 512), and each sample
is compared with all of them (XOR + popcount, or one matrix-vector product).
Beyond the bound the pHash check becomes a join: evaluation hashes and sample
hashes are keyed by `(band, band value)` of `stages.dedup.band_layout` (by the
pigeonhole principle, hashes within t bits agree on one of t + 1 bands),
grouped, and compared inside each group, so no worker holds all of them. The
cosine check has no join: a CLIP run with more evaluation items than the bound
fails before it starts (raise the bound, or set `eval_cosine_threshold: null`
to decontaminate by pHash alone).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from schemas import Provenance, RejectReason, SampleRecord, Stage
from schemas.config import DedupConfig
from stages.base import REJECTS, Drop, rejection
from stages.core.decode import decode_rgb
from stages.core.eval_sets import EvalItem, EvalSetError, list_items, nearest_hash, read_item
from stages.core.hamming_search import band_layout, band_values
from stages.core.phash import compute_phash, phash_to_int, phashes_to_array

LOG = logging.getLogger(__name__)

NAMESPACE = "decontaminate"


def eval_items(config: DedupConfig) -> list[EvalItem]:
    """Every configured evaluation item (listed on the launcher; raises EvalSetError)."""
    items = [item for spec in config.eval_sets for item in list_items(spec)]
    names = [(i.set_name, i.item) for i in items]
    if len(set(names)) != len(names):
        raise EvalSetError("dedup.eval_sets: two sets share a name; name them with NAME=PATH")
    return items


class _HashEvalItem(beam.DoFn):
    """EvalItem -> (set/item, pHash hex)."""

    def __init__(self):
        self.count = Metrics.counter(NAMESPACE, "eval_items_hashed")

    def process(self, item: EvalItem) -> Iterator[tuple[str, str]]:
        try:
            phash = compute_phash(read_item(item))
        except Exception as err:
            raise EvalSetError(f"evaluation set {item.set_name}: item {item.item} ({item.path}) is not a readable image: {err}") from err
        self.count.inc()
        yield f"{item.set_name}/{item.item}", phash


def _to_table(pairs: list[tuple[str, str]]) -> tuple[list[str], np.ndarray]:
    pairs = sorted(pairs)
    return [name for name, _ in pairs], phashes_to_array(p for _, p in pairs)


def _phash_drop(name: str, distance: int, threshold: int) -> Drop:
    return Drop(
        RejectReason.EVAL_OVERLAP,
        f"evaluation item {name}: pHash Hamming distance {distance} <= {threshold}",
        score=float(distance),
    )


class _PhashCheck(beam.DoFn):
    """SampleRecord -> kept, or an `eval_overlap` rejection (broadcast side input)."""

    def __init__(self, threshold: int):
        self.threshold = threshold
        self.kept = Metrics.counter(NAMESPACE, "kept")
        self.dropped = Metrics.counter(NAMESPACE, f"dropped_{RejectReason.EVAL_OVERLAP.value}_phash")
        self.missing = Metrics.counter(NAMESPACE, "missing_phash")

    def process(self, record: SampleRecord, table):
        names, hashes = table
        if record.phash is None or not len(hashes):
            if record.phash is None:
                self.missing.inc()
            self.kept.inc()
            yield record
            return
        index, distance = nearest_hash(phash_to_int(record.phash), hashes)
        if distance <= self.threshold:
            self.dropped.inc()
            yield beam.pvalue.TaggedOutput(REJECTS, rejection(record, Stage.DEDUP, _phash_drop(names[index], distance, self.threshold)))
        else:
            self.kept.inc()
            yield record


def _band_keys(element, layout, source: str):
    """(id, pHash hex) -> ((band, value), (source, id, hash)) for every band."""
    ident, phash = element
    value = np.array([phash_to_int(phash)], dtype=np.uint64)
    for band in range(len(layout.widths)):
        yield (band, int(band_values(value, layout, band)[0])), (source, ident, phash)


def _band_matches(element, threshold: int, layout) -> Iterator[tuple[str, tuple[int, str]]]:
    """One band group -> (sample key, (distance, eval name)) for pairs within the
    threshold, each pair from the first band it agrees on only."""
    (band, _), members = element
    evals = [(i, h) for s, i, h in members if s == "eval"]
    if not evals:
        return
    names = [i for i, _ in evals]
    hashes = phashes_to_array(h for _, h in evals)
    for source, key, phash in members:
        if source != "sample":
            continue
        value = np.uint64(phash_to_int(phash))
        distances = np.bitwise_count(hashes ^ value)
        for j in np.flatnonzero(distances <= threshold):
            first = min(b for b in range(len(layout.widths)) if band_values(np.array([value]), layout, b)[0] == band_values(hashes[j : j + 1], layout, b)[0])
            if first == band:
                yield key, (int(distances[j]), names[j])


class _DecideJoined(beam.DoFn):
    """(key, {"records": [r], "drops": [Drop args]}) -> kept record or a rejection."""

    def __init__(self, make_drop, counter: str):
        self.make_drop = make_drop
        self.kept = Metrics.counter(NAMESPACE, "kept")
        self.dropped = Metrics.counter(NAMESPACE, counter)

    def process(self, element):
        key, grouped = element
        records, drops = list(grouped["records"]), sorted(grouped["drops"])
        for record in records:
            if drops:
                self.dropped.inc()
                yield beam.pvalue.TaggedOutput(REJECTS, rejection(record, Stage.DEDUP, self.make_drop(drops[0])))
            else:
                self.kept.inc()
                yield record


def join_drops(records, drops, label: str, make_drop, counter: str):
    """Records joined by key with (key, drop info); returns (kept, rejects)."""
    joined = (
        {"records": records | f"{label}/ByKey" >> beam.Map(lambda r: (r.key, r)), "drops": drops}
        | f"{label}/Join" >> beam.CoGroupByKey()
        | f"{label}/Decide" >> beam.ParDo(_DecideJoined(make_drop, counter)).with_outputs(REJECTS, main="kept")
    )
    return joined.kept, joined[REJECTS]


class DecontaminateByPhash(beam.PTransform):
    """PCollection[SampleRecord with phash] -> (kept, rejects `eval_overlap`)."""

    def __init__(self, config: DedupConfig, items: list[EvalItem]):
        super().__init__()
        self.config = config
        self.items = items
        self.layout = band_layout(config.eval_hamming_threshold)

    @property
    def broadcast(self) -> bool:
        return len(self.items) <= self.config.eval_broadcast_max

    def expand(self, records):
        threshold = self.config.eval_hamming_threshold
        hashes = (
            records.pipeline
            | "EvalItems" >> beam.Create(self.items)
            | "SpreadEval" >> beam.Reshuffle()
            | "HashEval" >> beam.ParDo(_HashEvalItem())
        )
        if self.broadcast:
            table = hashes | "EvalTable" >> beam.combiners.ToList() | "ToArray" >> beam.Map(_to_table)
            out = records | "Check" >> beam.ParDo(_PhashCheck(threshold), beam.pvalue.AsSingleton(table)).with_outputs(
                REJECTS, main="kept"
            )
            return out.kept, out[REJECTS]
        layout = self.layout
        samples = (
            records
            | "WithPhash" >> beam.Filter(lambda r: r.phash is not None)
            | "SampleHashes" >> beam.Map(lambda r: (r.key, r.phash))
            | "SampleBands" >> beam.FlatMap(_band_keys, layout, "sample")
        )
        evals = hashes | "EvalBands" >> beam.FlatMap(_band_keys, layout, "eval")
        drops = (
            (samples, evals)
            | "FlattenBands" >> beam.Flatten()
            | "GroupByBand" >> beam.GroupByKey()
            | "Matches" >> beam.FlatMap(_band_matches, threshold, layout)
            | "Closest" >> beam.CombinePerKey(min)
        )
        return join_drops(
            records,
            drops,
            "Decide",
            lambda match: _phash_drop(match[1], match[0], threshold),
            f"dropped_{RejectReason.EVAL_OVERLAP.value}_phash",
        )


# ---------------------------------------------------------------- by CLIP embedding


def _eval_record(item: EvalItem) -> SampleRecord:
    name = f"{item.set_name}/{item.item}"
    return SampleRecord(key=name, url=f"eval://{name}", caption_original="", provenance=Provenance(source_file=item.path, source_row=0))


class _PrepareEval(beam.DoFn):
    """EvalItem -> ScoringExample with the CLIP inputs (as the crawl's images get them)."""

    def __init__(self, preparer):
        self.preparer = preparer

    def setup(self):
        self.preparer.setup()

    def process(self, item: EvalItem):
        from stages.inference import ScoringExample

        try:
            image = decode_rgb(read_item(item))
        except Exception as err:
            raise EvalSetError(f"evaluation set {item.set_name}: item {item.item} ({item.path}) is not a readable image: {err}") from err
        record = _eval_record(item)
        yield ScoringExample(record, self.preparer(image, record))


def _embedding_table(results) -> tuple[list[str], np.ndarray]:
    pairs = sorted((r.example.record.key, r.inference.embedding) for r in results)
    if not pairs:
        return [], np.zeros((0, 1), dtype=np.float32)
    return [name for name, _ in pairs], np.stack([e for _, e in pairs]).astype(np.float32)


class _CosineCheck(beam.DoFn):
    """EmbeddingRow -> the row (main) or (key, (-cosine, eval name)) on `drops`."""

    DROPS = "drops"

    def __init__(self, threshold: float):
        self.threshold = threshold

    def process(self, row: tuple, table):
        names, matrix = table
        if len(names):
            vector = np.frombuffer(row[3], dtype=np.float16).astype(np.float32)
            cosines = matrix @ vector  # [E]
            best = int(np.argmax(cosines))
            if cosines[best] >= self.threshold:
                yield beam.pvalue.TaggedOutput(self.DROPS, (row[0], (-float(cosines[best]), names[best])))
                return
        yield row


class DecontaminateByEmbedding(beam.PTransform):
    """(PCollection[SampleRecord], PCollection[EmbeddingRow]) -> (kept,
    rejects, rows of the kept samples)."""

    def __init__(self, config: DedupConfig, items: list[EvalItem], clip, scoring, preprocess: dict):
        super().__init__()
        if len(items) > config.eval_broadcast_max:
            raise EvalSetError(
                f"dedup.eval_sets hold {len(items)} items, more than eval_broadcast_max={config.eval_broadcast_max}: "
                "the CLIP cosine check needs them all on every worker; raise the bound or set "
                "eval_cosine_threshold: null to decontaminate by pHash only"
            )
        self.config = config
        self.items = items
        self.clip = clip
        self.scoring = scoring
        self.preprocess = preprocess

    def expand(self, inputs):
        from apache_beam.ml.inference.base import RunInference

        from stages.clip_score import ClipModelHandler
        from stages.models.clip import ClipPreparer

        records, rows = inputs
        threshold = self.config.eval_cosine_threshold
        table = (
            records.pipeline
            | "EvalItems" >> beam.Create(self.items)
            | "SpreadEval" >> beam.Reshuffle()
            | "PrepareEval" >> beam.ParDo(_PrepareEval(ClipPreparer(self.clip, self.preprocess)))
            | "EmbedEval" >> RunInference(ClipModelHandler(self.clip, self.scoring, self.preprocess))
            | "EvalTable" >> beam.combiners.ToList()
            | "ToMatrix" >> beam.Map(_embedding_table)
        )
        checked = rows | "Check" >> beam.ParDo(_CosineCheck(threshold), beam.pvalue.AsSingleton(table)).with_outputs(
            _CosineCheck.DROPS, main="rows"
        )

        def make_drop(match):
            cosine, name = -match[0], match[1]
            return Drop(
                RejectReason.EVAL_OVERLAP,
                f"evaluation item {name}: CLIP cosine {cosine:.4f} >= {threshold:g}",
                score=round(cosine, 6),
            )

        kept, rejects = join_drops(
            records, checked[_CosineCheck.DROPS], "Decide", make_drop, f"dropped_{RejectReason.EVAL_OVERLAP.value}_clip"
        )
        return kept, rejects, checked.rows

"""Selection: the one step that drops samples on their scores.

Scorers (`clip_score`, `safety`, `aesthetic`) only annotate records; this step
applies `SelectConfig`'s thresholds. It is cheap (no model, no pixels), so it
runs both inside `beam run curate` and alone in `beam run select`, which
re-applies thresholds to a finished output read back from its shards
(`ReadShardRecords`).

Checks, in the order that names a rejection's reason (`detail` lists every
failed check):

    unsafe           nsfw_score > max_nsfw_score, punsafe > max_punsafe
    watermark        pwatermark > max_pwatermark
    low_clip_similarity   clip_similarity < min_clip_similarity
    low_aesthetic    aesthetic_score < min_aesthetic_score

Bounds are inclusive: a score equal to its threshold is kept. A `None`
threshold disables its check. A record that lacks a score some threshold
needs is an error (`MissingScoreError`): passing it would silently keep
unscored samples, dropping it would hide a misconfigured run.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from schemas import ImageRef, RejectReason, Rejection, SampleRecord, ShardManifest, Stage
from schemas.scoring import SelectConfig
from stages.base import REJECTS, Drop, FilterDoFn, apply_filter
from stages.core.tario import TruncatedTarError, index_tar, read_range

LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Check:
    threshold: str  # SelectConfig field
    field: str  # SampleRecord score field
    reason: RejectReason
    keep_at_most: bool  # True: keep score <= threshold; False: keep score >= threshold


CHECKS = (
    Check("max_nsfw_score", "nsfw_score", RejectReason.UNSAFE, True),
    Check("max_punsafe", "punsafe", RejectReason.UNSAFE, True),
    Check("max_pwatermark", "pwatermark", RejectReason.WATERMARK, True),
    Check("min_clip_similarity", "clip_similarity", RejectReason.LOW_CLIP_SIMILARITY, False),
    Check("min_aesthetic_score", "aesthetic_score", RejectReason.LOW_AESTHETIC, False),
)
# SelectConfig threshold -> the record field it reads.
SCORE_FIELDS = {check.threshold: check.field for check in CHECKS}


class MissingScoreError(ValueError):
    """A threshold is set for a score the record does not have."""


def failed_checks(record: SampleRecord, config: SelectConfig) -> list[tuple[Check, float, float]]:
    """(check, score, threshold) for every enabled check the record fails, in CHECKS order."""
    failed = []
    enabled = config.thresholds()  # unresolved `auto` thresholds count as off
    for check in CHECKS:
        threshold = enabled.get(check.threshold)
        if threshold is None:
            continue
        score = getattr(record, check.field)
        if score is None:
            raise MissingScoreError(
                f"{record.key}: select.{check.threshold} is set but the record has no {check.field}; "
                f"enable the scorer that computes it or unset the threshold"
            )
        if (score > threshold) if check.keep_at_most else (score < threshold):
            failed.append((check, score, threshold))
    return failed


def select(record: SampleRecord, config: SelectConfig) -> SampleRecord | Drop:
    """The record if it passes every enabled check, else a Drop naming the first failure."""
    failed = failed_checks(record, config)
    if not failed:
        return record
    first, score, _ = failed[0]
    detail = "; ".join(
        f"{check.field} {score:.4f} {'>' if check.keep_at_most else '<'} {threshold:g}"
        for check, score, threshold in failed
    )
    return Drop(first.reason, detail, score=score)


UNSELECTED = "unselected"


class SelectDoFn(FilterDoFn):
    """Applies `select`; counts `select/kept`, `select/dropped_<reason>`.

    With `emit_unselected`, a dropped record is also emitted whole (scores,
    `image_ref`) on the `unselected` output, besides its rejection.
    """

    stage = Stage.SELECT

    def __init__(self, config: SelectConfig, emit_unselected: bool = False):
        super().__init__()
        self.config = config
        self.emit_unselected = emit_unselected

    def apply(self, record: SampleRecord):
        return select(record, self.config)

    def process(self, record: SampleRecord):
        result = self.apply(record)
        if self.emit_unselected and isinstance(result, Drop):
            yield beam.pvalue.TaggedOutput(UNSELECTED, record)
        yield from self.emit(record, result)


def apply_select(records: beam.PCollection, label: str, config: SelectConfig, emit_unselected: bool = False):
    """Run selection; returns (kept, rejects, unselected or None)."""
    dofn = SelectDoFn(config, emit_unselected)
    if not emit_unselected:
        kept, rejects = apply_filter(records, label, dofn)
        return kept, rejects, None
    outputs = records | label >> beam.ParDo(dofn).with_outputs(REJECTS, UNSELECTED, main="kept")
    # Both outputs usually end in a WriteShards (GroupIntoBatches). When two
    # GroupIntoBatches sit in one fused stage, Beam 2.77's FnApiRunner fires the
    # end-of-window timers of only one of them, silently losing the other's last
    # partial batches (reproduced in tests/stages/test_select.py). A Reshuffle
    # (metadata only) puts the unselected branch in its own stage.
    unselected = outputs[UNSELECTED] | f"{label}/SeparateUnselected" >> beam.Reshuffle()
    return outputs.kept, outputs[REJECTS], unselected


def drop_would_pass(rejection: Rejection, config: SelectConfig) -> bool:
    """For a selection rejection recorded earlier: would the check that
    rejected it pass under `config`? (Other checks may still fail: the old
    rejection holds only the first failing score.) The check is the one whose
    field opens `detail`; if that is unreadable, every check of the reason must
    pass. Used by `beam run select` to count samples a looser threshold would
    re-admit but whose bytes are gone."""
    if rejection.stage != Stage.SELECT or rejection.score is None:
        return False
    field = rejection.detail.split(" ", 1)[0]
    checks = [c for c in CHECKS if c.field == field and c.reason == rejection.reason]
    checks = checks or [c for c in CHECKS if c.reason == rejection.reason]
    if not checks:
        return False
    for check in checks:
        threshold = getattr(config, check.threshold)
        if threshold is None:
            continue
        if (rejection.score > threshold) if check.keep_at_most else (rejection.score < threshold):
            return False
    return True


# ---------------------------------------------------------------- reading a finished output back


class ReadShardRecordsDoFn(beam.DoFn):
    """Shard manifest (or tar) path -> the SampleRecords in its tar (from KEY.json),
    each with `image_ref` pointing at its image member inside the tar (`offset`,
    `size` from the one tar index, `stages/core/tario.py`). Image bytes are not
    read. Given a manifest, the tar must hold exactly the samples it lists."""

    def __init__(self):
        self.records = Metrics.counter(Stage.SELECT.value, "records_read")

    def process(self, path: str) -> Iterator[SampleRecord]:
        expected = None
        if path.endswith(".json"):
            with FileSystems.open(path, compression_type="uncompressed") as f:
                manifest = ShardManifest.model_validate_json(f.read())
            expected = manifest.keys
            path = path.rsplit("/", 1)[0] + "/" + manifest.shard
        with FileSystems.open(path, mime_type="application/x-tar", compression_type="uncompressed") as f:
            try:
                samples = index_tar(f, path)
            except TruncatedTarError as err:
                raise ValueError(f"{err}; the shard is damaged, restore it from its source") from err
            if expected is not None and sorted(s.key for s in samples) != sorted(expected):
                raise ValueError(f"{path}: holds {len(samples)} samples but its manifest lists {len(expected)}; the shard was changed after it was written")
            for sample in samples:
                if "json" not in sample.members:
                    raise ValueError(f"{path}: sample {sample.key} has no .json member; is this an imagemill shard?")
                if sample.image_extension is None:
                    raise ValueError(f"{path}: sample {sample.key} has no image member ({sorted(sample.members)})")
                record = SampleRecord.model_validate_json(read_range(f, *sample.members["json"], path))
                offset, size = sample.members[sample.image_extension]
                ref = ImageRef(path=path, offset=offset, length=size)
                self.records.inc()
                yield record.model_copy(update={"image_ref": ref, "status": "pending", "shard": None})


class ReadShardRecords(beam.PTransform):
    """Glob of shard manifests (`shards/*.json`; a shard is complete iff its manifest
    exists) or of tars -> PCollection[SampleRecord] with image refs into the tars."""

    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = pattern

    def expand(self, pbegin):
        return (
            pbegin
            | "Match" >> fileio.MatchFiles(self.pattern, empty_match_treatment=fileio.EmptyMatchTreatment.ALLOW)
            | "Paths" >> beam.Map(lambda metadata: metadata.path)
            # One shard per worker task; the records are small.
            | "Spread" >> beam.Reshuffle()
            | "Read" >> beam.ParDo(ReadShardRecordsDoFn())
        )

"""Selection: the one step that drops samples on their scores (the plain-Python
rules; `stages/select.py` is the Beam adapter).

Scorers (`clip_score`, `safety`, `aesthetic`) only annotate records; this step
applies `SelectConfig`'s thresholds. It is cheap (no model, no pixels), so it
runs both inside `beam run curate` and alone in `beam run select`, which
re-applies thresholds to a finished output read back from its shards
(`stages.select.ReadShardRecords`).

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

from schemas import RejectReason, Rejection, SampleRecord, Stage
from schemas.scoring import SelectConfig
from stages.core.verdict import Drop


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

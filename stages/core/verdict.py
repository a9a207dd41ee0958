"""What a stage core returns besides the record: a `Drop` (the record leaves
the pipeline, and why), the `WithImage` pair that fused stages pass along, and
the `Rejection` row a drop becomes. Plain Python, no Beam."""

from __future__ import annotations

import dataclasses

from schemas import RejectReason, Rejection, SampleRecord, Stage


@dataclasses.dataclass(frozen=True)
class Drop:
    """A stage's verdict that a record leaves the pipeline, and why."""

    reason: RejectReason
    detail: str = ""
    duplicate_of: str | None = None
    score: float | None = None


@dataclasses.dataclass
class WithImage:
    """A record travelling with its image bytes. Only used inside fused stages
    (crawl -> decode -> staging); never crosses a shuffle."""

    record: SampleRecord
    data: bytes


def rejection(record: SampleRecord, stage: Stage, drop: Drop) -> Rejection:
    return Rejection(
        key=record.key,
        url=record.url,
        stage=stage,
        reason=drop.reason,
        detail=drop.detail,
        duplicate_of=drop.duplicate_of,
        score=drop.score,
        source_file=record.provenance.source_file,
        source_row=record.provenance.source_row,
    )

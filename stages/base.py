"""What every curation stage's Beam adapter shares: the rejects side output and its metrics.

A stage's core logic is plain Python returning either the (updated) record or a
`Drop` (`stages/core/verdict.py`); `FilterDoFn` turns that into Beam's main output plus a tagged `rejects`
output, and counts both under the stage's namespace (`kept`, `dropped_<reason>`),
as datatrove's filters do.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics

from schemas import RejectReason, Stage
from stages.core.verdict import Drop, WithImage, rejection

REJECTS = "rejects"

__all__ = ["REJECTS", "Drop", "FilterDoFn", "StageMetrics", "WithImage", "apply_filter", "rejection"]


class StageMetrics:
    """Counters named once per stage: `kept` and `dropped_<reason>`."""

    def __init__(self, stage: Stage):
        self.stage = stage
        self.kept = Metrics.counter(stage.value, "kept")
        self._dropped: dict[RejectReason, Any] = {}

    def dropped(self, reason: RejectReason):
        if reason not in self._dropped:
            self._dropped[reason] = Metrics.counter(self.stage.value, f"dropped_{reason.value}")
        return self._dropped[reason]


class FilterDoFn(beam.DoFn):
    """Base for one-record-at-a-time stages.

    Subclasses implement `apply(element) -> element | Drop`, where the element is
    a `SampleRecord` or a `WithImage`. Dropped rows go to the `rejects` output.
    """

    stage: Stage

    def __init__(self) -> None:
        self._metrics: StageMetrics | None = None

    @property
    def metrics(self) -> StageMetrics:
        if self._metrics is None:
            self._metrics = StageMetrics(self.stage)
        return self._metrics

    def apply(self, element):  # pragma: no cover - abstract
        raise NotImplementedError

    def process(self, element) -> Iterator[Any]:
        result = self.apply(element)
        yield from self.emit(element, result)

    def emit(self, element, result) -> Iterator[Any]:
        if isinstance(result, Drop):
            record = element.record if isinstance(element, WithImage) else element
            self.metrics.dropped(result.reason).inc()
            yield beam.pvalue.TaggedOutput(REJECTS, rejection(record, self.stage, result))
        else:
            self.metrics.kept.inc()
            yield result


def apply_filter(pcoll: beam.PCollection, label: str, dofn: FilterDoFn) -> tuple[beam.PCollection, beam.PCollection]:
    """Run a FilterDoFn; return (kept, rejects)."""
    outputs = pcoll | label >> beam.ParDo(dofn).with_outputs(REJECTS, main="kept")
    return outputs.kept, outputs[REJECTS]

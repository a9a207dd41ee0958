"""What every curation stage's Beam adapter shares: the rejects side output and its metrics.

A stage's core logic is plain Python returning either the (updated) record or a
`Drop` (`stages/core/verdict.py`); `FilterDoFn` turns that into Beam's main output plus a tagged `rejects`
output, and counts both under the stage's namespace (`kept`, `dropped_<reason>`),
as datatrove's filters do.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics

from schemas import RejectReason, Stage
from stages.core.verdict import Drop, WithImage, rejection
from stages.objstore import share_s3_clients

# Every process that runs a stage (the launcher, each worker) shares one S3 client.
share_s3_clients()

logger = logging.getLogger(__name__)

REJECTS = "rejects"
# Tag of the read stage's per-file failures (`InputFileError`), reported apart from row rejects.
INPUT_ERRORS = "input_errors"

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


class SystematicErrors(RuntimeError):
    """More than `max_error_rate` of a stage's rows raised unexpected errors:
    a bug or a broken environment, not bad rows. Stops the run."""


# Below this many rows a worker does not judge its error rate: one bad row in
# the first ten is not a trend.
MIN_ROWS_FOR_ERROR_RATE = 100


def internal_error(err: BaseException) -> Drop:
    return Drop(RejectReason.INTERNAL_ERROR, f"{type(err).__name__}: {str(err)[:500]}")


class FilterDoFn(beam.DoFn):
    """Base for one-record-at-a-time stages.

    Subclasses implement `apply(element) -> element | Drop`, where the element is
    a `SampleRecord` or a `WithImage`. Dropped rows go to the `rejects` output.
    An exception that `apply` raises becomes an `internal_error` reject naming
    the exception, so one row no check anticipated cannot kill a run; when more
    than `max_error_rate` of the rows a worker has seen (after the first
    `MIN_ROWS_FOR_ERROR_RATE`) raised, the stage fails with `SystematicErrors`
    instead, since that is a bug rather than bad input.
    """

    stage: Stage
    max_error_rate: float = 0.01

    def __init__(self) -> None:
        self._metrics: StageMetrics | None = None
        self._seen = 0
        self._errors = 0

    @property
    def metrics(self) -> StageMetrics:
        if self._metrics is None:
            self._metrics = StageMetrics(self.stage)
        return self._metrics

    def apply(self, element):  # pragma: no cover - abstract
        raise NotImplementedError

    def process(self, element) -> Iterator[Any]:
        try:
            result = self.apply(element)
        except Exception as err:  # noqa: BLE001 - every row must end somewhere; see the class docstring
            result = err
        yield from self.settle(element, result)

    def settle(self, element, result) -> Iterator[Any]:
        """Count and emit what `apply(element)` gave (or the exception it
        raised), also when it ran elsewhere, e.g. on a decoding thread of the crawl."""
        if isinstance(result, Exception):
            result = self.unexpected(element, result)
        else:
            self._seen += 1
        yield from self.emit(element, result)

    def unexpected(self, element, err: Exception) -> Drop:
        """Count an unexpected exception on one row; raise if they are systematic."""
        self._seen += 1
        self._errors += 1
        record = element.record if isinstance(element, WithImage) else element
        logger.warning("%s: row %s raised %s: %s", self.stage.value, getattr(record, "key", "?"), type(err).__name__, err)
        if self._seen >= MIN_ROWS_FOR_ERROR_RATE and self._errors > self.max_error_rate * self._seen:
            raise SystematicErrors(
                f"stage {self.stage.value}: {self._errors} of {self._seen} rows raised unexpected errors, over "
                f"max_error_rate={self.max_error_rate}; last: {type(err).__name__}: {err}"
            ) from err
        return internal_error(err)

    def emit(self, element, result) -> Iterator[Any]:
        if isinstance(result, Drop):
            record = element.record if isinstance(element, WithImage) else element
            self.metrics.dropped(result.reason).inc()
            yield beam.pvalue.TaggedOutput(REJECTS, rejection(record, self.stage, result))
        else:
            self.metrics.kept.inc()
            yield result


def apply_filter(
    pcoll: beam.PCollection, label: str, dofn: FilterDoFn, max_error_rate: float | None = None
) -> tuple[beam.PCollection, beam.PCollection]:
    """Run a FilterDoFn; return (kept, rejects)."""
    if max_error_rate is not None:
        dofn.max_error_rate = max_error_rate
    outputs = pcoll | label >> beam.ParDo(dofn).with_outputs(REJECTS, main="kept")
    return outputs.kept, outputs[REJECTS]

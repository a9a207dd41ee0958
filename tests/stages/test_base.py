"""FilterDoFn's safety net: an unexpected exception on one row becomes an
`internal_error` reject; many of them stop the stage."""

import apache_beam as beam
import pytest

from schemas import Provenance, RejectReason, SampleRecord, Stage
from stages.base import MIN_ROWS_FOR_ERROR_RATE, REJECTS, FilterDoFn, SystematicErrors


def record(i: int) -> SampleRecord:
    return SampleRecord(key=f"{i:014d}", url=f"http://example.com/{i}.jpg", caption_original="c",
                        provenance=Provenance(source_file="f", source_row=i))


class FailsOn(FilterDoFn):
    stage = Stage.CAPTION

    def __init__(self, failing: set[int]):
        super().__init__()
        self.failing = failing

    def apply(self, rec):
        if int(rec.key) in self.failing:
            raise KeyError(f"boom {rec.key}")
        return rec


def run(dofn: FilterDoFn, n: int):
    kept, rejects = [], []
    for i in range(n):
        for out in dofn.process(record(i)):
            (rejects if isinstance(out, beam.pvalue.TaggedOutput) else kept).append(out)
    return kept, rejects


def test_an_exception_on_one_row_becomes_an_internal_error_reject():
    kept, rejects = run(FailsOn({3}), 10)
    assert len(kept) == 9 and len(rejects) == 1
    reject = rejects[0]
    assert reject.tag == REJECTS
    assert reject.value.key == f"{3:014d}" and reject.value.reason == RejectReason.INTERNAL_ERROR
    assert reject.value.stage == Stage.CAPTION and reject.value.detail.startswith("KeyError: ")


def test_errors_under_the_rate_do_not_stop_the_stage():
    n = 10 * MIN_ROWS_FOR_ERROR_RATE
    kept, rejects = run(FailsOn(set(range(0, n, 200))), n)  # 0.5% < 1%
    assert len(rejects) == n // 200 and len(kept) + len(rejects) == n


def test_systematic_errors_stop_the_stage_once_a_trend_is_visible():
    dofn = FailsOn(set(range(0, 10_000, 10)))  # 10%
    with pytest.raises(SystematicErrors, match=r"stage caption: \d+ of \d+ rows raised unexpected errors"):
        run(dofn, 10_000)
    # At the first failing row once MIN_ROWS_FOR_ERROR_RATE rows were seen (one in ten fails).
    assert MIN_ROWS_FOR_ERROR_RATE <= dofn._seen < MIN_ROWS_FOR_ERROR_RATE + 10


def test_max_error_rate_is_configurable_and_zero_tolerates_nothing_after_the_minimum():
    dofn = FailsOn({MIN_ROWS_FOR_ERROR_RATE + 5})
    dofn.max_error_rate = 0.0
    with pytest.raises(SystematicErrors):
        run(dofn, 2 * MIN_ROWS_FOR_ERROR_RATE)

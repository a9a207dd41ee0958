"""A tiny pipeline the runner tests run locally and on the portable runner.

This module is not part of the package, so workers do not have it: the tests
register it with cloudpickle to be pickled by value (`ship_by_value()`). Its
code ships with the pipeline; the project modules it uses (`stages`, `schemas`)
are pickled by reference and must come from the staged sdist on the workers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import apache_beam as beam

import schemas
import stages
from schemas import Provenance, RejectReason, Rejection, SampleRecord, Stage
from stages.base import Drop, FilterDoFn, apply_filter

MIN_WORDS = 3


def ship_by_value() -> None:
    """Make Beam's pickler embed this module's code instead of importing it."""
    from apache_beam.internal.cloudpickle import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


class ShortCaptionFilter(FilterDoFn):
    """Drops records whose caption has fewer than `min_words` words."""

    stage = Stage.CAPTION

    def __init__(self, min_words: int = MIN_WORDS) -> None:
        super().__init__()
        self.min_words = min_words

    def apply(self, record: SampleRecord) -> SampleRecord | Drop:
        words = len(record.caption_original.split())
        if words < self.min_words:
            return Drop(RejectReason.SHORT_CAPTION, detail=f"{words} words < {self.min_words}")
        return record.model_copy(update={"caption": record.caption_original.strip()})


def sample_records(n: int) -> list[SampleRecord]:
    """`n` records; every third caption is one word short of MIN_WORDS."""
    records = []
    for i in range(n):
        words = MIN_WORDS - 1 if i % 3 == 0 else MIN_WORDS + i % 4
        records.append(
            SampleRecord(
                key=f"{i:06d}",
                url=f"https://example.com/{i}.jpg",
                caption_original=" ".join(f"word{j}" for j in range(words)),
                provenance=Provenance(source_file="memory", source_row=i),
            )
        )
    return records


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def where_am_i(_) -> str:
    """Runs on a worker: where the project and this test tree import from."""
    return json.dumps(
        {
            "pid": os.getpid(),
            "stages_file": stages.__file__,
            "schemas_file": schemas.__file__,
            "tests_importable": _importable("tests.portable"),
            "editable_finders": [type(f).__name__ for f in sys.meta_path if "editable" in repr(f).lower()],
        }
    )


def build(pipeline: beam.Pipeline, records: list[SampleRecord], out_prefix: str) -> None:
    """Filter `records`; write kept keys, rejections and one worker report as
    text files `<out_prefix>-{kept,rejects,probe}` (a single shard each)."""
    kept, rejects = apply_filter(pipeline | "Records" >> beam.Create(records), "ShortCaption", ShortCaptionFilter())
    (
        kept
        | "KeptJson" >> beam.Map(lambda r: json.dumps({"key": r.key, "caption": r.caption}))
        | "WriteKept" >> beam.io.WriteToText(f"{out_prefix}-kept", shard_name_template="")
    )
    (
        rejects
        | "RejectJson" >> beam.Map(Rejection.model_dump_json)
        | "WriteRejects" >> beam.io.WriteToText(f"{out_prefix}-rejects", shard_name_template="")
    )
    (
        pipeline
        | "One" >> beam.Create([None])
        | "WhereAmI" >> beam.Map(where_am_i)
        | "WriteProbe" >> beam.io.WriteToText(f"{out_prefix}-probe", shard_name_template="")
    )

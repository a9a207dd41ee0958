"""What the model stages' Beam adapters share: batching and resource hints for
`RunInference`, the handler mixin, and decoding a staged image once for every
model (`PrepareImagesDoFn`). Device choice and the CLIP-embedding heads are in
`stages/models/` (no Beam).

How a record reaches the models (see `pipelines/scoring.py`):
1. `PrepareImagesDoFn` reads the record's staged bytes (`ImageRef`), decodes
   them once (EXIF-transposed RGB) and asks each model's `Preparer` for its
   input: uint8 arrays, so a batch in flight stays 4x smaller than float32 and
   normalisation runs on the model's device.
2. `RunInference` with a model's `ModelHandler` batches the examples
   (`beam.BatchElements`), loads the model on the worker (`load_model`) and
   fills in the example's scores.
All of it is fused in one Beam stage: the arrays never cross a shuffle.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from schemas import RejectReason, SampleRecord, Stage
from schemas.scoring import BatchingConfig, ModelWorkerConfig
from stages.base import REJECTS, Drop, rejection
from stages.core.decode import decode_rgb

LOG = logging.getLogger(__name__)

# Namespace of the metrics of the shared scoring steps.
NAMESPACE = "scoring"


# ---------------------------------------------------------------- RunInference wiring


def model_handler_kwargs(batching: BatchingConfig, scoring: ModelWorkerConfig) -> dict[str, Any]:
    """Keyword arguments for `ModelHandler.__init__`: batch bounds and sharing."""
    kwargs: dict[str, Any] = {
        "min_batch_size": batching.min_batch_size,
        "max_batch_size": batching.max_batch_size,
    }
    if scoring.share_model_across_processes:
        # ModelHandler shares across processes when large_model or model_copies is set.
        kwargs["large_model"] = True
        kwargs["model_copies"] = scoring.model_copies or 1
    return kwargs


class ScoringHandlerMixin:
    """What the scoring ModelHandlers (CLIP, NudeNet) share. Subclasses set
    `metrics_namespace` and `_hints` (from `resource_hints`)."""

    metrics_namespace: str
    _hints: dict[str, str]

    def get_num_bytes(self, batch: Sequence[ScoringExample]) -> int:
        # Beam's default pickles the whole batch just to measure it.
        return sum(example.nbytes() for example in batch)

    def get_metrics_namespace(self) -> str:
        return self.metrics_namespace

    def get_resource_hints(self) -> dict:
        return dict(self._hints)


def resource_hints(scoring: ModelWorkerConfig) -> dict[str, str]:
    """Beam resource hints for the model steps (empty when none are set)."""
    hints = {}
    if scoring.accelerator:
        hints["accelerator"] = scoring.accelerator
    if scoring.min_ram:
        hints["min_ram"] = scoring.min_ram
    return hints


# ---------------------------------------------------------------- examples


@dataclasses.dataclass
class ScoringExample:
    """A record on its way through the models, with each model's input.

    Only lives inside the fused scoring stage; the arrays are dropped before
    the record leaves it.
    """

    record: SampleRecord
    inputs: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # model input name -> array

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.inputs.values())


class Preparer(Protocol):
    """Turns a decoded image (and its record) into one model's inputs."""

    def setup(self) -> None: ...

    def __call__(self, image, record: SampleRecord) -> dict[str, np.ndarray]: ...


def _read_staged(ref):
    from stages.staging import read_image_bytes

    return read_image_bytes(ref)


class PrepareImagesDoFn(beam.DoFn):
    """SampleRecord -> ScoringExample with every model's input.

    Reads the staged bytes and decodes them once for all models. A record whose
    bytes cannot be read (`staging_lost`) or decoded (`not_an_image`) goes to
    the `rejects` output at stage `select` (they passed decoding earlier, so
    this means the staging files were lost or corrupted).
    """

    def __init__(self, preparers: Sequence[Preparer]):
        self.preparers = list(preparers)
        self.prepared = Metrics.counter(NAMESPACE, "prepared")
        self.lost = Metrics.counter(NAMESPACE, f"dropped_{RejectReason.STAGING_LOST.value}")
        self.undecodable = Metrics.counter(NAMESPACE, f"dropped_{RejectReason.NOT_AN_IMAGE.value}")

    def setup(self):
        for preparer in self.preparers:
            preparer.setup()

    def process(self, record: SampleRecord) -> Iterator[Any]:
        if record.image_ref is None:
            raise ValueError(f"{record.key}: no image_ref; the model stages run after staging")
        try:
            data = _read_staged(record.image_ref)
        except Exception as err:  # a lost staging file costs the sample, not the run
            self.lost.inc()
            drop = Drop(RejectReason.STAGING_LOST, f"{record.image_ref.path}: {err}"[:300])
            yield beam.pvalue.TaggedOutput(REJECTS, rejection(record, Stage.SELECT, drop))
            return
        try:
            image = decode_rgb(data)
        except Exception as err:
            self.undecodable.inc()
            drop = Drop(RejectReason.NOT_AN_IMAGE, f"staged bytes no longer decode: {err}"[:300])
            yield beam.pvalue.TaggedOutput(REJECTS, rejection(record, Stage.SELECT, drop))
            return
        example = ScoringExample(record)
        for preparer in self.preparers:
            example.inputs.update(preparer(image, record))
        self.prepared.inc()
        yield example

"""The selection stage in Beam: `SelectDoFn`/`apply_select` over the rules in
`stages/core/select.py` (which say what is dropped, in which order, and why),
and `ReadShardRecords`, which reads a finished output's records back from its
shards for `beam run select`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from schemas import ImageRef, SampleRecord, ShardManifest, Stage
from schemas.scoring import SelectConfig
from stages.base import REJECTS, Drop, FilterDoFn, apply_filter
from stages.core.select import select
from stages.core.tario import TruncatedTarError, index_tar, read_range

LOG = logging.getLogger(__name__)


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

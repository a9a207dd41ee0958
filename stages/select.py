"""The selection stage in Beam: `SelectDoFn`/`apply_select` over the rules in
`stages/core/select.py` (which say what is dropped, in which order, and why),
and `ReadShardRecords`, which reads a finished output's records back from its
shards for `beam run select`.
"""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Iterator

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from schemas import ImageRef, SampleRecord, Stage
from schemas.scoring import SelectConfig
from stages.base import REJECTS, Drop, FilterDoFn, apply_filter
from stages.core.select import select

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


def shard_members(fileobj) -> Iterator[tuple[str, dict[str, tarfile.TarInfo]]]:
    """(key, {extension: member}) for each sample of a WebDataset tar, in tar
    order. The key is the member name up to its first dot (WebDataset's rule);
    a sample's members are contiguous."""
    with tarfile.open(fileobj=fileobj, mode="r:") as tar:
        key, members = None, {}
        for member in tar:
            if not member.isfile():
                continue
            base = member.name.rsplit("/", 1)[-1]
            prefix = member.name[: len(member.name) - len(base)]
            stem, _, extension = base.partition(".")
            sample = prefix + stem
            if sample != key and members:
                yield key, members
                members = {}
            key = sample
            members[extension] = member
        if members:
            yield key, members


class ReadShardRecordsDoFn(beam.DoFn):
    """Shard path -> the SampleRecords in it (from KEY.json), each with
    `image_ref` pointing at its image member inside the tar (tar members are
    contiguous: `offset_data`, `size`). Image bytes are not read."""

    IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")

    def __init__(self):
        self.records = Metrics.counter(Stage.SELECT.value, "records_read")

    def process(self, path: str) -> Iterator[SampleRecord]:
        with FileSystems.open(path, mime_type="application/x-tar", compression_type="uncompressed") as f:
            for key, members in shard_members(f):
                if "json" not in members:
                    raise ValueError(f"{path}: sample {key} has no .json member; is this an imagemill shard?")
                image = next((members[e] for e in self.IMAGE_EXTENSIONS if e in members), None)
                if image is None:
                    raise ValueError(f"{path}: sample {key} has no image member ({sorted(members)})")
                position = f.tell()
                f.seek(members["json"].offset_data)
                record = SampleRecord.model_validate_json(f.read(members["json"].size))
                f.seek(position)
                ref = ImageRef(path=path, offset=image.offset_data, length=image.size)
                self.records.inc()
                yield record.model_copy(update={"image_ref": ref, "status": "pending", "shard": None})


class ReadShardRecords(beam.PTransform):
    """Glob of shard tars -> PCollection[SampleRecord] with image refs into them."""

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

"""Committed work units: what makes a killed `beam run curate` resumable.

The expensive half of a run (fetch, decode, hash, stage the bytes) runs per
crawl key (`stages/crawl.py`: rows grouped by host). Inside a key, finished
rows are committed in parts of up to `checkpoint.rows` rows (or every
`checkpoint.seconds`): the staging file holding the part's bytes is closed
first, then the part itself, `DIR/_parts/<crawl key>/<uuid>.jsonl` (one line
per row: the staged record with its `ImageRef`, or its rejection), is
written whole (`write_atomically`). A part that exists is complete; its rows
are committed.

A resumed run groups rows under the same crawl keys (keys are stable for the
same input and config) and, per key, emits the rows of its committed parts
as they were, and fetches only the rest. The cheap half (dedup, scoring,
selection, shards, tables, report) always runs whole over all committed rows,
so a resumed run ends with exactly the rows, decisions and survivors of an
uninterrupted one.

Parts and staging files are deleted at the end of a successful run. On
Dataflow and Flink they live under the output folder like everything else (a
bucket path), so a new job with `--resume` finds them whatever happened to
the workers of the old one.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterator

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from schemas import CheckpointConfig, CrawlConfig, DecodeConfig, Rejection, SampleRecord
from stages.base import REJECTS
from stages.crawl import CrawlDoFn, KeyByHost
from stages.resolution import DecodeDoFn
from stages.shards import write_atomically
from stages.staging import StagingFile

LOG = logging.getLogger(__name__)

PARTS_DIR = "_parts"
_NS = "checkpoint"


def parts_dir(output_dir: str, crawl_key: str | None = None) -> str:
    base = FileSystems.join(output_dir, PARTS_DIR)
    return FileSystems.join(base, crawl_key) if crawl_key else base


def committed_parts(output_dir: str, crawl_key: str) -> list[str]:
    """The part files committed for `crawl_key` (none for a fresh run)."""
    pattern = FileSystems.join(parts_dir(output_dir, crawl_key), "*.jsonl")
    try:
        return sorted(m.path for r in FileSystems.match([pattern]) for m in r.metadata_list)
    except Exception:  # noqa: BLE001 - a folder that does not exist matches nothing
        return []


def read_part(path: str) -> Iterator[SampleRecord | Rejection]:
    with FileSystems.open(path, compression_type="uncompressed") as f:
        for line in f.read().decode("utf-8").splitlines():
            item = json.loads(line)
            if "record" in item:
                yield SampleRecord.model_validate(item["record"])
            else:
                yield Rejection.model_validate(item["reject"])


class _Part:
    """Rows finished since the last commit, and the staging file their bytes are in."""

    def __init__(self, output_dir: str):
        self.staging = StagingFile(output_dir)
        self.records: list[SampleRecord] = []
        self.rejects: list[Rejection] = []
        self.started = time.monotonic()

    def __len__(self) -> int:
        return len(self.records) + len(self.rejects)

    def lines(self) -> bytes:
        lines = [json.dumps({"record": r.model_dump(mode="json", exclude_defaults=True)}) for r in self.records]
        lines += [json.dumps({"reject": r.model_dump(mode="json", exclude_defaults=True)}) for r in self.rejects]
        return ("\n".join(lines) + "\n").encode()


class CrawlUnitsDoFn(CrawlDoFn):
    """(crawl key, records) -> staged records (bytes in a staging file, `image_ref`
    set), and the crawl and decode rejections on `rejects`; committed in parts
    (see the module docstring). With `checkpoint.enabled` off, nothing is
    committed and nothing is skipped (the bookkeeping's cost is measured
    against that)."""

    def __init__(
        self,
        output_dir: str,
        crawl: CrawlConfig,
        decode: DecodeConfig,
        checkpoint: CheckpointConfig,
        max_error_rate: float,
    ) -> None:
        super().__init__(crawl)
        self.output_dir = output_dir
        self.decode = decode
        self.checkpoint = checkpoint
        self.max_error_rate = max_error_rate

    def setup(self) -> None:
        super().setup()
        self._decoder = DecodeDoFn(self.decode)
        self._decoder.max_error_rate = self.max_error_rate
        self._decoder.setup()
        self._parts_committed = Metrics.counter(_NS, "parts_committed")
        self._rows_resumed = Metrics.counter(_NS, "rows_resumed")
        self._staged_bytes = Metrics.counter("staging", "bytes")

    def process(self, element, hot=None):
        crawl_key, records = element
        done: set[str] = set()
        if self.checkpoint.enabled:
            for path in committed_parts(self.output_dir, crawl_key):
                for item in read_part(path):
                    done.add(item.key)
                    yield item if isinstance(item, SampleRecord) else beam.pvalue.TaggedOutput(REJECTS, item)
            if done:
                self._rows_resumed.inc(len(done))
        todo = (record for record in records if record.key not in done)
        part = _Part(self.output_dir)
        # Decoding (and hashing) runs on the fetching threads (`then`); counting
        # and staging here, on the DoFn's thread, where Beam's metrics are recorded.
        for fetched, decoded in self.crawl(todo, hot or {}, then=self._decoder.apply):
            if isinstance(fetched, beam.pvalue.TaggedOutput):
                part.rejects.append(fetched.value)
                continue
            for out in self._decoder.settle(fetched, decoded):
                if isinstance(out, beam.pvalue.TaggedOutput):
                    part.rejects.append(out.value)
                    continue
                ref = part.staging.append(out.data)
                self._staged_bytes.inc(len(out.data))
                part.records.append(out.record.model_copy(update={"image_ref": ref}))
            if len(part) >= self.checkpoint.rows or time.monotonic() - part.started >= self.checkpoint.seconds:
                yield from self._commit(crawl_key, part)
                part = _Part(self.output_dir)
        if len(part):
            yield from self._commit(crawl_key, part)

    def _commit(self, crawl_key: str, part: _Part):
        # The bytes first: a committed part never refers to a file still being written.
        part.staging.close()
        if self.checkpoint.enabled:
            path = FileSystems.join(parts_dir(self.output_dir, crawl_key), f"{uuid.uuid4().hex}.jsonl")
            write_atomically(path, part.lines())
            self._parts_committed.inc()
        yield from part.records
        for reject in part.rejects:
            yield beam.pvalue.TaggedOutput(REJECTS, reject)


class CrawlCommitted(beam.PTransform):
    """records -> (staged records, rejects): crawl, decode and stage by crawl
    key, committed in parts under `DIR/_parts/` (see the module docstring)."""

    def __init__(self, output_dir: str, crawl: CrawlConfig, decode: DecodeConfig, checkpoint: CheckpointConfig, max_error_rate: float):
        super().__init__()
        self.output_dir = output_dir
        self.crawl = crawl
        self.decode = decode
        self.checkpoint = checkpoint
        self.max_error_rate = max_error_rate

    def expand(self, records):
        keyed, hot = records | "KeyByHost" >> KeyByHost(self.crawl)
        outputs = (
            keyed
            | "GroupByCrawlKey" >> beam.GroupByKey()
            | "FetchDecodeStage"
            >> beam.ParDo(
                CrawlUnitsDoFn(self.output_dir, self.crawl, self.decode, self.checkpoint, self.max_error_rate), hot
            ).with_outputs(REJECTS, main="staged")
        )
        return outputs.staged, outputs[REJECTS]

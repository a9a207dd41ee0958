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
import os
import queue
import threading
import time
import uuid
from collections.abc import Iterator

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue

from schemas import CheckpointConfig, CrawlConfig, DecodeConfig, Rejection, SampleRecord
from stages.base import REJECTS
from stages.core.host_schedule import PENDING
from stages.crawl import AfterFetch, CrawlDoFn, KeyByHost
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
    """Rows of one crawl key finished since its last commit."""

    def __init__(self):
        self.records: list[SampleRecord] = []
        self.rejects: list[Rejection] = []
        self.started = time.monotonic()

    def __len__(self) -> int:
        return len(self.records) + len(self.rejects)

    def lines(self) -> bytes:
        lines = [json.dumps({"record": r.model_dump(mode="json", exclude_defaults=True)}) for r in self.records]
        lines += [json.dumps({"reject": r.model_dump(mode="json", exclude_defaults=True)}) for r in self.rejects]
        return ("\n".join(lines) + "\n").encode()


class _Key:
    """A crawl key of the bundle whose rows are still being fetched."""

    __slots__ = ("part", "submitted", "finished", "fed")

    def __init__(self):
        self.part = _Part()
        self.submitted = 0  # rows handed to the scheduler
        self.finished = 0  # rows whose result came back
        self.fed = False  # every row of the key has been handed over

    @property
    def done(self) -> bool:
        return self.fed and self.finished == self.submitted


_END = object()


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


class _Feed:
    """One `HostScheduler` for every crawl key of a bundle, run on a thread of
    its own: the DoFn hands it `(crawl key, record)` rows as `process` reads
    each key, and collects results as they come. One key's slow tail (a
    hanging host's last timeouts, a rate-limited host's last rows) then
    overlaps the next keys' fetches instead of idling the worker; each key
    is still fetched inside this one scheduler, so its hosts' budgets hold."""

    def __init__(self, scheduler, size: int):
        self._inbox: queue.Queue = queue.Queue(maxsize=size)
        self._outbox: queue.Queue = queue.Queue()
        self.scheduler = scheduler
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._drive, name="crawl-feed", daemon=True)
        self._thread.start()
        self.ended = False

    def _rows(self):
        while not self._stopped.is_set():
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                yield PENDING
                continue
            if item is _END:
                return
            yield item

    def _drive(self) -> None:
        try:
            for row, done in self.scheduler.run(self._rows()):
                self._outbox.put((row, done))
        except BaseException as err:  # noqa: BLE001 - re-raised on the DoFn's thread
            self._outbox.put(_Failed(err))
        finally:
            self._outbox.put(_END)

    def stop(self) -> None:
        """End the input of a feed whose bundle failed (its results are dropped:
        the retried bundle fetches those rows again)."""
        self._stopped.set()

    def offer(self, item, timeout: float = 0.05) -> bool:
        """Hand over a row (or `_END`); False if the feed is full (collect, then offer again)."""
        try:
            self._inbox.put(item, timeout=timeout)
            return True
        except queue.Full:
            return False

    def results(self, wait: float = 0.0) -> list:
        """The `(row, result)` pairs ready now (waiting up to `wait` s for the
        first); sets `ended` once the scheduler has returned."""
        out = []
        try:
            item = self._outbox.get(timeout=wait) if wait else self._outbox.get_nowait()
            while True:
                if item is _END:
                    self.ended = True
                    break
                if isinstance(item, _Failed):
                    raise item.error
                out.append(item)
                item = self._outbox.get_nowait()
        except queue.Empty:
            pass
        return out


class CrawlUnitsDoFn(CrawlDoFn):
    """(crawl key, records) -> staged records (bytes in a staging file, `image_ref`
    set), and the crawl and decode rejections on `rejects`; committed in parts
    (see the module docstring). With `checkpoint.enabled` off, nothing is
    committed and nothing is skipped (the bookkeeping's cost is measured
    against that).

    The keys of a bundle are fetched together (`_Feed`): a key's results may
    leave during a later key's `process` or in `finish_bundle`. The bytes of
    every key go to one staging file, which is closed (and a new one begun)
    whenever a part is committed, so a committed part never refers to a file
    still being written.
    """

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
        self._after_fetch = AfterFetch(
            self._decoder.apply, threads=self.decode.threads or available_cpus(), max_pending=self.config.threads
        )
        self._parts_committed = Metrics.counter(_NS, "parts_committed")
        self._rows_resumed = Metrics.counter(_NS, "rows_resumed")
        self._staged_bytes = Metrics.counter("staging", "bytes")

    def start_bundle(self) -> None:
        self._stop_feed()
        self._feed: _Feed | None = None
        self._keys: dict[str, _Key] = {}
        self._staging = StagingFile(self.output_dir)

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
        if self._feed is None:
            # Decoding (and hashing) runs on the decode threads (`AfterFetch`); counting
            # and staging here, on the DoFn's thread, where Beam's metrics are recorded.
            scheduler = self.scheduler(hot or {}, then=self._after_fetch.submit, record_of=lambda row: row[1])
            self._feed = _Feed(scheduler, size=self.config.threads)
        key = self._keys.setdefault(crawl_key, _Key())
        for record in records:
            if record.key in done:
                continue
            while not self._feed.offer((crawl_key, record)):
                yield from self._collect()
            key.submitted += 1
        key.fed = True
        # Checked before collecting: once `fed` is set, `_collect` closes the key
        # itself when its last result arrives (closing it twice would fail).
        if key.done:
            yield from self._close_key(crawl_key)
        yield from self._collect()

    def finish_bundle(self):
        if self._feed is None:
            return
        while not self._feed.offer(_END):
            yield from map(_windowed, self._collect())
        while not self._feed.ended:
            yield from map(_windowed, self._collect(wait=0.5))
        self.count_hosts_down(self._feed.scheduler)
        self._feed = None
        if self._keys:  # every key was fed whole and the scheduler has answered every row
            raise RuntimeError(f"crawl keys left with rows unanswered: {sorted(self._keys)[:5]}")

    def teardown(self) -> None:
        self._stop_feed()
        after_fetch = getattr(self, "_after_fetch", None)
        if after_fetch is not None:
            after_fetch.close()
        super().teardown()

    def _stop_feed(self) -> None:
        feed = getattr(self, "_feed", None)
        if feed is not None:  # left by a bundle that failed
            feed.stop()
            self._feed = None

    def _collect(self, wait: float = 0.0):
        """Settle the results ready now (waiting up to `wait` s); commit the parts that are due."""
        for (crawl_key, record), result in self._feed.results(wait):
            key = self._keys[crawl_key]
            key.finished += 1
            fetched, decoded = self.emit(record, result)
            if isinstance(fetched, beam.pvalue.TaggedOutput):
                key.part.rejects.append(fetched.value)
            else:
                for out in self._decoder.settle(fetched, decoded):
                    if isinstance(out, beam.pvalue.TaggedOutput):
                        key.part.rejects.append(out.value)
                        continue
                    ref = self._staging.append(out.data)
                    self._staged_bytes.inc(len(out.data))
                    key.part.records.append(out.record.model_copy(update={"image_ref": ref}))
            if key.done:
                yield from self._close_key(crawl_key)
            elif len(key.part) >= self.checkpoint.rows or time.monotonic() - key.part.started >= self.checkpoint.seconds:
                yield from self._commit(crawl_key, key)

    def _close_key(self, crawl_key: str):
        key = self._keys.pop(crawl_key)
        if len(key.part):
            yield from self._commit(crawl_key, key)

    def _commit(self, crawl_key: str, key: _Key):
        # The bytes first: a committed part never refers to a file still being written.
        self._staging.close()
        self._staging = StagingFile(self.output_dir)
        part, key.part = key.part, _Part()
        if self.checkpoint.enabled:
            path = FileSystems.join(parts_dir(self.output_dir, crawl_key), f"{uuid.uuid4().hex}.jsonl")
            write_atomically(path, part.lines())
            self._parts_committed.inc()
        yield from part.records
        for reject in part.rejects:
            yield beam.pvalue.TaggedOutput(REJECTS, reject)


def available_cpus() -> int:
    """CPUs this process may run on (a container's or a taskset's share, not the machine's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _windowed(output):
    """An output of `finish_bundle`, which Beam takes only as a WindowedValue
    (every row of a curate run is in the global window)."""
    if isinstance(output, beam.pvalue.TaggedOutput):
        return beam.pvalue.TaggedOutput(output.tag, _windowed(output.value))
    return WindowedValue(output, GlobalWindow().max_timestamp(), [GlobalWindow()])


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

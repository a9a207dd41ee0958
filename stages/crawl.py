"""The crawl stage: the Beam adapter over `stages/core/fetch.py` (what is kept
and dropped, how fetching is kept safe) and `stages/core/host_schedule.py`
(per-host rate, connections, back-off, host down).

**Politeness for the whole job comes from how rows are grouped.** Each row is
keyed by its host into a crawl key, and one key is fetched by one DoFn call
(one worker at a time), so the per-host budget the scheduler enforces inside
the call is the host's budget for the job, on any runner and any number of
workers. Hosts are hashed into `host_groups` keys, so a long tail of hosts
with a URL or two each does not become one tiny element per host; a key's
scheduler works on all its hosts at once. A hot host (more than
`hot_host_rows` rows) gets keys of its own: up to `max_per_host` sub-keys,
each with its share of the host's budget, so several workers can crawl it
when its budget allows. Only row metadata is grouped; bytes are fetched after.

Fetched records leave as `WithImage(record, data)` with `record.provenance`
filled in (`final_url`, `http_status`, `content_type`, `fetched_at`);
failures as one `Rejection` each (stage `crawl`), including
`host_unreachable` for rows of a host the scheduler declared down.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import threading
import zlib
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone

import apache_beam as beam
from apache_beam.metrics import Metrics

from schemas import CrawlConfig, SampleRecord, Stage
from stages.base import REJECTS, StageMetrics, WithImage, internal_error, rejection
from stages.core.fetch import HOST_FAILURE_REASONS, Fetcher, FetchResult
from stages.core.host_schedule import HostScheduler, Outcome, host_budget, host_of, probe_interval_s
from stages.core.verdict import Drop

logger = logging.getLogger(__name__)


def host_splits(config: CrawlConfig, host: str, rows: int) -> int:
    """How many sub-keys a host with `rows` rows is crawled under (1: not hot)."""
    if rows <= config.hot_host_rows:
        return 1
    return max(1, min(math.ceil(rows / config.hot_host_rows), host_budget(config, host).connections))


def crawl_key(config: CrawlConfig, host: str, row_key: str, hot: dict[str, int]) -> str:
    """The crawl key of a row: `h<host hash>-<sub-key>` for a hot host, else
    `g<group>`. Stable across runs (crc32, not Python's salted hash), so a
    resumed run finds its committed parts under the same keys."""
    splits = hot.get(host, 1)
    if splits > 1:
        return f"h{zlib.crc32(host.encode()):08x}-{zlib.crc32(row_key.encode()) % splits}"
    return f"g{zlib.crc32(host.encode()) % config.host_groups:05d}"


def fetch_outcome(result: FetchResult) -> Outcome:
    """What the scheduler reads from a `FetchResult`."""
    untried = result.requests == 0 and result.drop is not None and result.drop.reason in HOST_FAILURE_REASONS
    return Outcome(
        host_failure=result.host_failure,
        reached_host=result.requests > 0,
        untried=untried,
        retry_after_s=result.retry_after_s,
        status=result.http_status,
    )


class KeyByHost(beam.PTransform):
    """records -> (crawl key, record), and the hot hosts' split counts as a side input."""

    def __init__(self, config: CrawlConfig):
        super().__init__()
        self.config = config

    def expand(self, records):
        config = self.config
        hot = (
            records
            | "Host" >> beam.Map(lambda r: (host_of(r.url), 1))
            | "RowsPerHost" >> beam.CombinePerKey(sum)
            | "HotHosts" >> beam.Filter(lambda kv: kv[1] > config.hot_host_rows)
            | "Splits" >> beam.Map(lambda kv: (kv[0], host_splits(config, kv[0], kv[1])))
        )
        hot_view = beam.pvalue.AsDict(hot)
        keyed = records | "CrawlKey" >> beam.Map(
            lambda r, hot: (crawl_key(config, host_of(r.url), r.key, hot), r), hot_view
        )
        return keyed, hot_view


class CrawlDoFn(beam.DoFn):
    """(crawl key, records) -> `WithImage` per fetched record, and one
    `Rejection` per failure on `rejects`.

    Metrics (namespace `crawl`): `kept`, `dropped_<reason>`, `hosts_down`, and
    the distributions `fetch_ms` (wall time per fetch, retries included) and
    `fetch_bytes` (body size of kept records).
    """

    def __init__(self, config: CrawlConfig) -> None:
        self.config = config
        self._fetcher: Fetcher | None = None
        self._metrics: StageMetrics | None = None

    def setup(self) -> None:
        self._fetcher = Fetcher(self.config)
        self._metrics = StageMetrics(Stage.CRAWL)
        self._fetch_ms = Metrics.distribution(Stage.CRAWL.value, "fetch_ms")
        self._fetch_bytes = Metrics.distribution(Stage.CRAWL.value, "fetch_bytes")
        self._hosts_down = Metrics.counter(Stage.CRAWL.value, "hosts_down")

    def process(self, element, hot=None):
        _, records = element
        for emitted, _ in self.crawl(records, hot or {}):
            yield emitted

    def teardown(self) -> None:
        if self._fetcher is not None:
            self._fetcher.close()  # idle keep-alive connections

    def crawl(self, records: Iterable[SampleRecord], hot: dict[str, int], then=None) -> Iterator:
        """Fetch `records` under the per-host budgets. Yields `(output, then_result)`:
        the output is a `WithImage` or `TaggedOutput(REJECTS, Rejection)`;
        `then(fetched: WithImage)`, if given, is called on the fetching thread
        right after a successful fetch, and its result (or the exception it
        raised) comes along. A `then` that hands the work to threads of its own
        (`AfterFetch.submit`) returns a Future, which `emit` waits for."""
        scheduler = self.scheduler(hot, then)
        for record, done in scheduler.run(records):
            yield self.emit(record, done)
        self.count_hosts_down(scheduler)

    def scheduler(self, hot: dict[str, int], then=None, record_of=None) -> HostScheduler:
        """A `HostScheduler` that fetches rows (records, or anything `record_of`
        maps to its record) and runs `then` after each successful fetch; read
        its results with `emit`. Budgets are the crawl config's, each hot
        host's divided by its number of sub-keys (`hot`)."""
        assert self._fetcher is not None and self._metrics is not None
        fetcher = self._fetcher
        record_of = record_of or (lambda row: row)

        def work(row, pace):
            record = record_of(row)
            result = fetcher.fetch(record.url, before_request=pace, hedge=pace.hedge, on_answer=pace.answered)
            after = None
            if then is not None and result.drop is None and result.data is not None:
                try:
                    after = then(WithImage(with_fetch_provenance(record, result), result.data))
                except Exception as err:  # noqa: BLE001 - handed back with the row; the caller decides
                    after = err
            return result, after

        return HostScheduler(
            fetch=work,
            outcome=lambda done: fetch_outcome(done[0]),
            url_of=lambda row: record_of(row).url,
            budget_of=lambda host: host_budget(self.config, host, hot.get(host, 1)),
            threads=self.config.threads,
            down_after=self.config.host_down_after,
            max_retry_after_s=self.config.max_retry_after_s,
            probe_every_s=probe_interval_s(self.config),
        )

    def emit(self, record: SampleRecord, done) -> tuple:
        """A scheduler result -> `(output, then_result)` (see `crawl`); counts
        it in the metrics, so it runs on the DoFn's thread."""
        if isinstance(done, tuple):
            result, after = done
            if isinstance(after, concurrent.futures.Future):
                try:
                    after = after.result()
                except Exception as err:  # noqa: BLE001 - handed back with the row, as from `then` itself
                    after = err
            return self._emit(record, result), after
        return self._emit(record, done), None

    def count_hosts_down(self, scheduler: HostScheduler) -> None:
        if scheduler.hosts_declared_down:
            self._hosts_down.inc(scheduler.hosts_declared_down)

    def _emit(self, record: SampleRecord, result):
        if isinstance(result, Exception):
            logger.warning("crawl: %s raised %s: %s", record.url, type(result).__name__, result)
            result = internal_error(result)
        if isinstance(result, Drop):
            self._metrics.dropped(result.reason).inc()
            return beam.pvalue.TaggedOutput(REJECTS, rejection(record, Stage.CRAWL, result))
        assert isinstance(result, FetchResult)
        self._fetch_ms.update(int(result.elapsed_s * 1000))
        if result.drop is not None:
            self._metrics.dropped(result.drop.reason).inc()
            return beam.pvalue.TaggedOutput(REJECTS, rejection(record, Stage.CRAWL, result.drop))
        assert result.data is not None
        self._metrics.kept.inc()
        self._fetch_bytes.update(len(result.data))
        return WithImage(with_fetch_provenance(record, result), result.data)


class AfterFetch:
    """Runs `then` (decoding, in a curate run) on `threads` threads of its own,
    so a fetching thread is free for its next request as soon as a body is in
    (img2dataset's downloader threads also only download). Without it, a
    fetching thread also waits its turn for a CPU to decode, and on a web
    where slow hosts already hold threads for seconds per answer, the threads
    run out before the CPUs are busy.

    At most `max_pending` bodies wait or are being worked on: a fetching
    thread that would add one more waits for a slot, which holds back new
    requests while the CPUs are what binds. Thread-safe; make one per DoFn
    instance in `setup` (it holds threads, so it is never pickled)."""

    def __init__(self, then, threads: int, max_pending: int) -> None:
        self._then = then
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="decode")
        self._slots = threading.BoundedSemaphore(max(threads, max_pending))

    def submit(self, fetched) -> concurrent.futures.Future:
        self._slots.acquire()
        try:
            future = self._pool.submit(self._then, fetched)
        except BaseException:  # shut down: the caller gets the error as the row's result
            self._slots.release()
            raise
        # Done or cancelled (`close`), the slot is free again: a fetching thread
        # waiting for one is never left waiting on a pool that is gone.
        future.add_done_callback(self._release)
        return future

    def _release(self, _future) -> None:
        self._slots.release()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def with_fetch_provenance(record: SampleRecord, result: FetchResult) -> SampleRecord:
    provenance = record.provenance.model_copy(
        update={
            "final_url": result.final_url,
            "http_status": result.http_status,
            "content_type": result.content_type,
            "fetched_at": datetime.now(timezone.utc),
        }
    )
    return record.model_copy(update={"provenance": provenance})


class Crawl(beam.PTransform):
    """`records | Crawl(config)` -> `(fetched, rejects)`: rows grouped by host
    into crawl keys (metadata only), each key fetched by one `CrawlDoFn` call.
    The result unpacks as a pair and also has `.fetched` and `[REJECTS]`."""

    def __init__(self, config: CrawlConfig, label: str | None = None) -> None:
        super().__init__(label)
        self.config = config

    def expand(self, records: beam.PCollection) -> beam.pvalue.DoOutputsTuple:
        keyed, hot = records | "KeyByHost" >> KeyByHost(self.config)
        return (
            keyed
            | "GroupByCrawlKey" >> beam.GroupByKey()
            | "Fetch" >> beam.ParDo(CrawlDoFn(self.config), hot).with_outputs(REJECTS, main="fetched")
        )

"""The crawl stage: the Beam adapter over `stages/core/fetch.py` (which says
what is kept and dropped, and how fetching is kept safe). Records are batched
and each batch is fetched concurrently; fetched records leave as
`WithImage(record, data)` with `record.provenance` filled in (`final_url`,
`http_status`, `content_type`, `fetched_at`), failures as one `Rejection` each
(stage `crawl`).
"""

from __future__ import annotations

import concurrent.futures
import logging
from datetime import datetime, timezone

import apache_beam as beam
from apache_beam.metrics import Metrics

from schemas import CrawlConfig, RejectReason, Stage
from stages.base import REJECTS, StageMetrics, WithImage, internal_error, rejection
from stages.core.fetch import Fetcher

logger = logging.getLogger(__name__)


class CrawlDoFn(beam.DoFn):
    """Fetches a batch of records concurrently (`config.threads` threads).

    Input: `list[SampleRecord]` (from `beam.BatchElements`). Main output:
    `WithImage` per fetched record; `rejects` output: one `Rejection` per
    failure. Metrics (namespace `crawl`): `kept`, `dropped_<reason>`, and the
    distributions `fetch_ms` (wall time per record, retries included) and
    `fetch_bytes` (body size of kept records).
    """

    def __init__(self, config: CrawlConfig) -> None:
        self.config = config
        self._fetcher: Fetcher | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._metrics: StageMetrics | None = None
        self._fetch_ms = None
        self._fetch_bytes = None

    def setup(self) -> None:
        self._fetcher = Fetcher(self.config)
        self._pool = concurrent.futures.ThreadPoolExecutor(self.config.threads, thread_name_prefix="crawl")
        self._metrics = StageMetrics(Stage.CRAWL)
        self._fetch_ms = Metrics.distribution(Stage.CRAWL.value, "fetch_ms")
        self._fetch_bytes = Metrics.distribution(Stage.CRAWL.value, "fetch_bytes")

    def process(self, batch):
        """`batch`: list[SampleRecord]. Yields `WithImage` or `TaggedOutput(REJECTS, Rejection)`."""
        assert self._pool is not None and self._fetcher is not None and self._metrics is not None
        # Yield each result as soon as it arrives: the fused decode step then
        # works on finished downloads while the rest of the batch is in flight.
        pending = {self._pool.submit(self._fetcher.fetch, record.url): record for record in batch}
        for future in concurrent.futures.as_completed(pending):
            record = pending.pop(future)
            try:
                result = future.result()
            except Exception as err:  # noqa: BLE001 - a fetch bug loses its row to rejects, not the run
                logger.warning("crawl: %s raised %s: %s", record.url, type(err).__name__, err)
                self._metrics.dropped(RejectReason.INTERNAL_ERROR).inc()
                yield beam.pvalue.TaggedOutput(REJECTS, rejection(record, Stage.CRAWL, internal_error(err)))
                continue
            self._fetch_ms.update(int(result.elapsed_s * 1000))
            if result.drop is not None:
                self._metrics.dropped(result.drop.reason).inc()
                yield beam.pvalue.TaggedOutput(REJECTS, rejection(record, Stage.CRAWL, result.drop))
                continue
            assert result.data is not None
            self._metrics.kept.inc()
            self._fetch_bytes.update(len(result.data))
            provenance = record.provenance.model_copy(
                update={
                    "final_url": result.final_url,
                    "http_status": result.http_status,
                    "content_type": result.content_type,
                    "fetched_at": datetime.now(timezone.utc),
                }
            )
            yield WithImage(record.model_copy(update={"provenance": provenance}), result.data)

    def teardown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


class Crawl(beam.PTransform):
    """`records | Crawl(config)` -> `(fetched, rejects)`.

    Batches records (`config.batch_size` per batch) and fetches each batch
    concurrently. The result unpacks as a pair and also has `.fetched` and
    `[REJECTS]`. Adds no Reshuffle: the pipeline spreads rows over workers
    before this step.
    """

    def __init__(self, config: CrawlConfig, label: str | None = None) -> None:
        super().__init__(label)
        self.config = config

    def expand(self, records: beam.PCollection) -> beam.pvalue.DoOutputsTuple:
        # Fixed-size batches: a batch costs about its slowest fetch, whatever its
        # length, so BatchElements' adaptive sizing would only start too small.
        size = self.config.batch_size
        return (
            records
            | "Batch" >> beam.BatchElements(min_batch_size=size, max_batch_size=size)
            | "Fetch" >> beam.ParDo(CrawlDoFn(self.config)).with_outputs(REJECTS, main="fetched")
        )

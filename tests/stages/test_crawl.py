"""stages.crawl: the Beam adapter over the fetcher, against LocalWeb on 127.0.0.1."""

from __future__ import annotations

import pickle

import apache_beam as beam
import pytest
from apache_beam.internal import pickler
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.pvalue import TaggedOutput
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from schemas import RejectReason, Stage
from stages.base import REJECTS
from stages.core.fetch import Fetcher
from stages.crawl import Crawl, CrawlDoFn
from tests.stages.crawl_helpers import LOCAL, record

# Every test runs behind the guard against non-loopback traffic.
pytestmark = pytest.mark.usefixtures("loopback_only")


# -- pickling and the Beam adapter ---------------------------------------------------------


def test_fetcher_and_dofn_pickle(web):
    web.add("/a.jpg", b"a")
    fetcher = pickle.loads(pickle.dumps(Fetcher(LOCAL)))
    assert fetcher.fetch(web.url("/a.jpg")).data == b"a"

    dofn = CrawlDoFn(LOCAL)
    for dumps, loads in ((pickle.dumps, pickle.loads), (pickler.dumps, pickler.loads)):
        copy = loads(dumps(dofn))
        assert copy.config == LOCAL
    pickle.dumps(Crawl(LOCAL))
    pickler.dumps(Crawl(LOCAL))


def test_dofn_setup_process_teardown(web):
    web.add("/a.jpg", b"a", content_type="image/png")
    dofn = CrawlDoFn(LOCAL)
    dofn.setup()
    try:
        out = list(dofn.process(("g00000", [record("k0", web.url("/a.jpg")), record("k1", web.url("/missing"))])))
    finally:
        dofn.teardown()
    # Results come out as downloads finish, not in input order.
    [fetched] = [o for o in out if not isinstance(o, TaggedOutput)]
    [rejected] = [o for o in out if isinstance(o, TaggedOutput)]
    assert fetched.record.key == "k0" and fetched.data == b"a"
    assert fetched.record.provenance.content_type == "image/png"
    assert rejected.tag == REJECTS and rejected.value.reason == RejectReason.HTTP_ERROR


def test_crawl_transform_on_the_fn_api_runner(web):
    web.add("/a.jpg", b"AAAA", content_type="image/jpeg")
    web.add("/b.png", b"BB", content_type="image/png")
    web.add_redirect("/old-b", "/b.png")
    web.add("/big", b"x" * 5000)
    web.add("/optout.jpg", b"c", headers={"X-Robots-Tag": "noai"})
    rows = [
        record("k0", web.url("/a.jpg"), 0),
        record("k1", web.url("/old-b"), 1),
        record("k2", web.url("/gone.jpg"), 2),
        record("k3", web.url("/big"), 3),
        record("k4", web.url("/optout.jpg"), 4),
        record("k5", "http://nonexistent.invalid/x.jpg", 5),
    ]
    config = LOCAL.model_copy(update={"threads": 3, "max_body_bytes": 1000})

    pipeline = BeamTestPipeline(runner=FnApiRunner())
    fetched, rejects = pipeline | beam.Create(rows) | Crawl(config)
    assert_that(
        fetched | "FetchedFacts" >> beam.Map(
            lambda f: (
                f.record.key,
                f.data,
                f.record.provenance.final_url,
                f.record.provenance.http_status,
                f.record.provenance.content_type,
                f.record.provenance.fetched_at is not None,
            )
        ),
        equal_to(
            [
                ("k0", b"AAAA", web.url("/a.jpg"), 200, "image/jpeg", True),
                ("k1", b"BB", web.url("/b.png"), 200, "image/png", True),
            ]
        ),
        label="CheckFetched",
    )
    assert_that(
        rejects | "RejectFacts" >> beam.Map(lambda r: (r.key, r.stage, r.reason, r.source_row)),
        equal_to(
            [
                ("k2", Stage.CRAWL, RejectReason.HTTP_ERROR, 2),
                ("k3", Stage.CRAWL, RejectReason.TOO_LARGE, 3),
                ("k4", Stage.CRAWL, RejectReason.OPT_OUT, 4),
                ("k5", Stage.CRAWL, RejectReason.DNS_FAILURE, 5),
            ]
        ),
        label="CheckRejects",
    )
    result = pipeline.run()
    result.wait_until_finish()

    counters = {
        c.key.metric.name: c.committed
        for c in result.metrics().query(MetricsFilter().with_namespace(Stage.CRAWL.value))["counters"]
    }
    assert counters["kept"] == 2
    assert counters["dropped_http_error"] == 1
    assert counters["dropped_dns_failure"] == 1
    distributions = {
        d.key.metric.name: d.committed
        for d in result.metrics().query(MetricsFilter().with_namespace(Stage.CRAWL.value))["distributions"]
    }
    assert distributions["fetch_bytes"].count == 2 and distributions["fetch_bytes"].sum == 6
    assert distributions["fetch_ms"].count == 6


def test_a_fetch_that_raises_unexpectedly_is_an_internal_error_reject(web, monkeypatch):
    web.add("/a.jpg", b"a", content_type="image/png")
    original = Fetcher.fetch

    def broken(self, url, **kwargs):
        if url.endswith("/bug"):
            raise ZeroDivisionError("a bug in the fetcher")
        return original(self, url, **kwargs)

    monkeypatch.setattr(Fetcher, "fetch", broken)
    dofn = CrawlDoFn(LOCAL)
    dofn.setup()
    try:
        out = list(dofn.process(("g00000", [record("k0", web.url("/a.jpg")), record("k1", web.url("/bug"))])))
    finally:
        dofn.teardown()
    rejects = [o.value for o in out if isinstance(o, TaggedOutput)]
    assert [r.key for r in rejects] == ["k1"]
    assert rejects[0].reason == RejectReason.INTERNAL_ERROR and "ZeroDivisionError" in rejects[0].detail
    assert [o.record.key for o in out if not isinstance(o, TaggedOutput)] == ["k0"]


def test_after_fetch_closing_frees_a_fetching_thread_that_waits_for_a_slot():
    """A bundle that fails tears the decode pool down while fetching threads may
    be waiting for a slot: the bodies still queued are cancelled, their slots
    freed, and a waiting thread gets an error instead of waiting forever."""
    import threading

    from stages.crawl import AfterFetch

    gate = threading.Event()
    after = AfterFetch(lambda x: gate.wait(10) and x, threads=1, max_pending=2)
    running, queued = after.submit(1), after.submit(2)
    outcome: list = []

    def third():
        try:
            outcome.append(after.submit(3))
        except RuntimeError as err:  # the pool is shut down
            outcome.append(err)

    waiting = threading.Thread(target=third)
    waiting.start()
    waiting.join(0.3)
    assert waiting.is_alive()  # both slots are taken
    closing = threading.Thread(target=after.close)
    closing.start()
    gate.set()
    closing.join(10)
    waiting.join(10)
    assert not closing.is_alive() and not waiting.is_alive()
    assert running.result() == 1 and queued.cancelled()
    assert len(outcome) == 1 and (isinstance(outcome[0], RuntimeError) or outcome[0].cancelled())

"""stages.core.host_schedule: per-host connections, rate, Retry-After and host
down, measured from what a fake fetch saw (start times and overlap per host)."""

from __future__ import annotations

import collections
import threading
import time

import pytest

from schemas import CrawlConfig, HostBudget, RejectReason
from stages.core.host_schedule import PENDING, Budget, HostScheduler, Outcome, host_of
from stages.core.verdict import Drop
from stages.crawl import crawl_key, host_budget, host_splits


class FakeWeb:
    """A fetch function that records, per host, when each request started and
    how many were in flight; `answers` maps a host to a function of the
    request's ordinal on that host returning an Outcome (default: 200)."""

    def __init__(self, delay_s: float = 0.01, answers=None, extra_requests=None, delays=None):
        self.delay_s = delay_s
        self.delays = delays or {}  # request ordinal on its host -> seconds, instead of delay_s
        self.answers = answers or {}
        self.extra_requests = extra_requests or {}
        self.lock = threading.Lock()
        self.starts: dict[str, list[float]] = collections.defaultdict(list)
        self.in_flight: collections.Counter = collections.Counter()
        self.max_in_flight: collections.Counter = collections.Counter()
        self.hedged: dict[str, list[bool]] = collections.defaultdict(list)  # per host, each fetch's pace.hedge

    def fetch(self, url: str, pace) -> Outcome:
        host = host_of(url)
        with self.lock:
            self.hedged[host].append(pace.hedge)
        for extra in range(self.extra_requests.get(host, 0)):  # robots.txt and the like, before the row's request
            pace(host)
            with self.lock:
                self.starts[host].append(time.monotonic())
        pace(host)
        with self.lock:
            ordinal = len(self.starts[host]) - self.extra_requests.get(host, 0)
            self.starts[host].append(time.monotonic())
            self.in_flight[host] += 1
            self.max_in_flight[host] = max(self.max_in_flight[host], self.in_flight[host])
        time.sleep(self.delays.get(ordinal, self.delay_s))
        with self.lock:
            self.in_flight[host] -= 1
        answer = self.answers.get(host)
        return answer(ordinal) if answer else Outcome(status=200)


def scheduler(web: FakeWeb, budgets: dict[str, Budget], default=Budget(4, 1000.0), **kwargs) -> HostScheduler:
    options = {"threads": 16, "down_after": 3, "max_retry_after_s": 60.0, **kwargs}
    return HostScheduler(
        fetch=web.fetch, outcome=lambda o: o, url_of=lambda url: url, budget_of=lambda h: budgets.get(h, default), **options
    )


def max_in_window(starts: list[float], window_s: float) -> int:
    starts = sorted(starts)
    best, j = 0, 0
    for i, t in enumerate(starts):
        while starts[j] < t - window_s + 1e-9:
            j += 1
        best = max(best, i - j + 1)
    return best


def test_connections_and_rate_per_host_hold_while_other_hosts_run_freely():
    web = FakeWeb(delay_s=0.02)
    urls = [f"http://hot.test/{i}" for i in range(30)] + [f"http://h{i}.test/x" for i in range(60)]
    budgets = {"hot.test": Budget(connections=2, rate=20.0)}
    started = time.monotonic()
    results = list(scheduler(web, budgets).run(urls))
    assert sorted(url for url, _ in results) == sorted(urls)
    assert web.max_in_flight["hot.test"] <= 2
    # 30 requests at 20/s: at least 29 intervals of 50 ms, and no 1 s window holds more than 21.
    hot = sorted(web.starts["hot.test"])
    assert hot[-1] - hot[0] >= 29 / 20.0 - 0.01
    assert max_in_window(hot, 1.0) <= 21
    # The tail of small hosts was not held behind the hot one: all of it started early.
    tail_last_start = max(t for h, s in web.starts.items() if h != "hot.test" for t in s)
    assert tail_last_start - started < 1.0


def test_every_request_a_fetch_sends_is_paced_not_only_the_first():
    # Each row's fetch sends two requests (say robots.txt, then the image) to its host.
    web = FakeWeb(delay_s=0.0, extra_requests={"paced.test": 1})
    list(scheduler(web, {"paced.test": Budget(4, 20.0)}).run([f"http://paced.test/{i}" for i in range(6)]))
    starts = sorted(web.starts["paced.test"])
    assert len(starts) == 12
    assert min(b - a for a, b in zip(starts, starts[1:])) >= 1 / 20.0 - 0.005


def test_state_follows_the_window_not_the_number_of_hosts():
    # A crawl key of the long tail: thousands of hosts with one URL each.
    web = FakeWeb(delay_s=0.0)
    sched = scheduler(web, {}, threads=8)
    hosts_in_flight_or_queued = []
    results = []
    for item in sched.run(f"http://h{i}.test/x" for i in range(6000)):
        results.append(item)
        hosts_in_flight_or_queued.append(len(sched.pacer.next_slot))
    assert len(results) == 6000 and len(web.starts) == 6000
    # Slots already past are pruned: the pacer's table never held every host.
    assert max(hosts_in_flight_or_queued) < 6000 and hosts_in_flight_or_queued[-1] < 2000


def test_a_host_failing_n_times_in_a_row_is_declared_down_and_its_other_rows_get_no_request():
    web = FakeWeb(answers={"dead.test": lambda n: Outcome(host_failure=True)})
    urls = [f"http://dead.test/{i}" for i in range(20)] + [f"http://ok.test/{i}" for i in range(5)]
    sched = scheduler(web, {"dead.test": Budget(1, 1000.0)})
    results = dict(sched.run(urls))
    assert len(web.starts["dead.test"]) == 3  # down_after
    unreachable = [u for u, r in results.items() if isinstance(r, Drop)]
    assert len(unreachable) == 17 and all(results[u].reason == RejectReason.HOST_UNREACHABLE for u in unreachable)
    assert "3 times in a row" in results[unreachable[0]].detail
    assert len(web.starts["ok.test"]) == 5 and sched.hosts_declared_down == 1


def test_a_host_is_probed_one_fetch_at_a_time_until_it_answers():
    # A hanging host (each request fails only after a timeout) with a budget of
    # 8 connections: it is probed one request at a time until it answers, so
    # it costs down_after timeouts of one thread, not 8 threads.
    web = FakeWeb(delay_s=0.1, answers={"hang.test": lambda n: Outcome(host_failure=True)})
    urls = [f"http://hang.test/{i}" for i in range(30)] + [f"http://ok.test/{i}" for i in range(20)]
    sched = scheduler(web, {"hang.test": Budget(8, 1000.0), "ok.test": Budget(8, 1000.0)})
    results = dict(sched.run(urls))
    assert len(web.starts["hang.test"]) == 3 and web.max_in_flight["hang.test"] == 1
    assert sum(isinstance(r, Drop) for r in results.values()) == 27
    # A host that answers gets its whole budget.
    assert web.max_in_flight["ok.test"] == 8


def test_a_silent_host_gets_staggered_probes_and_is_declared_down_after_about_one_timeout():
    # Each request to the hanging host fails only after its 0.6 s timeout. With
    # probe_every_s, a further probe starts each time the host has been probed
    # that long without an answer: the down_after probes overlap instead of
    # timing out one after another, and no more than down_after are sent.
    web = FakeWeb(delay_s=0.6, answers={"hang.test": lambda n: Outcome(host_failure=True)})
    urls = [f"http://hang.test/{i}" for i in range(30)]
    sched = scheduler(web, {"hang.test": Budget(8, 1000.0)}, probe_every_s=0.15)
    results = dict(sched.run(urls))
    starts = sorted(web.starts["hang.test"])
    assert len(starts) == 3 and web.max_in_flight["hang.test"] == 3  # down_after, all in flight at once
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert min(gaps) >= 0.15 - 0.01 and starts[-1] - starts[0] < 0.6  # staggered, within the first's timeout
    assert web.hedged["hang.test"] == [False, True, True]  # later probes are told not to wait on the first
    assert sum(r.reason == RejectReason.HOST_UNREACHABLE for r in results.values() if isinstance(r, Drop)) == 27


def test_probes_never_outnumber_the_failures_left_before_down():
    # A host whose first probe fails at once and whose others hang: after one
    # failure only down_after - 1 probes may be in flight, so the host still
    # gets down_after requests in all.
    web = FakeWeb(delay_s=0.3, delays={0: 0.0}, answers={"bad.test": lambda n: Outcome(host_failure=True)})
    sched = scheduler(web, {"bad.test": Budget(8, 1000.0)}, down_after=4, probe_every_s=0.05)
    results = dict(sched.run([f"http://bad.test/{i}" for i in range(20)]))
    assert len(web.starts["bad.test"]) == 4 and web.max_in_flight["bad.test"] == 3
    assert sum(isinstance(r, Drop) for r in results.values()) == 16


def test_a_host_that_answers_within_the_probe_interval_sees_one_probe_then_its_budget():
    web = FakeWeb(delay_s=0.05)
    sched = scheduler(web, {"ok.test": Budget(6, 1000.0)}, probe_every_s=0.5)
    list(sched.run([f"http://ok.test/{i}" for i in range(30)]))
    starts = sorted(web.starts["ok.test"])
    assert starts[1] - starts[0] >= 0.05 - 0.005  # the second request waited for the first answer
    assert web.hedged["ok.test"] == [False] * 30 and web.max_in_flight["ok.test"] == 6


def test_a_host_is_up_from_its_first_answer_not_from_the_end_of_that_fetch():
    # Each row's fetch sends three requests of 0.15 s (robots.txt, tdmrep.json,
    # the image); the probe interval is 0.2 s. A fetch that reports the host's
    # first answer (pace.answered) ends the probing there: no hedged probe,
    # and the host's other rows start on its budget before the first row is done.
    lock, starts, hedged = threading.Lock(), [], []

    def fetch(url, pace):
        hedged.append(pace.hedge)
        for _ in range(3):
            pace("up.test")
            with lock:
                starts.append(time.monotonic())
            time.sleep(0.15)
            pace.answered()
        return Outcome(status=200)

    sched = HostScheduler(fetch=fetch, outcome=lambda o: o, url_of=lambda u: u, budget_of=lambda h: Budget(4, 1000.0),
                          threads=8, down_after=3, max_retry_after_s=60.0, probe_every_s=0.2)
    results = list(sched.run([f"http://up.test/{i}" for i in range(8)]))
    assert len(results) == 8 and not any(hedged)
    starts.sort()
    assert starts[3] - starts[0] < 0.3  # a second row began before the first row's three requests were done


def test_a_host_whose_rows_come_last_is_probed_among_the_first_and_read_ahead_stays_bounded():
    # The crawl feeds rows key by key, so the input is sorted by host. Ten
    # healthy hosts of 10 rows come first, then a dead host: it is read ahead
    # of its turn and its first probe goes out with the first requests, not
    # once the rows before it are done (then its probing would be the crawl's
    # tail). Rows held ahead stay within 8 * window (plus those in flight).
    web = FakeWeb(delay_s=0.01, answers={"dead.test": lambda n: Outcome(host_failure=True)})
    urls = [f"http://ok{h}.test/{i}" for h in range(10) for i in range(10)] + [f"http://dead.test/{i}" for i in range(10)]
    consumed, held = [0], []

    def rows():
        for url in urls:
            consumed[0] += 1
            yield url

    sched = scheduler(web, {}, threads=4, window=16)
    results = []
    for item in sched.run(rows()):
        results.append(item)
        held.append(consumed[0] - len(results))
    assert len(results) == 110 and max(held) <= 8 * 16 + 4
    order = sorted((t, host) for host, starts in web.starts.items() for t in starts)
    first_dead = next(i for i, (_, host) in enumerate(order) if host == "dead.test")
    assert first_dead < 15, f"the dead host's first probe was request {first_dead} of {len(order)}"
    assert sum(isinstance(r, Drop) for _, r in results) == 10 - 3


def test_a_row_that_failed_untried_is_queued_again_or_answered_unreachable_once_the_host_is_down():
    # The first answer says: failed without a request of its own (it waited on another's).
    web = FakeWeb(answers={"wait.test": lambda n: Outcome(untried=True, reached_host=False) if n == 0 else Outcome(status=200)})
    [(url, result)] = list(scheduler(web, {}).run(["http://wait.test/a"]))
    assert result.status == 200 and len(web.starts["wait.test"]) == 2

    # On a host that went down meanwhile (the untried answer comes last), the row is not retried but unreachable.
    web = FakeWeb(
        delay_s=0.05,
        delays={0: 0.5},
        answers={"dead.test": lambda n: Outcome(untried=True, reached_host=False) if n == 0 else Outcome(host_failure=True)},
    )
    results = dict(scheduler(web, {"dead.test": Budget(4, 1000.0)}, down_after=2).run([f"http://dead.test/{i}" for i in range(3)]))
    assert sorted(r.reason.value if isinstance(r, Drop) else "failure" for r in results.values()) == [
        "failure", "failure", "host_unreachable"]


def test_a_success_resets_the_failure_count():
    web = FakeWeb(answers={"flaky.test": lambda n: Outcome(host_failure=n % 2 == 0)})
    results = list(scheduler(web, {"flaky.test": Budget(1, 1000.0)}).run([f"http://flaky.test/{i}" for i in range(12)]))
    assert len(web.starts["flaky.test"]) == 12
    assert not any(isinstance(r, Drop) for _, r in results)


def test_retry_after_delays_the_host_and_the_row_is_tried_again():
    web = FakeWeb(answers={"busy.test": lambda n: Outcome(status=429, retry_after_s=0.5) if n == 0 else Outcome(status=200)})
    results = list(scheduler(web, {"busy.test": Budget(1, 1000.0)}).run([f"http://busy.test/{i}" for i in range(4)]))
    starts = sorted(web.starts["busy.test"])
    assert len(starts) == 5  # the first row twice
    # Every request after the 429 (answered after delay_s) waited for the Retry-After.
    assert all(t - starts[0] >= web.delay_s + 0.5 for t in starts[1:])
    assert all(r.status == 200 for _, r in results)


def test_repeated_429s_lower_the_hosts_rate():
    web = FakeWeb(delay_s=0.0, answers={"busy.test": lambda n: Outcome(status=429)})
    list(scheduler(web, {"busy.test": Budget(1, 100.0)}).run([f"http://busy.test/{i}" for i in range(8)]))
    starts = sorted(web.starts["busy.test"])
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    # 10 ms at the budget's rate; halved after each 429 down to 1/16 of it (160 ms).
    assert gaps[-1] >= 0.16 - 0.005 and gaps[-1] > 4 * gaps[0]


def test_a_retry_after_over_the_bound_declares_the_host_down():
    web = FakeWeb(answers={"slow.test": lambda n: Outcome(status=503, retry_after_s=3600.0)})
    results = dict(scheduler(web, {}).run([f"http://slow.test/{i}" for i in range(6)]))
    assert len(web.starts["slow.test"]) <= 4  # those in flight when the first answer came
    assert any(isinstance(r, Drop) and "Retry-After" in r.detail for r in results.values())


def test_a_fetch_that_raises_is_returned_as_the_rows_result():
    def fetch(url, pace):
        raise ZeroDivisionError("bug")

    sched = HostScheduler(fetch=fetch, outcome=lambda o: o, url_of=lambda u: u, budget_of=lambda h: Budget(1, 100.0),
                          threads=2, down_after=3, max_retry_after_s=1.0)
    [(url, result)] = list(sched.run(["http://x.test/a"]))
    assert isinstance(result, ZeroDivisionError)


def test_host_budgets_patterns_and_hot_host_splits():
    config = CrawlConfig(
        max_per_host=8, max_host_rate=10.0, hot_host_rows=100,
        host_budgets=[HostBudget(pattern="*.cdn.test", max_per_host=32, max_host_rate=400.0)],
    )
    assert host_budget(config, "img.cdn.test") == Budget(32, 400.0)
    assert host_budget(config, "small.test") == Budget(8, 10.0)
    assert host_splits(config, "small.test", 100) == 1
    assert host_splits(config, "small.test", 10_000) == 8  # capped by its connections
    assert host_splits(config, "img.cdn.test", 1000) == 10
    # Sub-keys share the budget: their sum is the host's.
    assert host_budget(config, "img.cdn.test", 4) == Budget(8, 100.0)
    hot = {"img.cdn.test": 4}
    keys = {crawl_key(config, "img.cdn.test", f"{i:014d}", hot) for i in range(200)}
    assert len(keys) == 4
    # Small hosts: one key per host, stable across calls (no salted hash).
    assert crawl_key(config, "small.test", "a", {}) == crawl_key(config, "small.test", "b", {})
    assert crawl_key(config, "small.test", "a", {}).startswith("g")


@pytest.mark.parametrize("url, host", [("http://Example.COM:8080/x", "example.com"), ("not a url", ""), ("http://[::1]/", "::1")])
def test_host_of(url, host):
    assert host_of(url) == host


def test_a_live_input_that_has_nothing_yet_does_not_hold_back_finished_rows():
    # The crawl stage feeds one scheduler from every key of a bundle: while the
    # next key's rows have not arrived, the rows already fetched must come out
    # (and the hosts' budgets still hold across what arrives later).
    web = FakeWeb(delay_s=0.01)
    first = [f"http://a.test/{i}" for i in range(5)]
    later = [f"http://a.test/{i}" for i in range(5, 10)] + [f"http://b.test/{i}" for i in range(5)]
    released = threading.Event()
    pending_seen = []

    def live():
        yield from first
        deadline = time.monotonic() + 10
        while not released.is_set() and time.monotonic() < deadline:
            pending_seen.append(1)
            yield PENDING
        yield from later

    got = []
    for url, _ in scheduler(web, {"a.test": Budget(connections=1, rate=50.0)}).run(live()):
        got.append(url)
        if len(got) == len(first):
            released.set()
    assert released.is_set() and sorted(got[: len(first)]) == sorted(first)  # out before the rest arrived
    assert sorted(got) == sorted(first + later)
    assert pending_seen  # the input really was starved
    assert web.max_in_flight["a.test"] == 1
    a = sorted(web.starts["a.test"])
    assert min(b - a_ for a_, b in zip(a, a[1:])) >= 1 / 50.0 - 0.002


def test_waiting_with_every_thread_busy_does_not_spin():
    # Hosts ready to start while every thread is busy: the scheduler must sleep
    # until a fetch finishes, not poll (it once spun a core on a dead-host web).
    web = FakeWeb(delay_s=0.25)
    urls = [f"http://h{i % 3}.test/{i}" for i in range(6)]
    cpu, wall = time.thread_time(), time.monotonic()
    results = list(scheduler(web, {}, threads=2).run(urls))
    cpu, wall = time.thread_time() - cpu, time.monotonic() - wall
    assert len(results) == 6 and wall >= 0.7
    assert cpu < 0.25 * wall, f"the scheduler's thread used {cpu:.2f} CPU s in {wall:.2f} s"

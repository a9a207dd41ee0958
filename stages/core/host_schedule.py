"""Per-host politeness for one crawl key: the fetch scheduler (no Beam).

The crawl stage (`stages/crawl.py`) groups rows by host into crawl keys, so
every row of a host is fetched inside one key, by one worker at a time (a hot
host is split over a few sub-keys that share its budget). Limits enforced
here therefore hold for the whole job, whatever the runner and the number of
workers, and need no counters shared between processes.

`HostScheduler.run(rows)` fetches rows with a pool of threads and, per host:

- **connections**: at most `budget.connections` fetches in flight;
- **rate**: requests start at least `1 / budget.rate` seconds apart, every
  request a fetch sends included (robots.txt, tdmrep.json, redirect hops,
  retries: the fetch calls `pace(host)` before each, which waits for the
  host's next slot), so any window of T seconds holds at most `T * rate + 1`
  requests to the host;
- **back-off**: a `429` or `503` with `Retry-After` (the fetcher parses
  seconds or an HTTP date) holds the host's next request until then (from
  the moment the answer is in: the host's fetches already waiting for their
  slots wait for it too) and puts the row back in its queue (at most
  `MAX_RETRY_AFTER_ATTEMPTS` times); each `429` also halves the host's rate
  (down to 1/16 of its budget). A `Retry-After` longer than
  `max_retry_after_s` declares the host down;
- **host down**: `down_after` consecutive host failures (connection refused
  or reset, DNS failure, timeout) declare the host down: its queued rows and
  every later row are answered `host_unreachable` at once, with no request.
- **probing**: until a host first answers, its fetches are probes. With
  `probe_every_s` (the crawl passes `probe_interval_s(config)`: the timeout
  divided by `host_down_after`), a further probe starts once that long has
  passed since the latest probe began or failed with no answer, up to
  `down_after` in flight less the failures so far (the first probe, and a
  probe replacing the last one in flight, start at once): a host that never
  answers is sent at most `down_after` requests and is declared down after
  about two timeouts, not `down_after` timeouts one after another, and holds
  at most `down_after` threads meanwhile; a host that answers within
  `probe_every_s` sees one probe. A fetch reports the host's first answer as
  it comes (`Pace.answered`), so a host is up from its robots.txt answer on,
  not from the end of that row's fetch. (Each probe is a request of its own:
  the first site file a host is asked for is hedged, see
  `stages/core/robots.py`.) Without `probe_every_s`, one probe at a time.

Rows are read from the input lazily, a window at a time (`window`), and kept
in per-host queues, so a slow or rate-limited host holds back only its own
rows while the threads serve the others (the long tail of small hosts keeps
the pool busy). Results are yielded in completion order.

**Looking ahead for hosts.** The crawl feeds rows key by key, so the input
is sorted by host in runs: a host whose rows come last would otherwise be
seen, and first probed, only when the rows before it are nearly done, and a
dead host among them would add its whole probing time to the end of the
crawl. So the scheduler reads on past the window, up to `8 * window` rows
held in all: a host not answered yet has up to `down_after` rows queued at
once (one per probe), the others wait, in order, in a read-ahead queue that
costs no per-host state. Hosts that have not answered yet are served first
whenever a thread is free (their first probe, and each further probe when it
is due), so a dead host is found while the healthy hosts' rows are being
fetched.

The input may be *live*: an iterator that yields `PENDING` when it has no row
yet but will have more (the crawl stage feeds one scheduler from every crawl
key of a bundle, so the keys' slow tails overlap). The scheduler then goes on
serving what it holds and asks again within `POLL_S`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import fnmatch
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

from schemas import CrawlConfig, RejectReason
from stages.core.verdict import Drop

Row = TypeVar("Row")

# How often a row goes back to its host's queue (after a Retry-After, or after
# failing untried) before its last result stands.
MAX_RETRY_AFTER_ATTEMPTS = 3
_REQUEUED = object()
# Yielded by a live input that has no row yet (see the module docstring).
PENDING = object()
# What the scheduler reads from an input that is done.
_NO_ROW = object()
# How long the scheduler waits before asking a live input again.
POLL_S = 0.02
# A host's rate never drops below its budget divided by this, however many 429s it sends.
MIN_RATE_FRACTION = 1 / 16


def probe_interval_s(config: CrawlConfig) -> float:
    """How far apart the probes of a host that has not answered yet start:
    `host_down_after` probes spread over one fetch's longest wait (each
    attempt's timeout), so a silent host costs about two timeouts."""
    return config.timeout_s * (1 + config.retries) / config.host_down_after


def host_of(url: str) -> str:
    """The politeness key of a URL: its lower-cased host name (ports and
    schemes of one host share its budget); '' when the URL has none."""
    try:
        return (urllib.parse.urlsplit(url).hostname or "").lower()
    except ValueError:
        return ""


@dataclasses.dataclass(frozen=True)
class Budget:
    """What one host may receive from this scheduler: connections in flight and requests per second."""

    connections: int
    rate: float


def host_budget(config: CrawlConfig, host: str, splits: int = 1) -> Budget:
    """The budget of `host` (first matching `host_budgets` pattern, else the
    defaults), divided among the `splits` sub-keys of a hot host."""
    connections, rate = config.max_per_host, config.max_host_rate
    for budget in config.host_budgets:
        if fnmatch.fnmatchcase(host, budget.pattern.lower()):
            connections = budget.max_per_host or connections
            rate = budget.max_host_rate or rate
            break
    return Budget(connections=max(1, connections // splits), rate=rate / splits)


@dataclasses.dataclass
class Outcome:
    """What the scheduler needs to know of a finished fetch.

    `host_failure`: the host could not be reached (counts towards
    `down_after`); `reached_host`: a request was sent (only then does a
    non-failure reset the count: a row that merely waited for another row's
    failed robots.txt says nothing about the host); `untried`: the row failed
    without a request of its own (it waited on another row's failed request),
    so it is queued again, or answered `host_unreachable` if the host is down by
    then; `retry_after_s`: the
    server asked to wait (429/503 with Retry-After); `status`: the final HTTP
    status, if any."""

    host_failure: bool = False
    reached_host: bool = True
    untried: bool = False
    retry_after_s: float | None = None
    status: int | None = None


class _Pacer:
    """Each host's next request slot, lowered rate (after 429s) and hold (a
    Retry-After), shared by the dispatcher and the fetching threads (which
    wait for their slots). Slots and holds already past are pruned now and
    then, so the tables follow the hosts being crawled, not every host seen."""

    PRUNE_EVERY = 4096

    def __init__(self, clock: Callable[[], float]):
        self.clock = clock
        self.lock = threading.Lock()
        self.next_slot: dict[str, float] = {}
        self.lowered: dict[str, float] = {}
        self.held: dict[str, float] = {}
        self._reserved = 0

    def due(self, host: str) -> float:
        with self.lock:
            return self.next_slot.get(host, 0.0)

    def reserve(self, host: str, rate: float) -> float:
        """Take the host's next slot; returns its time (now or later)."""
        with self.lock:
            now = self.clock()
            slot = max(now, self.next_slot.get(host, 0.0))
            self.next_slot[host] = slot + 1.0 / self.lowered.get(host, rate)
            self._reserved += 1
            if self._reserved % self.PRUNE_EVERY == 0:
                # A slot in the past allows the next request now: forgetting it changes nothing.
                self.next_slot = {h: t for h, t in self.next_slot.items() if t > now}
                self.held = {h: t for h, t in self.held.items() if t > now}
            return slot

    def wait(self, host: str, rate: float) -> None:
        self.sleep_until(host, self.reserve(host, rate))

    def sleep_until(self, host: str, slot: float) -> None:
        """Sleep until `slot`, and on past any hold put on the host meanwhile:
        a request whose slot was taken before another fetch of the host was
        told Retry-After still waits for it."""
        while True:
            with self.lock:
                until = max(slot, self.held.get(host, 0.0))
            delay = until - self.clock()
            if delay <= 0:
                return
            time.sleep(delay)

    def hold_until(self, host: str, when: float) -> None:
        with self.lock:
            self.next_slot[host] = max(self.next_slot.get(host, 0.0), when)
            self.held[host] = max(self.held.get(host, 0.0), when)

    def slow_down(self, host: str, rate: float, floor: float) -> None:
        """Halve the host's rate (from `rate`, its budget, the first time), down to `floor`."""
        with self.lock:
            self.lowered[host] = max(floor, self.lowered.get(host, rate) / 2)


class _Host:
    __slots__ = ("queue", "in_flight", "failures", "down", "down_detail", "answered", "last_probe")

    def __init__(self):
        self.queue: collections.deque = collections.deque()
        self.in_flight = 0
        self.failures = 0
        self.down = False
        self.down_detail = ""
        self.answered = False  # a fetch has reached the host without a host failure
        self.last_probe = 0.0  # until the host answers: when its latest probe began or failed


class Pace:
    """What a fetch started by the scheduler is handed (see `HostScheduler`).

    `pace(host)` right before each request waits for the host's next slot
    (the row's first request uses the slot taken when the fetch started);
    `hedge` says the fetch is a further probe of a host that has not
    answered yet; `answered()`, called when a response arrives from the
    row's host, tells the scheduler the host is up at once, not when the
    whole fetch (robots.txt, tdmrep.json, the image) is done, so the host
    gets its budget and no further probe."""

    __slots__ = ("_scheduler", "_pacer", "_host", "_state", "_first_slot", "hedge")

    def __init__(self, scheduler: HostScheduler, pacer: _Pacer, host: str, state: _Host, first_slot: float, hedge: bool):
        self._scheduler, self._pacer, self._host, self._state = scheduler, pacer, host, state
        self._first_slot: float | None = first_slot
        self.hedge = hedge

    def __call__(self, request_host: str) -> None:
        request_host = request_host.lower()
        if self._first_slot is not None and request_host == self._host:
            slot, self._first_slot = self._first_slot, None
            self._pacer.sleep_until(request_host, slot)
            return
        self._pacer.wait(request_host, self._scheduler.budget_of(request_host).rate)

    def answered(self) -> None:
        # A plain attribute the dispatcher reads: a fetch in flight keeps its
        # host's state alive, and a stale read only delays the next start.
        self._state.answered = True


class HostScheduler(Generic[Row]):
    """Fetches rows under per-host budgets; see the module docstring.

    `fetch(row, pace)` runs on the pool's threads and returns any result; it
    must call `pace(host)` right before each HTTP request it sends (`host`:
    that request's host, which a redirect may change), and may call
    `pace.answered()` as soon as the row's host answers a request. `pace.hedge`
    is True when the fetch is a further probe of a host that has not answered
    yet, started while an earlier probe still waits: a request the probes
    would share (robots.txt) must then be sent again, not waited for, or the
    probe says nothing about the host. `outcome(result)` reads
    what the scheduler needs from the result. `run` yields `(row, result)` for
    fetched rows and `(row, Drop)` for rows of a host declared down.
    """

    def __init__(
        self,
        fetch: Callable[[Row, Callable[[str], None]], object],
        outcome: Callable[[object], Outcome],
        url_of: Callable[[Row], str],
        budget_of: Callable[[str], Budget],
        *,
        threads: int,
        down_after: int,
        max_retry_after_s: float,
        probe_every_s: float | None = None,
        window: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.fetch = fetch
        self.outcome = outcome
        self.url_of = url_of
        self.budget_of = budget_of
        self.threads = threads
        self.down_after = down_after
        self.max_retry_after_s = max_retry_after_s
        self.probe_every_s = probe_every_s
        self.window = window or max(64, 8 * threads)
        self.clock = clock
        self.hosts_declared_down = 0

    def run(self, rows: Iterable[Row]) -> Iterator[tuple[Row, object]]:
        source = iter(rows)
        exhausted = False
        live = False  # the input has said PENDING at least once
        # State is kept only for hosts with rows queued or in flight (or with
        # failures not yet reset), so memory and each pass over the hosts follow
        # the window, not the number of hosts a crawl key holds; hosts declared
        # down are remembered for the whole call.
        hosts: dict[str, _Host] = {}
        budgets: dict[str, Budget] = {}
        ready: dict[str, None] = {}  # hosts with queued rows, in arrival order
        parked: collections.deque = collections.deque()  # read ahead: (row, host) of hosts already queued
        down: dict[str, str] = {}
        buffered = 0
        max_buffered = 8 * self.window
        answered: collections.deque = collections.deque()  # rows answered without a fetch
        retries: dict[int, int] = {}
        in_flight: dict[concurrent.futures.Future, tuple[str, Row]] = {}
        pacer = self.pacer = _Pacer(self.clock)

        def can_start(host: str, now: float) -> bool:
            state = hosts[host]
            return bool(state.queue) and state.in_flight < connections(host, now) and pacer.due(host) <= now

        def probe_limit(host: str) -> int:
            # A host that has not answered yet is sent no more requests than it
            # takes to declare it down (see `probing` in the module docstring):
            # a dead host costs `down_after` requests, not `connections`
            # threads for a timeout each.
            return max(1, min(budgets[host].connections, self.down_after - hosts[host].failures))

        def connections(host: str, now: float) -> int:
            state = hosts[host]
            if state.answered:
                return budgets[host].connections
            if self.probe_every_s is None or not state.in_flight:
                return 1
            if now + 1e-9 < state.last_probe + self.probe_every_s:
                return state.in_flight
            return min(probe_limit(host), state.in_flight + 1)

        def next_probe_at(host: str) -> float | None:
            """When a host not answered yet may get its next probe, if it may get one."""
            state = hosts[host]
            if state.answered or self.probe_every_s is None or not state.in_flight:
                return None
            if state.in_flight >= probe_limit(host):
                return None
            return state.last_probe + self.probe_every_s

        def fetch_paced(row: Row, host: str, state: _Host, first_slot: float, hedge: bool):
            pace = Pace(self, pacer, host, state, first_slot, hedge)
            result = self.fetch(row, pace)
            # A Retry-After holds the host from now, not from when the
            # dispatcher gets to this result (`_settle` requeues the row): the
            # host's other fetches may be about to send their requests.
            outcome = self.outcome(result)
            if outcome.status in (429, 503) and outcome.retry_after_s is not None:
                if outcome.retry_after_s <= self.max_retry_after_s:
                    pacer.hold_until(host, self.clock() + outcome.retry_after_s)
            return result, outcome

        def queue(host: str, row: Row, front: bool = False) -> None:
            nonlocal buffered
            state = hosts.get(host)
            if state is None:
                budgets[host] = self.budget_of(host)
                state = hosts[host] = _Host()
            if front:
                state.queue.appendleft(row)
            else:
                state.queue.append(row)
            ready[host] = None
            buffered += 1

        def take(row: Row, host: str | None = None) -> str | None:
            """Queue a row under its host (or answer it if the host is down); returns the host if queued."""
            if host is None:
                host = host_of(self.url_of(row))
            if host in down:
                answered.append((row, Drop(RejectReason.HOST_UNREACHABLE, down[host])))
                return None
            queue(host, row)
            return host

        def declare_down(host: str, state: _Host, detail: str) -> None:
            nonlocal buffered
            state.down = True
            state.down_detail = down[host] = detail
            self.hosts_declared_down += 1
            while state.queue:
                buffered -= 1
                answered.append((state.queue.popleft(), Drop(RejectReason.HOST_UNREACHABLE, detail)))
            ready.pop(host, None)

        def read() -> object:
            """The input's next row, `PENDING` (a live input has none yet) or `_NO_ROW` (it is done)."""
            nonlocal exhausted, live
            try:
                row = next(source)
            except StopIteration:
                exhausted = True
                return _NO_ROW
            if row is PENDING:
                live = True
            return row

        def next_row() -> tuple[object, str | None]:
            """A read-ahead row with its host, else the input's next row (host not parsed yet) or sentinel."""
            return parked.popleft() if parked else (read(), None)

        def start(host: str, now: float) -> None:
            """Start as many of the host's queued rows as its budget and the free threads allow."""
            nonlocal buffered
            state = hosts[host]
            while len(in_flight) < self.threads and can_start(host, now):
                row = state.queue.popleft()
                buffered -= 1
                hedge = not state.answered and state.in_flight > 0
                if not state.answered:
                    state.last_probe = now
                state.in_flight += 1
                slot = pacer.reserve(host, budgets[host].rate)
                in_flight[pool.submit(fetch_paced, row, host, state, slot, hedge)] = (host, row)
            if not state.queue:
                ready.pop(host, None)

        def forget_if_idle(host: str) -> None:
            state = hosts[host]
            if not state.queue and not state.in_flight and (state.failures == 0 or host in down):
                del hosts[host], budgets[host]

        with concurrent.futures.ThreadPoolExecutor(self.threads, thread_name_prefix="crawl") as pool:
            while True:
                # 1. Fill the window (read-ahead rows first), then look further
                # ahead for hosts not seen yet (see the module docstring), until
                # `max_buffered` rows are held (or a live input has nothing yet).
                starved = False
                while buffered < self.window and (parked or not exhausted):
                    row, host = next_row()
                    if row is _NO_ROW or row is PENDING:
                        starved = row is PENDING
                        break
                    take(row, host)
                while not exhausted and not starved and buffered + len(parked) < max_buffered:
                    row = read()
                    if row is _NO_ROW or row is PENDING:
                        starved = row is PENDING
                        break
                    host = host_of(self.url_of(row))
                    state = hosts.get(host)
                    # An answered host, or one with a row queued for each probe it may get, can wait.
                    if state is not None and (state.answered or len(state.queue) >= self.down_after) and host not in down:
                        parked.append((row, host))
                    else:  # a host not seen yet, one still short of a row per probe, or one down (answered now)
                        take(row, host)
                while answered:
                    yield answered.popleft()

                # 2. Start every fetch the budgets allow: hosts not answered yet first.
                now = self.clock()
                for unanswered_only in (True, False):
                    for host in list(ready):
                        if len(in_flight) >= self.threads:
                            break
                        if not (unanswered_only and hosts[host].answered):
                            start(host, now)

                if not in_flight and buffered == 0:
                    if exhausted and not parked:
                        return
                    if starved:
                        time.sleep(POLL_S)
                    continue
                # Threads idle while every queued row waits on its host: queue more
                # (read-ahead rows first), so a few slow or rate-limited hosts do not starve the rest.
                if len(in_flight) < self.threads and (parked or not exhausted) and not starved and buffered < max_buffered:
                    found = False
                    while not found and (parked or not exhausted) and buffered < max_buffered:
                        row, host = next_row()
                        if row is _NO_ROW or row is PENDING:
                            break
                        host = take(row, host)
                        found = host is not None and can_start(host, now)
                    if found or answered:
                        continue

                # 3. Wait for a fetch to finish, or for the first host whose next request is due.
                # (With every thread busy, only a finished fetch can start another:
                # a due host must not turn this wait into a busy loop.)
                waits = []
                if len(in_flight) < self.threads:
                    now = self.clock()
                    for h in ready:
                        if hosts[h].in_flight < connections(h, now):
                            waits.append(pacer.due(h))
                        elif (probe_at := next_probe_at(h)) is not None:
                            waits.append(max(probe_at, pacer.due(h)))
                timeout = max(0.0, min(waits) - self.clock()) if waits else None
                if live and not exhausted:
                    # New rows may arrive at any time: look again soon.
                    timeout = POLL_S if timeout is None else min(timeout, POLL_S)
                if not in_flight:
                    time.sleep(timeout or 0.0)
                    continue
                done, _ = concurrent.futures.wait(in_flight, timeout=timeout, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    host, row = in_flight.pop(future)
                    state = hosts[host]
                    state.in_flight -= 1
                    try:
                        result, outcome = future.result()
                    except Exception as err:  # noqa: BLE001 - handed to the caller as the row's result
                        yield row, err
                        forget_if_idle(host)
                        continue
                    settled = self._settle(host, state, budgets[host], row, outcome, retries, declare_down)
                    if settled is _REQUEUED:
                        queue(host, row, front=True)
                        continue
                    forget_if_idle(host)
                    yield row, result if settled is None else settled
                while answered:
                    yield answered.popleft()

    def _settle(self, host, state: _Host, budget: Budget, row, outcome: Outcome, retries: dict, declare_down):
        """Apply a finished fetch to its host's state. Returns `_REQUEUED` if
        the row went back to its host's queue, a `Drop` that replaces the
        row's result, or None (the result stands)."""
        if outcome.status == 429:
            self.pacer.slow_down(host, budget.rate, budget.rate * MIN_RATE_FRACTION)
        if outcome.host_failure:
            state.failures += 1
            # A probe that failed is replaced at once only if it was the last
            # in flight; otherwise its replacement waits like a further probe.
            state.last_probe = max(state.last_probe, self.clock())
            if state.failures >= self.down_after and not state.down:
                declare_down(host, state, f"{host} failed {state.failures} times in a row (host_down_after={self.down_after})")
        elif outcome.reached_host:
            state.failures = 0
            state.answered = True
        if outcome.untried:
            if state.down:
                return Drop(RejectReason.HOST_UNREACHABLE, state.down_detail)
            return self._retry(row, retries)
        if outcome.retry_after_s is not None and outcome.status in (429, 503) and not state.down:
            if outcome.retry_after_s > self.max_retry_after_s:
                declare_down(
                    host,
                    state,
                    f"{host} asked to wait {outcome.retry_after_s:.0f} s (Retry-After, HTTP {outcome.status}); "
                    f"over max_retry_after_s={self.max_retry_after_s:g}",
                )
                return None
            # The fetching thread has held the host already (see fetch_paced).
            return self._retry(row, retries)
        retries.pop(id(row), None)
        return None

    @staticmethod
    def _retry(row, retries: dict):
        """`_REQUEUED` if the row may be tried again (the caller queues it), else None."""
        attempts = retries.get(id(row), 0)
        if attempts >= MAX_RETRY_AFTER_ATTEMPTS:
            retries.pop(id(row), None)
            return None
        retries[id(row)] = attempts + 1
        return _REQUEUED

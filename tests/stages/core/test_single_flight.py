"""stages.core.connections.SingleFlightCache: one load per key while others
wait, and hedged loads (the host scheduler's further probes of a silent host)."""

from __future__ import annotations

import concurrent.futures
import threading

import pytest

from stages.core.connections import SingleFlightCache


class Gate:
    """A load that blocks until released, then returns (or raises) what it was given."""

    def __init__(self, value=None, error: BaseException | None = None):
        self.value, self.error = value, error
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self):
        self.started.set()
        assert self.release.wait(10), "the test never released this load"
        if self.error is not None:
            raise self.error
        return self.value


def keep_unless_failed(value, error):
    return error is None and value != "failed"


def hedged_loads(pool, cache: SingleFlightCache, *gates: Gate, max_loads: int, **options) -> list:
    """Start one hedged `get` per gate, each after the one before has begun its load."""
    futures = []
    for gate in gates:
        futures.append(pool.submit(cache.get, "host", gate, hedge=True, max_loads=max_loads, **options))
        assert gate.started.wait(5), "a hedged caller waited instead of loading"
    return futures


def test_callers_of_a_key_share_one_load():
    cache = SingleFlightCache(8)
    gate = Gate("rules")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        first = pool.submit(cache.get, "host", gate)
        assert gate.started.wait(5)
        waiters = [pool.submit(cache.get, "host", Gate("never")) for _ in range(3)]
        gate.release.set()
        assert first.result() == ("rules", True)
        assert [w.result() for w in waiters] == [("rules", False)] * 3
    assert cache.loads == 1


def test_a_hedging_caller_loads_too_up_to_max_loads():
    cache = SingleFlightCache(8)
    first, second = Gate("rules"), Gate("rules, second copy")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        a, b = hedged_loads(pool, cache, first, second, max_loads=2)  # the second loads too, not waits
        third = Gate("never")
        c = pool.submit(cache.get, "host", third, hedge=True, max_loads=2)  # two running: it waits
        assert not third.started.wait(0.3) and not c.done()
        second.release.set()
        assert b.result() == ("rules, second copy", True)
        assert c.result() == ("rules, second copy", False)  # the first kept value answers the waiters
        first.release.set()
        assert a.result() == ("rules", True)
    assert not third.started.is_set() and cache.loads == 2
    assert cache.get("host", Gate("reloaded"))[0] == "rules, second copy"  # kept


def test_a_hedged_failure_goes_to_its_own_caller_while_another_load_may_still_succeed():
    cache = SingleFlightCache(8)
    slow_success, fast_failure = Gate("rules"), Gate(error=TimeoutError("timed out"))
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        a, b = hedged_loads(pool, cache, slow_success, fast_failure, max_loads=3)
        waiter = pool.submit(cache.get, "host", Gate("never"))
        fast_failure.release.set()
        with pytest.raises(TimeoutError):
            b.result()
        assert not waiter.done()  # still waiting for the load that may succeed
        slow_success.release.set()
        assert a.result() == ("rules", True) and waiter.result() == ("rules", False)


def test_when_every_load_fails_the_waiters_get_the_last_failure_and_nothing_is_kept():
    cache = SingleFlightCache(8)
    one, two = Gate("failed"), Gate("failed")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        a, b = hedged_loads(pool, cache, one, two, max_loads=2, keep=keep_unless_failed)
        waiter = pool.submit(cache.get, "host", Gate("never"), keep=keep_unless_failed)
        one.release.set()
        assert a.result() == ("failed", True)
        assert not waiter.done()
        two.release.set()
        assert b.result() == ("failed", True) and waiter.result() == ("failed", False)
    assert len(cache) == 0
    assert cache.get("host", lambda: "rules", keep=keep_unless_failed) == ("rules", True)  # asked again


def test_a_hedged_load_failing_after_another_succeeded_takes_the_kept_value():
    cache = SingleFlightCache(8)
    first, second = Gate("rules"), Gate("failed")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        a, b = hedged_loads(pool, cache, first, second, max_loads=2, keep=keep_unless_failed)
        first.release.set()
        assert a.result() == ("rules", True)
        second.release.set()
        # Its own request failed, but the host's rules are known: the caller
        # goes on with them, as a waiter would, and is not charged a load.
        assert b.result() == ("rules", False)


def test_hedging_a_key_already_known_loads_nothing():
    cache = SingleFlightCache(8)
    cache.get("host", lambda: "rules")
    assert cache.get("host", Gate("never"), hedge=True, max_loads=5) == ("rules", False)
    assert cache.loads == 1

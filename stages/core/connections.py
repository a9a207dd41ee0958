"""Connections of the crawler (`stages/core/fetch.py`): HTTP(S) connections
pinned to checked addresses, a keep-alive pool of them, and a per-process DNS
cache. Plain Python, no Beam.

- `PinnedHTTPConnection` / `PinnedHTTPSConnection` connect to addresses the
  address policy checked beforehand instead of resolving the name again; the
  name still goes into the Host header and, for HTTPS, into SNI and
  certificate verification.
- `ConnectionPool` keeps idle keep-alive connections per (scheme, host, port,
  checked addresses), at most `max_idle_per_key` per key and `max_idle` in
  all (the least recently used go first), and never hands out one idle for
  longer than `idle_timeout_s` or one the server has closed (checked with a
  zero-timeout poll before reuse).
- `DnsCache` keeps a resolver's answers per host name for at most the TTL
  the caller gives (`CrawlConfig.dns_cache_ttl_s`: the system resolver does
  not report the record's TTL, so the bound is the TTL), failures included
  (except the resolver's "try again" answer, EAI_AGAIN). Concurrent lookups
  of one name wait for a single resolver call. `dns_cache_for(resolver)` is
  the process's cache for a resolver function, so every Fetcher of a worker
  process shares one lookup per host.
- `HOST_SLOTS` bounds the requests in flight to one host in the process
  (`CrawlConfig.max_per_host`), whatever the number of threads or Fetchers.
- `classify_error` maps what http.client, ssl and socket raise to a reject
  reason; `parse_retry_after` reads a 429/503's `Retry-After`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import email.utils
import functools
import http.client
import math
import select
import socket
import ssl
import threading
import time
import urllib.error
import weakref
from collections.abc import Callable, Iterator

from schemas import RejectReason
from stages.core.verdict import Drop

Resolver = Callable[[str, int], list[str]]
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
THROTTLE_STATUSES = frozenset({429, 503})  # the answers whose Retry-After a crawler must honour
# Failures that say a host is unreachable: they count towards declaring it down.
HOST_FAILURE_REASONS = frozenset({RejectReason.TIMEOUT, RejectReason.CONNECTION_ERROR, RejectReason.DNS_FAILURE})
DRAIN_BYTES = 64 * 1024  # an error or redirect body up to this size is read so its connection can be reused


# -- connections pinned to a checked address --------------------------------------


class _PinnedConnectionMixin:
    """An http.client connection that connects to addresses checked beforehand
    instead of resolving its host again."""

    def __init__(self, *args, addresses: list[str], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._pinned_addresses = addresses
        # HTTPConnection.connect() (and HTTPSConnection's, through super())
        # opens its socket with this hook.
        self._create_connection = self._connect_pinned

    def _connect_pinned(self, address, timeout, source_address=None):
        _host, port = address
        error: OSError | None = None
        for ip in self._pinned_addresses:
            try:
                return socket.create_connection((ip, port), timeout, source_address)
            except OSError as exc:  # try the next address, as create_connection does
                error = exc
        assert error is not None
        raise error


class PinnedHTTPConnection(_PinnedConnectionMixin, http.client.HTTPConnection):
    pass


class PinnedHTTPSConnection(_PinnedConnectionMixin, http.client.HTTPSConnection):
    pass


@functools.cache
def tls_context() -> ssl.SSLContext:
    # One per process: loading the CA store is not free, and a context is
    # thread-safe for wrap_socket. Never pickled (module state).
    return ssl.create_default_context()


@dataclasses.dataclass(frozen=True)
class PoolKey:
    """Connections are shared only between requests with all of these equal."""

    scheme: str
    host: str
    port: int
    addresses: tuple[str, ...]


def new_connection(key: PoolKey, timeout_s: float, context: ssl.SSLContext | None = None) -> http.client.HTTPConnection:
    """A fresh (not yet connected) connection for `key`."""
    if key.scheme == "https":
        return PinnedHTTPSConnection(
            key.host, key.port, timeout=timeout_s, addresses=list(key.addresses), context=context or tls_context()
        )
    return PinnedHTTPConnection(key.host, key.port, timeout=timeout_s, addresses=list(key.addresses))


def _closed_by_peer(sock: socket.socket) -> bool:
    """True when an idle connection has something to read: the server closed
    it (EOF) or sent bytes nobody asked for; either way it is unusable."""
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


class ConnectionPool:
    """Idle keep-alive connections; thread-safe. See the module docstring."""

    def __init__(self, max_idle: int = 64, max_idle_per_key: int = 8, idle_timeout_s: float = 4.0) -> None:
        self.max_idle = max_idle
        self.max_idle_per_key = max_idle_per_key
        self.idle_timeout_s = idle_timeout_s
        self._lock = threading.Lock()
        # Most recently returned last; (key, connection, time it went idle).
        self._idle: collections.OrderedDict[int, tuple[PoolKey, http.client.HTTPConnection, float]] = (
            collections.OrderedDict()
        )
        self._per_key: collections.Counter[PoolKey] = collections.Counter()

    def take(self, key: PoolKey) -> http.client.HTTPConnection | None:
        """An idle live connection for `key` (the most recently used), or None."""
        now = time.monotonic()
        stale = []
        found = None
        with self._lock:
            for ident in reversed(list(self._idle)):
                pool_key, conn, since = self._idle[ident]
                if pool_key != key:
                    continue
                del self._idle[ident]
                self._per_key[key] -= 1
                if now - since > self.idle_timeout_s or conn.sock is None or _closed_by_peer(conn.sock):
                    stale.append(conn)
                    continue
                found = conn
                break
            if self._per_key[key] <= 0:
                del self._per_key[key]
        for conn in stale:
            conn.close()
        return found

    def give(self, key: PoolKey, conn: http.client.HTTPConnection) -> None:
        """Return a connection whose last response was read to its end."""
        if conn.sock is None:
            return
        evicted = []
        with self._lock:
            if self._per_key[key] >= self.max_idle_per_key:
                evicted.append(conn)
            else:
                self._idle[id(conn)] = (key, conn, time.monotonic())
                self._per_key[key] += 1
                while len(self._idle) > self.max_idle:
                    _ident, (old_key, old, _since) = self._idle.popitem(last=False)
                    self._per_key[old_key] -= 1
                    if self._per_key[old_key] <= 0:
                        del self._per_key[old_key]
                    evicted.append(old)
        for old in evicted:
            old.close()

    def close(self) -> None:
        with self._lock:
            idle = [conn for _key, conn, _since in self._idle.values()]
            self._idle.clear()
            self._per_key.clear()
        for conn in idle:
            conn.close()

    def __len__(self) -> int:
        with self._lock:
            return len(self._idle)


# -- per-host concurrency ---------------------------------------------------------


class HostSlots:
    """A counting semaphore per (host, limit), shared by every thread of the process.

    An entry lives only while some fetch holds or waits for one of its slots,
    so memory follows the number of fetches in flight, not the number of hosts
    ever seen. Module state, not instance state: DoFn instances come and go
    (and are pickled) while the limit is meant for the whole worker process.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, int], tuple[threading.Semaphore, list[int]]] = {}

    @contextlib.contextmanager
    def hold(self, host: str, limit: int) -> Iterator[None]:
        key = (host, limit)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = (threading.Semaphore(limit), [0])
            semaphore, users = entry
            users[0] += 1
        try:
            with semaphore:
                yield
        finally:
            with self._lock:
                users[0] -= 1
                if users[0] == 0:
                    del self._entries[key]

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


HOST_SLOTS = HostSlots()


# -- reading answers ------------------------------------------------------------------


def drain(response: http.client.HTTPResponse) -> bool:
    """Read a small remaining body (an error page, a redirect's) so the
    connection can carry the next request; False when it is not worth it."""
    length = response.length
    if length is None or length > DRAIN_BYTES:
        return False
    try:
        response.read()
    except (OSError, http.client.HTTPException):
        return False
    return response.isclosed()


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` value (RFC 9110 10.2.3): delta-seconds
    or an HTTP-date (any date format `email.utils` reads; one without a zone is
    taken as UTC), from `now` (default: the current time). A date in the past,
    or a negative number, gives 0; an empty, unparseable or non-finite value None."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.timezone.utc)
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def retry_after_of(response: http.client.HTTPResponse) -> float | None:
    """The Retry-After of a 429 or 503 answer, in seconds (None for other statuses or without one)."""
    if response.status not in THROTTLE_STATUSES:
        return None
    return parse_retry_after(response.headers.get("Retry-After"))


def classify_error(exc: BaseException) -> Drop:
    """Map an exception from http.client/ssl/socket to a reject reason."""
    if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, BaseException):
        exc = exc.reason
    if isinstance(exc, TimeoutError):
        return Drop(RejectReason.TIMEOUT, str(exc) or "timed out")
    if isinstance(exc, http.client.InvalidURL | UnicodeError):
        return Drop(RejectReason.MALFORMED_URL, str(exc))
    if isinstance(exc, socket.gaierror):
        return Drop(RejectReason.DNS_FAILURE, str(exc))
    return Drop(RejectReason.CONNECTION_ERROR, f"{type(exc).__name__}: {exc}")


# -- DNS cache ----------------------------------------------------------------------


class _Entry:
    __slots__ = ("done", "value", "error", "expires", "loading")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: object = None
        self.error: BaseException | None = None
        self.expires = math.inf
        self.loading = 1  # loads running for this entry (more than one only when hedged)


class SingleFlightCache:
    """Values by key, each loaded by one thread while the others asking for it
    wait for that load (so N threads meeting a new host make one DNS lookup or
    one robots.txt fetch, not N); at most `max_entries` kept, the least
    recently used dropped first; thread-safe. The DNS cache and the opt-out
    cache (`stages/core/robots.py`) are this.

    A caller may *hedge* (`hedge=True`): instead of waiting for a load that is
    running, it starts one of its own (at most `max_loads` at once per key).
    The first load whose value is kept answers every waiter; a hedged load
    that fails while another may still succeed gives its failure to its own
    caller only. The host scheduler uses this to probe a host that has not
    answered yet with several staggered requests, each its own robots.txt
    fetch (see `stages/core/host_schedule.py`)."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict[object, _Entry] = collections.OrderedDict()
        self.loads = 0  # loads started (for tests and logs)

    def get(
        self,
        key: object,
        load: Callable[[], object],
        *,
        ttl_s: float = math.inf,
        keep: Callable[[object, BaseException | None], bool] = lambda value, error: error is None,
        hedge: bool = False,
        max_loads: int = 1,
    ) -> tuple[object, bool]:
        """The value for `key`, calling `load()` if no thread has one younger
        than `ttl_s` (or is loading it now, unless this call hedges).
        Returns (value, whether this call loaded it); raises what `load`
        raised, to the waiters too. After a load, `keep(value, error)` says
        whether to remember the outcome; either way the threads already
        waiting get it, unless a hedged load of the same key is still running:
        they then wait for that one."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.done.is_set() and entry.expires <= time.monotonic():
                entry = None
            owner = entry is None
            if owner:
                entry = self._entries[key] = _Entry()
                self.loads += 1
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
            else:
                self._entries.move_to_end(key)
                if hedge and not entry.done.is_set() and entry.loading < max_loads:
                    owner = True
                    entry.loading += 1
                    self.loads += 1
        assert entry is not None
        if not owner:
            entry.done.wait()
            if entry.error is not None:
                raise entry.error
            return entry.value, False
        value: object = None
        error: BaseException | None = None
        try:
            value = load()
        except BaseException as exc:  # noqa: BLE001 - handed to every caller below
            error = exc
        kept = keep(value, error)
        with self._lock:
            entry.loading -= 1
            if entry.done.is_set():
                # Another (hedged) load answered first, with a value that is kept:
                # a failure of this one is not worth more than that answer.
                if not kept:
                    value, error, owner = entry.value, entry.error, False
            elif kept or entry.loading == 0:
                entry.value, entry.error = value, error
                entry.expires = time.monotonic() + ttl_s
                if not kept and self._entries.get(key) is entry:
                    del self._entries[key]
                entry.done.set()
            # Otherwise a hedged load is still running: the waiters wait for it.
        if error is not None:
            raise error
        return value, owner

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


def _remember_lookup(addresses: object, error: BaseException | None) -> bool:
    """Answers and "no such name" are kept; a temporary failure or a bug is not."""
    if error is None:
        return True
    return isinstance(error, socket.gaierror | socket.herror) and getattr(error, "errno", None) != socket.EAI_AGAIN


class DnsCache:
    """A resolver's answers per host name, kept for at most `ttl_s` each; thread-safe.

    Args:
        resolver: `(host, port) -> [ip, ...]`, raising `socket.gaierror` when
            the host does not resolve.
        max_entries: Most names kept; the least recently used go first.
    """

    def __init__(self, resolver: Resolver, max_entries: int = 100_000) -> None:
        self.resolver = resolver
        self._cache = SingleFlightCache(max_entries)
        self._uncached = 0

    @property
    def lookups(self) -> int:
        """Resolver calls made (for tests and logs)."""
        return self._cache.loads + self._uncached

    def resolve(self, host: str, port: int, ttl_s: float) -> list[str]:
        """The addresses of `host`, from the cache when looked up less than
        `ttl_s` ago (0: always ask the resolver). Raises what the resolver raised."""
        if ttl_s <= 0:
            self._uncached += 1
            return self.resolver(host, port)
        addresses, _ = self._cache.get(
            host.lower(), lambda: list(self.resolver(host, port)), ttl_s=ttl_s, keep=_remember_lookup
        )
        return list(addresses)

    def clear(self) -> None:
        self._cache.clear()

    def __len__(self) -> int:
        return len(self._cache)


_DNS_CACHES: weakref.WeakKeyDictionary[Resolver, DnsCache] = weakref.WeakKeyDictionary()
_DNS_CACHES_LOCK = threading.Lock()


def dns_cache_for(resolver: Resolver) -> DnsCache:
    """The process's DNS cache over `resolver` (one per resolver function)."""
    with _DNS_CACHES_LOCK:
        cache = _DNS_CACHES.get(resolver)
        if cache is None:
            cache = _DNS_CACHES[resolver] = DnsCache(resolver)
        return cache

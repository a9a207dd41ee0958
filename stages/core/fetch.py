"""Fetching one image over HTTP(S), as img2dataset does, safely: the crawl
stage's plain-Python core (`Fetcher`); `stages/crawl.py` is the Beam adapter
and `stages/core/address.py` the address policy.

Kept: rows whose URL answers 2xx with a body of at most `max_body_bytes`, with
no X-Robots-Tag opt-out. They leave as `WithImage(record, data)`, with
`record.provenance` filled in (`final_url`, `http_status`, `content_type`,
`fetched_at`). Dropped, one `Rejection` each (stage `crawl`):

- `private_address`: the host (or a redirect's host) resolves to an address
  that is not public unicast: loopback, RFC 1918 private, carrier-grade NAT,
  link-local (incl. the 169.254.169.254 cloud metadata service), multicast,
  every other block of the IANA special-purpose registries, IPv6 site-local,
  and IPv6 forms that embed a non-public IPv4 address (IPv4-mapped, 6to4,
  NAT64); see `stages/core/address.py`. No request is sent.
  `allow_private_network=True` disables it.
- `dns_failure`: the host does not resolve.
- `http_error`: a status outside 2xx that is not a followed redirect
  (the detail says which).
- `timeout`: connecting, or waiting for any read, took over `timeout_s`.
- `connection_error`: refused, reset, closed early, TLS failure.
- `too_large`: `Content-Length` announces more than `max_body_bytes`, or the
  body turns out longer; at most `max_body_bytes + 1` bytes are read.
- `opt_out`: an `X-Robots-Tag` header on any response of the chain carries one
  of `disallowed_header_directives`, either for all agents or for
  `user_agent_token` (img2dataset's `is_disallowed`, reused as is). An empty
  directive list disables the check.
- `too_many_redirects`: more than `max_redirects` redirects (0 follows none).
- `unsupported_scheme` / `malformed_url`: a URL (or redirect target) that is
  not http(s), or that has no usable host or port.

Semantics follow img2dataset's `download_image`: urllib, the same User-Agent
with the token, the same opt-out rule, `retries` extra attempts. Unlike it,
only timeouts and connection errors are retried (a 404 stays a 404), and the
crawler resolves each host once, checks every address, and connects to exactly
that address (Host header and TLS SNI keep the name), so a DNS answer that
changes between check and connect cannot reach an internal service. Redirects
are followed one hop at a time and each hop is checked the same way.
Environment proxies are ignored: a proxy would resolve names itself.

At most `max_per_host` fetches run against one host at a time in a worker
process, whatever the number of threads or DoFn instances.

Not bounded by `timeout_s`: name resolution (the system resolver's own
timeouts apply) and the total duration of a body that keeps trickling in
(each read waits at most `timeout_s`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import http.client
import ipaddress
import logging
import os
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator

from schemas import CrawlConfig, RejectReason
from stages.core.address import IPAddress, non_public_reason, resolve
from stages.core.verdict import Drop

# img2dataset's package import pulls in albumentations, which otherwise checks
# PyPI for a newer version on import.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
from img2dataset.downloader import is_disallowed  # noqa: E402

logger = logging.getLogger(__name__)

# img2dataset's User-Agent, so that sites which address its token in
# robots.txt or X-Robots-Tag see the crawler they expect.
BROWSER_USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"
USER_AGENT_URL = "https://github.com/rom1504/img2dataset"

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
SCHEMES = {"http": 80, "https": 443}
_READ_CHUNK_BYTES = 64 * 1024

def user_agent(token: str | None) -> str:
    """img2dataset's User-Agent string, with `(compatible; TOKEN; +URL)` when a token is set."""
    if not token:
        return BROWSER_USER_AGENT
    return f"{BROWSER_USER_AGENT} (compatible; {token}; +{USER_AGENT_URL})"


# -- per-host concurrency ---------------------------------------------------------


class _HostSlots:
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


HOST_SLOTS = _HostSlots()


# -- connections pinned to a checked address --------------------------------------


class _PinnedConnectionMixin:
    """An http.client connection that connects to addresses checked beforehand
    instead of resolving its host again; the host name still goes into the
    Host header and, for HTTPS, into SNI and certificate verification."""

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


class _PinnedHTTPConnection(_PinnedConnectionMixin, http.client.HTTPConnection):
    pass


class _PinnedHTTPSConnection(_PinnedConnectionMixin, http.client.HTTPSConnection):
    pass


@functools.cache
def _tls_context() -> ssl.SSLContext:
    # One per process: loading the CA store is not free, and a context is
    # thread-safe for wrap_socket. Never pickled (module state).
    return ssl.create_default_context()


class _PinnedHandler(urllib.request.AbstractHTTPHandler):
    """urllib handler for http and https that connects to `addresses` only."""

    def __init__(self, addresses: list[str]) -> None:
        super().__init__()
        self.addresses = addresses

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_PinnedHTTPConnection, req, addresses=self.addresses)

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_PinnedHTTPSConnection, req, addresses=self.addresses, context=_tls_context())

    http_request = urllib.request.AbstractHTTPHandler.do_request_
    https_request = urllib.request.AbstractHTTPHandler.do_request_


def _open(url: str, addresses: list[str], headers: dict[str, str], timeout_s: float) -> http.client.HTTPResponse:
    """GET `url` from one of `addresses`, returning the response whatever its
    status. The opener has no redirect, error or proxy handlers: the caller
    sees 3xx and 4xx as they are and decides."""
    opener = urllib.request.OpenerDirector()
    opener.add_handler(_PinnedHandler(addresses))
    return opener.open(urllib.request.Request(url, headers=headers), timeout=timeout_s)


# -- the fetcher --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FetchResult:
    """The outcome of one `Fetcher.fetch`: `data` or a `drop`, never both.

    `final_url` is the last URL requested (after redirects), `http_status` and
    `content_type` those of the last response (None when none came back).
    """

    data: bytes | None = dataclasses.field(repr=False)
    drop: Drop | None
    final_url: str | None = None
    http_status: int | None = None
    content_type: str | None = None
    attempts: int = 1
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.drop is None


@dataclasses.dataclass(frozen=True)
class CheckedUrl:
    """A URL checked and ready to connect to."""

    url: str
    host: str
    addresses: list[str]


_RETRYABLE = frozenset({RejectReason.TIMEOUT, RejectReason.CONNECTION_ERROR})


class Fetcher:
    """Fetches one URL at a time, following `CrawlConfig`; thread-safe, picklable.

    Args:
        config: The crawl stage config.
        resolver: `(host, port) -> [ip, ...]`, raising `socket.gaierror` when
            the host does not resolve. Default: `resolve` (getaddrinfo).
        address_check: `ip -> reason or None`; an address with a reason is
            refused unless `config.allow_private_network`. Default:
            `non_public_reason`. Injectable so tests can treat loopback as public.
    """

    def __init__(
        self,
        config: CrawlConfig,
        *,
        resolver: Callable[[str, int], list[str]] = resolve,
        address_check: Callable[[IPAddress], str | None] = non_public_reason,
    ) -> None:
        self.config = config
        self.resolver = resolver
        self.address_check = address_check
        # Normalised as img2dataset's Downloader does before calling is_disallowed.
        self.user_agent_token = None if config.user_agent_token is None else config.user_agent_token.strip().lower()
        self.disallowed_directives = {d.strip().lower() for d in config.disallowed_header_directives}
        self.headers = {"User-Agent": user_agent(self.user_agent_token)}

    def fetch(self, url: str) -> FetchResult:
        """Fetch `url`, retrying timeouts and connection errors up to
        `config.retries` times. Never raises for a bad URL or response."""
        start = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                result, retryable = self._attempt(url)
            except Exception as exc:  # a bug or an exotic failure must not kill the bundle
                logger.exception("unexpected error fetching %s", url)
                result, retryable = FetchResult(None, Drop(RejectReason.CONNECTION_ERROR, f"unexpected: {exc!r}")), False
            if not retryable or attempt > self.config.retries:
                return dataclasses.replace(result, attempts=attempt, elapsed_s=time.monotonic() - start)
            logger.debug("retrying %s after %s (attempt %d)", url, result.drop, attempt)

    def check_url(self, url: str) -> CheckedUrl | Drop:
        """Parse, normalise and resolve `url`, and check every address it
        resolves to. Applied to the first URL and to every redirect target."""
        try:
            parts = urllib.parse.urlsplit(url.strip())
            scheme = parts.scheme.lower()
            if scheme not in SCHEMES:
                return Drop(RejectReason.UNSUPPORTED_SCHEME, f"scheme {parts.scheme!r} in {url!r}")
            host = parts.hostname
            port = parts.port or SCHEMES[scheme]
            if not host:
                return Drop(RejectReason.MALFORMED_URL, f"no host in {url!r}")
            ascii_host = host if host.isascii() else host.encode("idna").decode("ascii")
        except (ValueError, UnicodeError) as exc:
            return Drop(RejectReason.MALFORMED_URL, f"{url!r}: {exc}")

        try:
            addresses = self.resolver(ascii_host, port)
        except (socket.gaierror, socket.herror) as exc:
            return Drop(RejectReason.DNS_FAILURE, f"{ascii_host}: {exc}")
        except UnicodeError as exc:
            return Drop(RejectReason.MALFORMED_URL, f"host {host!r}: {exc}")
        if not addresses:
            return Drop(RejectReason.DNS_FAILURE, f"{ascii_host}: no addresses")

        if not self.config.allow_private_network:
            for address in addresses:
                try:
                    why = self.address_check(ipaddress.ip_address(address))
                except ValueError:
                    why = "unparseable address"
                if why is not None:
                    return Drop(RejectReason.PRIVATE_ADDRESS, f"{ascii_host} -> {address}: {why}")

        netloc = f"[{ascii_host}]" if ":" in ascii_host else ascii_host
        if parts.port is not None:
            netloc += f":{parts.port}"
        path = _quote(parts.path) or "/"
        query = _quote(parts.query)
        normalised = urllib.parse.urlunsplit((scheme, netloc, path, query, ""))
        return CheckedUrl(url=normalised, host=ascii_host.lower(), addresses=addresses)

    def _attempt(self, url: str) -> tuple[FetchResult, bool]:
        """One attempt: follow redirects hop by hop. Returns the result and
        whether it is worth retrying."""
        for hop in range(self.config.max_redirects + 1):
            target = self.check_url(url)
            if isinstance(target, Drop):
                return FetchResult(None, target, final_url=url), False
            with HOST_SLOTS.hold(target.host, self.config.max_per_host):
                outcome = self._get(target)
            if isinstance(outcome, str):  # a redirect: the next hop
                url = outcome
                continue
            return outcome
        return (
            FetchResult(
                None,
                Drop(RejectReason.TOO_MANY_REDIRECTS, f"more than {self.config.max_redirects} redirects, next {url}"),
                final_url=url,
            ),
            False,
        )

    def _get(self, target: CheckedUrl) -> tuple[FetchResult, bool] | str:
        """One request. Returns the redirect target URL, or the result."""
        try:
            response = _open(target.url, target.addresses, self.headers, self.config.timeout_s)
        except Exception as exc:  # noqa: BLE001 - classified below
            drop = _classify(exc)
            return FetchResult(None, drop, final_url=target.url), drop.reason in _RETRYABLE

        with contextlib.closing(response):
            status = response.status
            content_type = response.headers.get("Content-Type")

            def result(data: bytes | None, drop: Drop | None) -> FetchResult:
                return FetchResult(data, drop, final_url=target.url, http_status=status, content_type=content_type)

            if self.disallowed_directives and is_disallowed(
                response.headers, self.user_agent_token, self.disallowed_directives
            ):
                tags = "; ".join(response.headers.get_all("X-Robots-Tag", []))
                return result(None, Drop(RejectReason.OPT_OUT, f"X-Robots-Tag: {tags}")), False

            if status in REDIRECT_STATUSES:
                location = response.headers.get("Location")
                if not location:
                    return result(None, Drop(RejectReason.HTTP_ERROR, f"HTTP {status} without Location")), False
                return urllib.parse.urljoin(target.url, location.strip())

            if not 200 <= status < 300:
                return result(None, Drop(RejectReason.HTTP_ERROR, f"HTTP {status} {response.reason}")), False

            try:
                body = self._read_body(response)
            except Exception as exc:  # noqa: BLE001 - classified below
                drop = _classify(exc)
                return result(None, drop), drop.reason in _RETRYABLE
            if isinstance(body, Drop):
                return result(None, body), False
            return result(body, None), False

    def _read_body(self, response: http.client.HTTPResponse) -> bytes | Drop:
        limit = self.config.max_body_bytes
        declared = response.headers.get("Content-Length", "").strip()
        if declared.isdigit() and int(declared) > limit:
            return Drop(RejectReason.TOO_LARGE, f"Content-Length {declared} > max_body_bytes {limit}")
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = response.read(min(_READ_CHUNK_BYTES, limit + 1 - size))
            if not chunk:
                if declared.isdigit() and size < int(declared):
                    # read(amt) reports a short body as a plain end of data.
                    raise http.client.IncompleteRead(b"", int(declared) - size)
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                return Drop(RejectReason.TOO_LARGE, f"body longer than max_body_bytes {limit}")


def _quote(component: str) -> str:
    """Percent-encode what may not appear raw in a request line (spaces,
    controls, non-ASCII as UTF-8); existing escapes and reserved characters
    are kept, so an already valid URL is unchanged."""
    return urllib.parse.quote(component, safe="/%:@!$&'()*+,;=?[]~")


def _classify(exc: BaseException) -> Drop:
    """Map an exception from urllib/http.client to a reject reason."""
    if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, BaseException):
        exc = exc.reason
    if isinstance(exc, TimeoutError):
        return Drop(RejectReason.TIMEOUT, str(exc) or "timed out")
    if isinstance(exc, http.client.InvalidURL | UnicodeError):
        return Drop(RejectReason.MALFORMED_URL, str(exc))
    if isinstance(exc, socket.gaierror):
        return Drop(RejectReason.DNS_FAILURE, str(exc))
    return Drop(RejectReason.CONNECTION_ERROR, f"{type(exc).__name__}: {exc}")

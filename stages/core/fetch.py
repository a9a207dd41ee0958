"""Fetching one image over HTTP(S), as img2dataset does, safely and politely:
the crawl stage's plain-Python core (`Fetcher`); `stages/crawl.py` is the Beam
adapter, `stages/core/address.py` the address policy, `stages/core/robots.py`
the site-wide opt-outs and `stages/core/connections.py` the connections.

Kept: rows whose URL answers 2xx with a body of at most `max_body_bytes`, with
no opt-out. They leave as `WithImage(record, data)`, with `record.provenance`
filled in (`final_url`, `http_status`, `content_type`, `fetched_at`). Dropped,
one `Rejection` each (stage `crawl`):

- `private_address`: the host (or a redirect's host) resolves to an address
  that is not public unicast (loopback, private, link-local incl. the cloud
  metadata service 169.254.169.254, every special-purpose block and the IPv6
  forms embedding such an IPv4 address: `stages/core/address.py`). No request
  is sent. `allow_private_network=True` disables it.
- `dns_failure`: the host does not resolve.
- `http_error`: a status outside 2xx that is not a followed redirect
  (the detail says which; a 429/503 also sets `FetchResult.retry_after_s`).
- `timeout`: connecting, or waiting for any read, took over `timeout_s`.
- `connection_error`: refused, reset, closed early, TLS failure.
- `too_large`: `Content-Length` announces more than `max_body_bytes`, or the
  body turns out longer; at most `max_body_bytes + 1` bytes are read.
- `robots_disallowed`: the host's robots.txt disallows the URL for
  `user_agent_token` or one of `robots_user_agents`, or could not be read
  (5xx); `robots_txt=False` disables it. See `stages/core/robots.py`.
- `tdm_reserved`: W3C TDMRep: the answer carries `tdm-reservation: 1`, or the
  host's `/.well-known/tdmrep.json` reserves the path; `tdmrep=False` disables it.
- `opt_out`: an `X-Robots-Tag` header on any response of the chain carries one
  of `disallowed_header_directives`, either for all agents or for
  `user_agent_token` (img2dataset's `is_disallowed`, reused as is). An empty
  directive list disables the check.
- `too_many_redirects`: more than `max_redirects` redirects (0 follows none).
- `unsupported_scheme` / `malformed_url`: a URL (or redirect target) that is
  not http(s), or that has no usable host or port.

Semantics follow img2dataset's `download_image`: the same User-Agent with the
token, the same X-Robots-Tag rule, `retries` extra attempts. Unlike it, only
timeouts and connection errors are retried (a 404 stays a 404), and the
crawler resolves each host once, checks every address, and connects to exactly
that address (Host header and TLS SNI keep the name), so a DNS answer that
changes between check and connect cannot reach an internal service. Redirects
are followed one hop at a time and each hop is checked the same way, opt-outs
of the hop's host included. Environment proxies are ignored: a proxy would
resolve names itself.

Per worker process: robots.txt and tdmrep.json are fetched once per host, a
host name is resolved once and kept for at most `dns_cache_ttl_s`, connections
are kept alive per Fetcher, and at most `max_per_host` requests (a matching
`host_budgets` entry's) run against one host at a time. The job-wide budgets
are the host scheduler's (`stages/core/host_schedule.py`): it paces every
request through `before_request` and reads `retry_after_s` and `host_failure`.

Not bounded by `timeout_s`: name resolution (the system resolver's own
timeouts apply) and the total duration of a body that keeps trickling in
(each read waits at most `timeout_s`).
"""

from __future__ import annotations

import dataclasses
import http.client
import ipaddress
import logging
import os
import socket
import time
import urllib.parse
from collections.abc import Callable

from schemas import CrawlConfig, RejectReason
from stages.core import connections
from stages.core.address import IPAddress, host_of, non_public_reason, quote_component, resolve, split_url
from stages.core.connections import (  # noqa: I001 - grouped to keep the module short
    HOST_FAILURE_REASONS, HOST_SLOTS, REDIRECT_STATUSES, THROTTLE_STATUSES, ConnectionPool, PoolKey, classify_error,
    dns_cache_for, drain, new_connection, parse_retry_after, retry_after_of,
)
from stages.core.robots import (
    OPT_OUT_CACHE, ROBOTS_PATH, TDMREP_PATH, OptOutCache, RobotsRules, SiteFileFetching, Unresolved, header_reservation,
)
from stages.core.host_schedule import host_budget
from stages.core.verdict import Drop

# img2dataset's package import pulls in albumentations, which otherwise checks
# PyPI for a newer version on import.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def x_robots_tag_check():
    """img2dataset's `is_disallowed(headers, token, directives)`, imported when
    a Fetcher is made, not with this module: the package pulls in torch and
    albumentations (seconds of start-up for a worker that never fetches), and
    not on the first response either, where the import would hold that
    fetch (and any thread importing meanwhile) for seconds."""
    from img2dataset.downloader import is_disallowed

    return is_disallowed

# What the host scheduler and the Beam adapter use.
__all__ = ["HOST_FAILURE_REASONS", "HOST_SLOTS", "THROTTLE_STATUSES", "CheckedUrl", "FetchResult", "Fetcher"]
__all__ += ["parse_retry_after", "user_agent"]

logger = logging.getLogger(__name__)

# img2dataset's User-Agent, so that sites which address its token in
# robots.txt or X-Robots-Tag see the crawler they expect.
BROWSER_USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"
USER_AGENT_URL = "https://github.com/rom1504/img2dataset"

_READ_CHUNK_BYTES = 64 * 1024

def user_agent(token: str | None) -> str:
    """img2dataset's User-Agent string, with `(compatible; TOKEN; +URL)` when a token is set."""
    if not token:
        return BROWSER_USER_AGENT
    return f"{BROWSER_USER_AGENT} (compatible; {token}; +{USER_AGENT_URL})"


# -- the fetcher --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FetchResult:
    """The outcome of one `Fetcher.fetch`: `data` or a `drop`, never both.

    `final_url` is the last URL requested (after redirects), `http_status` and
    `content_type` those of the last response (None when none came back).
    For the host scheduler:

    - `retry_after_s`: the delay a 429 or 503 asked for (its `Retry-After`,
      delta-seconds or an HTTP-date, as seconds from now, negative clamped to
      0); None otherwise, and for a 429/503 without a usable `Retry-After`.
      The row is still an `http_error` drop: re-queuing is the scheduler's call.
    - `host_failure`: the fetch failed talking to the row's own host in a way
      that counts towards declaring it down (DNS failure, timeout, connection
      refused, reset or closed, TLS failure), also when that happened fetching
      its robots.txt or tdmrep.json; False for HTTP errors, `too_large`,
      opt-outs, refused addresses, failures on other hosts a redirect led to,
      and rows that only waited for another call's failed robots.txt /
      tdmrep.json fetch (they keep its reason, with `requests` 0).
    - `requests`: HTTP requests this call sent to the row's host (by name):
      retries, redirect hops and the robots.txt / tdmrep.json fetches it made
      included, so they can be charged to the host's rate budget. A row
      refused before any request has 0.
    """

    data: bytes | None = dataclasses.field(repr=False)
    drop: Drop | None
    final_url: str | None = None
    http_status: int | None = None
    content_type: str | None = None
    attempts: int = 1
    elapsed_s: float = 0.0
    retry_after_s: float | None = None
    host_failure: bool = False
    requests: int = 0

    @property
    def ok(self) -> bool:
        return self.drop is None


@dataclasses.dataclass(frozen=True)
class CheckedUrl:
    """A URL checked and ready to connect to: `url` normalised, `target` the
    request target (path and query)."""

    url: str
    host: str
    addresses: list[str]
    scheme: str = "http"
    port: int = 80
    target: str = "/"

    @property
    def origin(self) -> str:
        return self.url[: len(self.url) - len(self.target)]

    @property
    def pool_key(self) -> PoolKey:
        return PoolKey(self.scheme, self.host, self.port, tuple(self.addresses))


@dataclasses.dataclass
class _Call:
    """Bookkeeping of one `fetch` call: the row's host, the requests sent to
    it, the caller's hooks run before every request and when the row's host
    answers one, and whether the call is a further probe of a host that has
    not answered yet (`hedge`)."""

    row_host: str | None
    requests: int = 0
    before_request: Callable[[str], None] | None = None
    hedge: bool = False
    on_answer: Callable[[], None] | None = None


_RETRYABLE = frozenset({RejectReason.TIMEOUT, RejectReason.CONNECTION_ERROR})


class Fetcher(SiteFileFetching):
    """Fetches one URL at a time, following `CrawlConfig`; thread-safe (call
    `fetch` from any number of threads), picklable.

    Args:
        config: The crawl stage config.
        resolver: `(host, port) -> [ip, ...]`, raising `socket.gaierror` when
            the host does not resolve. Default: `resolve` (getaddrinfo). Its
            answers are cached per process for `config.dns_cache_ttl_s`.
        address_check: `ip -> reason or None`; an address with a reason is
            refused unless `config.allow_private_network`. Default:
            `non_public_reason`. Injectable so tests can treat loopback as public.
        opt_outs: Where robots.txt and tdmrep.json verdicts are kept; default
            the process's `OPT_OUT_CACHE`.
    """

    def __init__(
        self,
        config: CrawlConfig,
        *,
        resolver: Callable[[str, int], list[str]] = resolve,
        address_check: Callable[[IPAddress], str | None] = non_public_reason,
        opt_outs: OptOutCache | None = None,
    ) -> None:
        self.config = config
        self.resolver = resolver
        self.address_check = address_check
        self.opt_outs = opt_outs
        # Normalised as img2dataset's Downloader does before calling is_disallowed.
        self.user_agent_token = None if config.user_agent_token is None else config.user_agent_token.strip().lower()
        self.disallowed_directives = {d.strip().lower() for d in config.disallowed_header_directives}
        self.headers = {"User-Agent": user_agent(self.user_agent_token)}
        # robots.txt tokens: ours first, so a detail names it when both disallow.
        tokens = [config.user_agent_token or "", *config.robots_user_agents]
        self.robots_tokens = list(dict.fromkeys(t.strip() for t in tokens if t and t.strip())) or ["*"]
        self._setup()

    def _setup(self) -> None:
        self._is_disallowed = x_robots_tag_check()
        self._dns = dns_cache_for(self.resolver)
        self._opt_outs = OPT_OUT_CACHE if self.opt_outs is None else self.opt_outs
        self._pool = ConnectionPool(max_idle=max(16, self.config.threads), max_idle_per_key=self.config.threads)

    def __getstate__(self) -> dict:
        # Caches and idle connections belong to the process; a copy gets its own.
        state = dict(self.__dict__)
        for name in ("_dns", "_opt_outs", "_pool", "_is_disallowed"):
            state.pop(name)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._setup()

    def close(self) -> None:
        """Close the idle keep-alive connections (the Fetcher stays usable)."""
        self._pool.close()

    def connections_for(self, host: str) -> int:
        """The most requests in flight to `host` in this process: its budget's
        connections (`host_schedule.host_budget`: the first matching
        `host_budgets` entry, else `config.max_per_host`)."""
        return host_budget(self.config, host).connections

    def fetch(
        self,
        url: str,
        *,
        before_request: Callable[[str], None] | None = None,
        hedge: bool = False,
        on_answer: Callable[[], None] | None = None,
    ) -> FetchResult:
        """Fetch `url`, retrying timeouts and connection errors up to
        `config.retries` times. Never raises for a bad URL or response.

        `before_request(host)`, if given, runs right before every HTTP request
        this call sends (robots.txt, tdmrep.json, redirect hops and retries
        included; `host` the request's host name, which a redirect may change)
        and may block: the host scheduler paces each host's rate with it, so
        the files fetched for a new host do not go out as one burst. It runs
        while the request holds its per-host slot in this process.

        `hedge`: the host scheduler started this fetch as a further probe of
        a host that has not answered yet, while an earlier probe is still
        waiting: the first site file the row's host is asked for (robots.txt,
        or tdmrep.json without it) is requested again rather than waited for
        (see `OptOutCache`), so the probe is a request of its own.

        `on_answer()`, if given, runs each time a response (any status) arrives
        from the row's host: the scheduler learns the host is up before the
        row's last request is done."""
        start = time.monotonic()
        split = split_url(url)
        row_host = None if isinstance(split, Drop) else split[1]
        call = _Call(row_host=row_host, before_request=before_request, hedge=hedge, on_answer=on_answer)
        attempt = 0
        while True:
            attempt += 1
            try:
                result, retryable = self._attempt(url, call)
            except Exception as exc:  # a bug or an exotic failure must not kill the bundle
                logger.exception("unexpected error fetching %s", url)
                result, retryable = FetchResult(None, Drop(RejectReason.CONNECTION_ERROR, f"unexpected: {exc!r}")), False
            if not retryable or attempt > self.config.retries:
                return dataclasses.replace(
                    result, attempts=attempt, elapsed_s=time.monotonic() - start, requests=call.requests
                )
            logger.debug("retrying %s after %s (attempt %d)", url, result.drop, attempt)

    def check_url(self, url: str) -> CheckedUrl | Drop:
        """Parse, normalise and resolve `url`, and check every address it
        resolves to. Applied to the first URL, to every redirect target and
        to every robots.txt / tdmrep.json request."""
        split = split_url(url)
        if isinstance(split, Drop):
            return split
        parts, ascii_host, port = split
        scheme = parts.scheme.lower()
        try:
            addresses = self._dns.resolve(ascii_host, port, self.config.dns_cache_ttl_s)
        except (socket.gaierror, socket.herror) as exc:
            return Drop(RejectReason.DNS_FAILURE, f"{ascii_host}: {exc}")
        except UnicodeError as exc:
            return Drop(RejectReason.MALFORMED_URL, f"host {parts.hostname!r}: {exc}")
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
        path = quote_component(parts.path) or "/"
        query = quote_component(parts.query)
        normalised = urllib.parse.urlunsplit((scheme, netloc, path, query, ""))
        target = path + (f"?{query}" if query else "")
        return CheckedUrl(
            url=normalised, host=ascii_host, addresses=addresses, scheme=scheme, port=port, target=target
        )

    # -- one attempt: opt-outs, then the image, hop by hop -------------------------------

    def _attempt(self, url: str, call: _Call) -> tuple[FetchResult, bool]:
        """One attempt: follow redirects hop by hop. Returns the result and
        whether it is worth retrying."""
        for _hop in range(self.config.max_redirects + 1):
            target = self.check_url(url)
            if isinstance(target, Drop):
                failed = target.reason in HOST_FAILURE_REASONS and host_of(url) == call.row_host
                return FetchResult(None, target, final_url=url, host_failure=failed), False
            opted_out = self._opt_outs_of(target, call)
            if opted_out is not None:
                return opted_out
            with HOST_SLOTS.hold(target.host, self.connections_for(target.host)):
                outcome = self._get(target, call)
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

    def _opt_outs_of(self, target: CheckedUrl, call: _Call) -> tuple[FetchResult, bool] | None:
        """robots.txt and tdmrep.json of `target`'s host: the drop when either
        rejects `target`, or None. Each is fetched once per host per process."""
        checks = []
        if self.config.robots_txt:
            checks.append(("robots", ROBOTS_PATH, RejectReason.ROBOTS_DISALLOWED))
        if self.config.tdmrep:
            checks.append(("tdmrep", TDMREP_PATH, RejectReason.TDM_RESERVED))
        for first, (kind, path, reason) in zip((True, False), checks):
            key = (kind, target.scheme, target.host, target.port)
            verdicts, loaded = self._opt_outs.get(
                key,
                lambda path=path, kind=kind: self._load_opt_out(kind, target, path, call),
                hedge=first and call.hedge and target.host == call.row_host,
                max_loads=self.config.host_down_after,
            )
            if isinstance(verdicts, Unresolved):
                drop = Drop(RejectReason(verdicts.reason), verdicts.detail)
                result = FetchResult(
                    None,
                    drop,
                    final_url=target.url,
                    http_status=verdicts.http_status,
                    retry_after_s=verdicts.retry_after_s,
                    # Only the call that sent the failed request counts it; the
                    # rows that waited for that fetch share its reason, not its failure.
                    host_failure=verdicts.host_failure and loaded and target.host == call.row_host,
                )
                return result, drop.reason in _RETRYABLE
            detail = (
                verdicts.disallowed(target.url, self.robots_tokens)
                if isinstance(verdicts, RobotsRules)
                else verdicts.reserved(target.url)
            )
            if detail is not None:
                return FetchResult(None, Drop(reason, detail), final_url=target.url), False
        return None

    # -- one request ---------------------------------------------------------------------

    def _request(self, target: CheckedUrl, call: _Call) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send GET `target` on an idle keep-alive connection to its checked
        addresses, or a new one. A reused connection the server closed in the
        meantime is replaced once, transparently (the request never arrived)."""
        if call.before_request is not None:
            call.before_request(target.host)
        if target.host == call.row_host:
            call.requests += 1
        key = target.pool_key
        conn = self._pool.take(key)
        reused = conn is not None
        while True:
            if conn is None:
                context = connections.tls_context() if key.scheme == "https" else None
                conn = new_connection(key, self.config.timeout_s, context)
            try:
                conn.request("GET", target.target, headers=self.headers)
                response = conn.getresponse()
            except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError):
                conn.close()
                if not reused:
                    raise
                reused, conn = False, None
            except BaseException:
                conn.close()
                raise
            if call.on_answer is not None and target.host == call.row_host:
                call.on_answer()
            return conn, response

    def _release(
        self, target: CheckedUrl, conn: http.client.HTTPConnection, response: http.client.HTTPResponse, reusable: bool
    ) -> None:
        """Back to the pool if the response was read to its end and the server keeps the connection open."""
        if reusable and response.isclosed() and not response.will_close and conn.sock is not None:
            self._pool.give(target.pool_key, conn)
        else:
            response.close()
            conn.close()

    def _get(self, target: CheckedUrl, call: _Call) -> tuple[FetchResult, bool] | str:
        """One request. Returns the redirect target URL, or the result."""
        on_row_host = target.host == call.row_host
        try:
            conn, response = self._request(target, call)
        except Exception as exc:  # noqa: BLE001 - classified below
            drop = classify_error(exc)
            failed = on_row_host and drop.reason in HOST_FAILURE_REASONS
            return FetchResult(None, drop, final_url=target.url, host_failure=failed), drop.reason in _RETRYABLE

        reusable = False
        try:
            status = response.status
            content_type = response.headers.get("Content-Type")

            def result(data: bytes | None, drop: Drop | None, **extra) -> FetchResult:
                return FetchResult(
                    data, drop, final_url=target.url, http_status=status, content_type=content_type, **extra
                )

            if self.disallowed_directives and self._is_disallowed(
                response.headers, self.user_agent_token, self.disallowed_directives
            ):
                tags = "; ".join(response.headers.get_all("X-Robots-Tag", []))
                return result(None, Drop(RejectReason.OPT_OUT, f"X-Robots-Tag: {tags}")), False

            if self.config.tdmrep and (reserved := header_reservation(response.headers)) is not None:
                return result(None, Drop(RejectReason.TDM_RESERVED, reserved)), False

            if status in REDIRECT_STATUSES:
                location = response.headers.get("Location")
                if not location:
                    return result(None, Drop(RejectReason.HTTP_ERROR, f"HTTP {status} without Location")), False
                reusable = drain(response)
                return urllib.parse.urljoin(target.url, location.strip())

            if not 200 <= status < 300:
                reusable = drain(response)
                drop = Drop(RejectReason.HTTP_ERROR, f"HTTP {status} {response.reason}")
                return result(None, drop, retry_after_s=retry_after_of(response)), False

            try:
                body = self._read_body(response)
            except Exception as exc:  # noqa: BLE001 - classified below
                drop = classify_error(exc)
                failed = on_row_host and drop.reason in HOST_FAILURE_REASONS
                return result(None, drop, host_failure=failed), drop.reason in _RETRYABLE
            if isinstance(body, Drop):
                return result(None, body), False
            reusable = True
            return result(body, None), False
        finally:
            self._release(target, conn, response, reusable)

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

"""Opt-outs a host publishes for the whole site: robots.txt (RFC 9309) and
W3C TDMRep's `/.well-known/tdmrep.json`, read once per host per worker
process. Plain Python, no Beam; `stages/core/fetch.py` fetches the files
(through the same address policy, pinned connections and redirect checks as
every image request) and applies the verdicts before each image request.

robots.txt (`CrawlConfig.robots_txt`, on by default), parsed by protego (the
parser Scrapy uses), is applied for `user_agent_token` and each of
`robots_user_agents` (AI-crawler tokens the user chooses to honour): a URL
that any of them may not fetch is rejected as `robots_disallowed`, the detail
naming the token. Each token gets protego's usual group matching, so a token
without its own group follows `User-agent: *`: a site that disallows `*` but
allows our token explicitly is still rejected while AI tokens are honoured
(empty `robots_user_agents` follows our token alone). What the fetch of
robots.txt gives (RFC 9309 2.3.1):

- 2xx: its rules; only the first `max_robots_bytes` are read and parsed
  (RFC 9309 2.5: at least 500 KiB; rules past the limit are ignored);
- 4xx (except 429), or more than 5 redirects (2.3.1.2): no rules, allow all;
- 5xx, or a redirect to an address the policy refuses or that is
  unreachable: disallow all, for the rest of the run (2.3.1.4);
- 429, or a connection failure, timeout or DNS failure on the row's own host:
  nothing is remembered; the row is rejected with that failure's reason
  (`http_error` with its Retry-After, `connection_error`, `timeout`,
  `dns_failure`) and counts as a host failure, so a dead host ends up
  `host_unreachable` through the scheduler rather than hiding among opt-outs.
  The next row of the host asks again.

TDMRep (`CrawlConfig.tdmrep`, on by default; the W3C TDM Reservation Protocol
final report): `/.well-known/tdmrep.json` is an array of rules
`{"location": PATTERN, "tdm-reservation": 0|1, "tdm-policy": URL}`; the first
rule whose location matches the URL's path (and query) applies, and
`tdm-reservation: 1` rejects the row as `tdm_reserved`. Locations use
robots.txt's pattern syntax (`*` any characters, a final `$` the end of the
path, otherwise a prefix). A missing, failing (4xx, 5xx) or malformed file
reserves nothing; a 429 or a failure on the row's host is handled as for
robots.txt. The `tdm-reservation: 1` response header on the image's own
response is checked by the fetcher (`header_reservation`).

`OptOutCache` holds both per (kind, scheme, host, port), thread-safe: the
first row of a host fetches, concurrent rows of that host wait for that one
fetch instead of sending their own, and the entry stays for the process's
life (at most `max_hosts` hosts, least recently used dropped first).
`OPT_OUT_CACHE` is the process's. The one exception: a fetch the host
scheduler started as a further probe of a host that has not answered yet
(`Fetcher.fetch(..., hedge=True)`, see `stages/core/host_schedule.py`) sends
its own request for the host's first site file instead of waiting for the
probe before it (at most `host_down_after` at once), so each probe of a
silent host counts towards declaring it down.
"""

from __future__ import annotations

import dataclasses
import json
import re
import urllib.parse
from collections.abc import Callable, Iterable, Mapping

from protego import Protego

from schemas import CrawlConfig
from stages.core.address import host_of
from stages.core.connections import (
    HOST_FAILURE_REASONS,
    HOST_SLOTS,
    REDIRECT_STATUSES,
    SingleFlightCache,
    classify_error,
    drain,
    retry_after_of,
)
from stages.core.verdict import Drop

ROBOTS_PATH = "/robots.txt"
TDMREP_PATH = "/.well-known/tdmrep.json"
MAX_ROBOTS_REDIRECTS = 5  # RFC 9309 2.3.1.2: follow at least five


@dataclasses.dataclass(frozen=True)
class Document:
    """What fetching robots.txt or tdmrep.json gave.

    `status`: the last response's status (None when none came back);
    `body`: its first bytes (at most the limit); `failure`: why no final
    response came (a reject reason's value and a detail), with
    `on_origin_host` True when it happened talking to the host the file
    belongs to (not a host a redirect led to) and `retry_after_s` for a 429;
    `url`: the last URL tried.
    """

    url: str
    status: int | None = None
    body: bytes = b""
    failure: tuple[str, str] | None = None
    on_origin_host: bool = False
    retry_after_s: float | None = None
    too_many_redirects: bool = False


@dataclasses.dataclass(frozen=True)
class Unresolved:
    """A fetch that settled nothing: the row is rejected with `reason` and the
    host asked again next time (never cached)."""

    reason: str
    detail: str
    host_failure: bool
    retry_after_s: float | None = None
    http_status: int | None = None


# -- robots.txt -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RobotsRules:
    """A host's robots.txt verdicts: its `parser`, or allow/disallow everything (`why`)."""

    origin: str
    parser: Protego | None = None
    disallow_all: bool = False
    why: str = ""

    def disallowed(self, url: str, tokens: Iterable[str]) -> str | None:
        """The reject detail when one of `tokens` may not fetch `url`, else None."""
        if self.disallow_all:
            return f"robots.txt of {self.origin} {self.why}: disallow all (RFC 9309)"
        if self.parser is None:
            return None
        for token in tokens:
            if not self.parser.can_fetch(url, token):
                return f"robots.txt of {self.origin} disallows {_path_of(url)} for {token}"
        return None


def parse_robots(origin: str, body: bytes) -> RobotsRules:
    """Rules from a robots.txt body (UTF-8, invalid bytes replaced; a body cut
    at the size limit loses its last, partial line)."""
    text = body.decode("utf-8", errors="replace").lstrip("\ufeff")
    return RobotsRules(origin, parser=Protego.parse(text))


def robots_from(origin: str, document: Document, limit: int) -> RobotsRules | Unresolved:
    """The verdicts a robots.txt fetch gives (see the module docstring)."""
    if document.too_many_redirects:
        return RobotsRules(origin, why=f"took more than {MAX_ROBOTS_REDIRECTS} redirects")
    settled = _unsettled(document)
    if settled is not None:
        return settled
    if document.failure is not None:
        reason, detail = document.failure
        return RobotsRules(origin, disallow_all=True, why=f"unreachable at {document.url} ({reason}: {detail})")
    status = document.status
    assert status is not None
    if 200 <= status < 300:
        body = document.body
        if len(body) > limit:
            body = body[:limit]
            body = body[: body.rfind(b"\n") + 1]
        return parse_robots(origin, body)
    if status >= 500:
        return RobotsRules(origin, disallow_all=True, why=f"answered HTTP {status}")
    return RobotsRules(origin, why=f"answered HTTP {status}")


def _unsettled(document: Document) -> Unresolved | None:
    if document.status == 429:
        return Unresolved("http_error", f"{document.url}: HTTP 429", False, document.retry_after_s, 429)
    if document.failure is not None and document.on_origin_host:
        reason, detail = document.failure
        return Unresolved(reason, f"{document.url}: {detail}", True)
    return None


# -- TDMRep -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TdmRule:
    location: str
    pattern: re.Pattern[str]
    reserved: bool
    policy: str | None


@dataclasses.dataclass(frozen=True)
class TdmRules:
    """A host's tdmrep.json rules, in file order (none: nothing reserved)."""

    origin: str
    rules: tuple[TdmRule, ...] = ()

    def reserved(self, url: str) -> str | None:
        """The reject detail when the first rule matching `url`'s path reserves TDM rights, else None."""
        path = _path_of(url)
        for rule in self.rules:
            if rule.pattern.match(path):
                if not rule.reserved:
                    return None
                policy = f", tdm-policy {rule.policy}" if rule.policy else ""
                return f"tdmrep.json of {self.origin}: location {rule.location!r} reserves {path}{policy}"
        return None


def location_pattern(location: str) -> re.Pattern[str]:
    """robots.txt pattern syntax: `*` any characters, a final `$` the end, else a prefix."""
    anchored = location.endswith("$")
    body = location[:-1] if anchored else location
    regex = ".*".join(re.escape(part) for part in body.split("*"))
    return re.compile(regex + ("$" if anchored else ""), re.DOTALL)


def parse_tdmrep(origin: str, body: bytes) -> TdmRules:
    """Rules from a tdmrep.json body; anything malformed (not JSON, not an
    array, a rule without a string location) is skipped."""
    try:
        data = json.loads(body.decode("utf-8", errors="replace").lstrip("\ufeff"))
    except ValueError:
        return TdmRules(origin)
    if not isinstance(data, list):
        return TdmRules(origin)
    rules = []
    for item in data:
        if not isinstance(item, dict) or not isinstance(item.get("location"), str):
            continue
        location = item["location"] if item["location"].startswith(("/", "*")) else "/" + item["location"]
        policy = item.get("tdm-policy")
        rules.append(
            TdmRule(
                location=location,
                pattern=location_pattern(location),
                reserved=str(item.get("tdm-reservation")).strip() == "1",
                policy=policy if isinstance(policy, str) else None,
            )
        )
    return TdmRules(origin, tuple(rules))


def tdmrep_from(origin: str, document: Document) -> TdmRules | Unresolved:
    settled = _unsettled(document)
    if settled is not None:
        return settled
    if document.failure is None and document.status is not None and 200 <= document.status < 300:
        return parse_tdmrep(origin, document.body)
    return TdmRules(origin)


def header_reservation(headers: Mapping[str, str] | object) -> str | None:
    """The reject detail when a response carries `tdm-reservation: 1`, else None."""
    get = getattr(headers, "get")
    value = get("tdm-reservation")
    if value is None or value.strip() != "1":
        return None
    policy = get("tdm-policy")
    return "tdm-reservation: 1" + (f" (tdm-policy {policy.strip()})" if policy else "")


def _path_of(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


# -- fetching the files -----------------------------------------------------------------


class SiteFileFetching:
    """The part of `stages.core.fetch.Fetcher` that fetches robots.txt and
    tdmrep.json, with the fetcher's own requests: `check_url` on every hop
    (address policy, DNS cache), the per-host slots, pinned keep-alive
    connections, and the requests charged to the fetch call that sent them.
    The Fetcher provides `config`, `check_url`, `connections_for`, `_request`
    and `_release`."""

    config: CrawlConfig

    def _load_opt_out(self, kind: str, target, path: str, call) -> RobotsRules | TdmRules | Unresolved:
        document = self._document(target, path, call)
        if kind == "robots":
            return robots_from(target.origin, document, self.config.max_robots_bytes)
        return tdmrep_from(target.origin, document)

    def _document(self, origin, path: str, call) -> Document:
        """GET `path` on `origin`'s host (robots.txt, tdmrep.json): redirects
        followed up to MAX_ROBOTS_REDIRECTS hops, each checked like any request;
        at most `max_robots_bytes` + 1 bytes read."""
        url = origin.origin + path
        limit = self.config.max_robots_bytes
        for _hop in range(MAX_ROBOTS_REDIRECTS + 1):
            target = self.check_url(url)
            if isinstance(target, Drop):
                on_origin = target.reason in HOST_FAILURE_REASONS and host_of(url) == origin.host
                return Document(url, failure=(target.reason.value, target.detail), on_origin_host=on_origin)
            with HOST_SLOTS.hold(target.host, self.connections_for(target.host)):
                try:
                    conn, response = self._request(target, call)
                except Exception as exc:  # noqa: BLE001 - classified below
                    drop = classify_error(exc)
                    on_origin = drop.reason in HOST_FAILURE_REASONS and target.host == origin.host
                    return Document(url, failure=(drop.reason.value, drop.detail), on_origin_host=on_origin)
                reusable = False
                try:
                    status = response.status
                    location = response.headers.get("Location")
                    if status in REDIRECT_STATUSES and location:
                        reusable = drain(response)
                        url = urllib.parse.urljoin(target.url, location.strip())
                        continue
                    if not 200 <= status < 300:
                        reusable = drain(response)
                        return Document(url, status, retry_after_s=retry_after_of(response))
                    body = response.read(limit + 1)
                    reusable = response.isclosed()
                    return Document(url, status, body)
                except Exception as exc:  # noqa: BLE001 - a body that fails to arrive
                    drop = classify_error(exc)
                    on_origin = drop.reason in HOST_FAILURE_REASONS and target.host == origin.host
                    return Document(url, failure=(drop.reason.value, drop.detail), on_origin_host=on_origin)
                finally:
                    self._release(target, conn, response, reusable)
        return Document(url, too_many_redirects=True)


# -- the per-process cache --------------------------------------------------------------


class OptOutCache(SingleFlightCache):
    """Per-host opt-out files, fetched once per process; see the module docstring."""

    def __init__(self, max_hosts: int = 20_000) -> None:
        super().__init__(max_hosts)
        self.max_hosts = max_hosts

    def get(  # type: ignore[override]
        self, key: tuple, load: Callable[[], object], *, hedge: bool = False, max_loads: int = 1
    ) -> tuple[object, bool]:
        """The value for `key`, calling `load()` if no thread has (or is doing
        so now, unless this call hedges: see SingleFlightCache). Returns
        (value, whether this call loaded it). A value that is an `Unresolved`
        is handed to the callers waiting for it, then dropped."""
        return super().get(
            key,
            load,
            keep=lambda value, error: error is None and not isinstance(value, Unresolved),
            hedge=hedge,
            max_loads=max_loads,
        )

    def __reduce__(self):
        # Verdicts belong to the process: a pickled copy (a Fetcher shipped to
        # a worker) starts empty.
        return (OptOutCache, (self.max_hosts,))


OPT_OUT_CACHE: OptOutCache = OptOutCache()

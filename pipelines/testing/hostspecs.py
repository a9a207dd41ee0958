"""What each host of the many-host test web (`pipelines/testing/manyhosts.py`)
does, what it logs, and the URL lists over it: `HostSpec` and `Throttle`,
`web_specs`, the log format `RequestLog` with `read_log` / `read_logs` /
`peak_in_flight` / `peak_rate`, `url_rows` / `write_url_list` /
`build_url_list`, and `HostState` (what a host answers to each request, and
its log; the server in `manyhosts` only moves bytes). A test or benchmark
reading the logs from another process needs only this module; `manyhosts`
re-exports its public names.

`HostSpec` (one per host, host i listens on 127.0.0.(i+2)):

- `images`: `/images/<n>.jpg` (any n >= 0; any extension, any query) answers a
  JPEG of `ManyHostWeb(image_size=...)` pixels that is distinct for every
  (host, n) and the same on every run (smooth random colour fields,
  `pipelines.testing.images.colour_field_jpegs`). Other paths answer 404.
- `delay_s`: every answer waits this long first (a slow host).
- `throttle`: `Throttle(status, first, retry_after, as_date)`: the host's
  first `first` image requests (None: all of them) answer `status` (429 or
  503) with `Retry-After` of `retry_after` seconds (None: no header), sent as
  an HTTP-date when `as_date` (HTTP-dates have 1 s resolution: the date is
  rounded up to the next whole second).
- `refuse`: nothing listens on the address (the port is bound but not
  listening, so nobody else can take it): connections are refused.
  Nothing is logged, since no request arrives.
- `hang`: the connection is accepted and the request read and logged, but
  never answered (the client times out); `status` is logged as null.
- `robots`, `tdmrep`: `/robots.txt` and `/.well-known/tdmrep.json`: a str is
  served 200 (text/plain, application/json), a `Route` as it says (any
  status, headers such as `Location` for a redirect, a body of any size),
  None answers 404.
- `image_headers`: extra headers on image answers (`{"tdm-reservation": "1"}`,
  `{"X-Robots-Tag": "noai"}`).
- `routes`: any other path -> `Route` (`pipelines.testing.localweb.Route`).

The log (`LOG_DIR/<address>.jsonl`, one `RequestLog` per line, written when
the request line and headers have been read, before any answer):

- `t`: wall-clock time (`time.time()`), `mono`: `time.monotonic()` (one
  clock for every process of the machine on Linux), `path`, `status` (what the
  answer will be; null for a hang), `user_agent`;
- `in_flight`: requests this host was answering at that moment, this one
  included. A request is in flight from its arrival until the server starts
  writing its answer (delays count), so a client that holds a slot until it
  has read the answer always holds it longer than the log counts it; a hung
  request is in flight until the client closes its connection;
- `connections`: TCP connections open to this host at that moment (idle
  keep-alive connections included); `conn`: the serial number of the
  connection it came on (fewer distinct `conn` than requests: keep-alive).
"""

from __future__ import annotations

import dataclasses
import email.utils
import json
import math
import os
import random
import threading
import time
import urllib.parse
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.testing.images import colour_field_jpegs
from pipelines.testing.localweb import Route

if TYPE_CHECKING:
    from pipelines.testing.manyhosts import ManyHostWeb

ROBOTS_PATH = "/robots.txt"
TDMREP_PATH = "/.well-known/tdmrep.json"
IMAGES_PREFIX = "/images/"


@dataclasses.dataclass(frozen=True)
class Throttle:
    """Answer `status` (429 or 503) to a host's first `first` image requests
    (None: to all), with `Retry-After: retry_after` (seconds; None: no header),
    as an HTTP-date when `as_date`."""

    status: int = 429
    first: int | None = None
    retry_after: float | None = None
    as_date: bool = False


@dataclasses.dataclass(frozen=True)
class HostSpec:
    """How one host behaves; see the module docstring."""

    images: bool = True
    delay_s: float = 0.0
    throttle: Throttle | None = None
    refuse: bool = False
    hang: bool = False
    robots: str | Route | None = None
    tdmrep: str | Route | None = None
    image_headers: dict[str, str] = dataclasses.field(default_factory=dict)
    routes: dict[str, Route] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.delay_s < 0:
            raise ValueError(f"delay_s must be >= 0, got {self.delay_s}")
        if self.refuse and self.hang:
            raise ValueError("a host cannot both refuse connections and hang")


@dataclasses.dataclass(frozen=True)
class RequestLog:
    """One request as a host saw it; see the module docstring."""

    host: str
    t: float
    mono: float
    path: str
    status: int | None
    in_flight: int
    connections: int
    conn: int
    user_agent: str | None = None


def read_log(path: str | os.PathLike) -> list[RequestLog]:
    """The requests one host logged, in arrival order ([] if it logged none).
    A last line still being written by the server is skipped."""
    entries = []
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    for line in text.splitlines():
        try:
            entries.append(RequestLog(**json.loads(line)))
        except (json.JSONDecodeError, TypeError):
            continue
    return entries


def read_logs(log_dir: str | os.PathLike) -> dict[str, list[RequestLog]]:
    """Every host's log in `log_dir`, by address (hosts that logged nothing have an empty list)."""
    return {p.stem: read_log(p) for p in sorted(Path(log_dir).glob("*.jsonl"))}


def peak_in_flight(entries: Iterable[RequestLog]) -> int:
    """Most requests one host was answering at once (0 for no requests)."""
    return max((e.in_flight for e in entries), default=0)


def peak_rate(entries: Sequence[RequestLog], window_s: float = 1.0) -> int:
    """Most requests that arrived within any `window_s`-long window [t, t + window_s)."""
    times = sorted(e.mono for e in entries)
    best, start = 0, 0
    for end, t in enumerate(times):
        while times[start] <= t - window_s:
            start += 1
        best = max(best, end - start + 1)
    return best


# -- what a host answers, and its log ---------------------------------------------------


def render_image(seed: int, width: int, height: int) -> bytes:
    """The JPEG a host serves for one image path (about 4 ms of CPU at 768x576;
    `ManyHostWeb.image` keeps each one it has made)."""
    return colour_field_jpegs(1, width, height, seed=seed)[0]


class HostState:
    """One host's server side: its spec, log file and counters, and what it
    answers to each request (`arrive`), logged before the answer."""

    def __init__(self, index: int, address: str, spec: HostSpec, log_path: Path, web: ManyHostWeb) -> None:
        self.index = index
        self.address = address
        self.spec = spec
        self.web = web
        self.lock = threading.Lock()
        self.in_flight = 0
        self.connections = 0
        self.next_conn = 0
        self.image_requests = 0
        self._log = open(log_path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - closed in close()

    def open_connection(self) -> int:
        with self.lock:
            self.connections += 1
            self.next_conn += 1
            return self.next_conn

    def close_connection(self) -> None:
        with self.lock:
            self.connections -= 1

    def arrive(self, path: str, conn: int, user_agent: str | None) -> tuple[int | None, Route]:
        """Decide the answer for `path`, count the request in flight and log it."""
        spec = self.spec
        bare = urllib.parse.urlsplit(path).path
        with self.lock:
            route = self._route(bare)
            if route is None and spec.throttle is not None and bare.startswith(IMAGES_PREFIX):
                self.image_requests += 1
                throttle = spec.throttle
                if throttle.first is None or self.image_requests <= throttle.first:
                    route = _throttled(throttle)
            if route is None:
                route = self._image_route(bare)
            status = None if spec.hang else route.status
            self.in_flight += 1
            entry = RequestLog(
                host=self.address,
                t=time.time(),
                mono=time.monotonic(),
                path=path,
                status=status,
                in_flight=self.in_flight,
                connections=self.connections,
                conn=conn,
                user_agent=user_agent,
            )
            if not self._log.closed:  # a request racing stop()
                self._log.write(json.dumps(dataclasses.asdict(entry)) + "\n")
        return status, route

    def leave(self) -> None:
        with self.lock:
            self.in_flight -= 1

    def _route(self, path: str) -> Route | None:
        spec = self.spec
        if path in spec.routes:
            return spec.routes[path]
        for wanted, value, content_type in (
            (ROBOTS_PATH, spec.robots, "text/plain"),
            (TDMREP_PATH, spec.tdmrep, "application/json"),
        ):
            if path == wanted:
                if value is None:
                    return _not_found()
                if isinstance(value, str):
                    return Route(body=value.encode(), content_type=content_type)
                return value
        return None

    def _image_route(self, path: str) -> Route:
        if not (self.spec.images and path.startswith(IMAGES_PREFIX)):
            return _not_found()
        stem = path[len(IMAGES_PREFIX):].split(".", 1)[0]
        if not stem.isdigit():
            return _not_found()
        return Route(body=self.web.image(self.index, int(stem)), headers=dict(self.spec.image_headers))

    def close(self) -> None:
        with self.lock:
            self._log.close()


def _not_found() -> Route:
    return Route(body=b"not found", status=404, content_type="text/plain")


def _throttled(throttle: Throttle) -> Route:
    headers: dict[str, str | list[str]] = {}
    if throttle.retry_after is not None:
        if throttle.as_date:
            headers["Retry-After"] = email.utils.formatdate(math.ceil(time.time() + throttle.retry_after), usegmt=True)
        else:
            headers["Retry-After"] = f"{throttle.retry_after:g}"
    return Route(body=b"slow down", status=throttle.status, headers=headers, content_type="text/plain")


# -- webs and URL lists -------------------------------------------------------------------


def web_specs(
    hosts: int,
    *,
    refuse: int = 0,
    hang: int = 0,
    slow: int = 0,
    slow_delay_s: float = 2.0,
    throttled: int = 0,
    throttle: Throttle = Throttle(429, first=3, retry_after=1.0),
) -> list[HostSpec]:
    """`hosts` specs: the healthy ones first (so `url_rows`' hot hosts, the
    first of the list, are healthy), then `throttled`, `slow` (each answer
    `slow_delay_s` late), `refuse` and `hang` hosts."""
    unhealthy = refuse + hang + slow + throttled
    if unhealthy > hosts:
        raise ValueError(f"{unhealthy} unhealthy hosts asked for among {hosts}")
    return (
        [HostSpec() for _ in range(hosts - unhealthy)]
        + [HostSpec(throttle=throttle) for _ in range(throttled)]
        + [HostSpec(delay_s=slow_delay_s) for _ in range(slow)]
        + [HostSpec(refuse=True) for _ in range(refuse)]
        + [HostSpec(hang=True) for _ in range(hang)]
    )


# -- URL lists over the web ------------------------------------------------------------


def url_rows(
    web: ManyHostWeb,
    *,
    hot_hosts: int = 3,
    rows_per_hot_host: int = 100,
    small_rows: Sequence[int] = (1, 2),
    hosts: Sequence[int] | None = None,
    seed: int = 0,
) -> list[dict]:
    """Rows (`url`, `caption`) over `hosts` (default: every host of `web`):
    the first `hot_hosts` of them hold `rows_per_hot_host` rows each, every
    other one `small_rows[j % len(small_rows)]` rows (the j-th small host).
    Image numbers are distinct per host, so every URL is distinct; rows are
    shuffled with `seed`, so hot hosts' rows are spread through the list."""
    chosen = list(range(len(web))) if hosts is None else list(hosts)
    rows = []
    for j, index in enumerate(chosen):
        count = rows_per_hot_host if j < hot_hosts else small_rows[(j - hot_hosts) % len(small_rows)]
        for n in range(count):
            caption = f"a smooth blend of colours, picture {n} of site {index}"
            rows.append({"url": web.image_url(index, n), "caption": caption})
    random.Random(seed).shuffle(rows)
    return rows


def write_url_list(rows: Sequence[dict], path: str | os.PathLike) -> Path:
    """Write `rows` as a parquet URL list (columns `url`, `caption`); the file
    appears under its name only when complete."""
    path = Path(path)
    table = pa.table({"url": [r["url"] for r in rows], "caption": [r["caption"] for r in rows]})
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def build_url_list(web: ManyHostWeb, path: str | os.PathLike, **kwargs) -> list[dict]:
    """`write_url_list(url_rows(web, **kwargs), path)`; returns the rows."""
    rows = url_rows(web, **kwargs)
    write_url_list(rows, path)
    return rows

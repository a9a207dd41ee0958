"""A local web of many hosts: one HTTP server per loopback address
(127.0.0.2, 127.0.0.3, ..., at most 254 hosts), all on one port, each its own
host for the crawler (robots.txt, DNS, per-host budgets are per host:port).
Every host logs every request it receives to its own JSON-lines file, so a
test in another process (a Beam worker, a benchmark) can check the per-host
rate and concurrency from the servers' side, not from the crawler's counters.

Linux routes all of 127.0.0.0/8 to the loopback interface, so binding
127.0.0.2+ needs no setup (macOS would need `ifconfig lo0 alias`).

API (stable; tests, the host scheduler's tests and the benchmarks use it):

    from pipelines.testing.manyhosts import HostSpec, ManyHostWeb, Throttle, Route, read_logs, build_url_list

    specs = [HostSpec() for _ in range(50)]                      # healthy hosts serving images
    specs += [HostSpec(refuse=True), HostSpec(hang=True)]        # refused / never answers
    specs += [HostSpec(throttle=Throttle(429, first=3, retry_after=2))]
    specs += [HostSpec(robots="User-agent: *\\nDisallow: /images/\\n")]
    with ManyHostWeb(specs, log_dir=tmp_path / "logs") as web:
        web.url(0, "/images/7.jpg")      # 'http://127.0.0.2:PORT/images/7.jpg'
        web.origin(0), web.address(0)    # 'http://127.0.0.2:PORT', '127.0.0.2'
        rows = build_url_list(web, tmp_path / "urls.parquet", hot_hosts=3, rows_per_hot_host=200)
        ...                              # crawl, in this process or others
        logs = read_logs(web.log_dir)    # {'127.0.0.2': [RequestLog, ...], ...}; readable from any process

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

Servers speak HTTP/1.1 with keep-alive (an idle connection is closed after
`keepalive_timeout_s`). `peak_rate(entries, window_s)` and `peak_in_flight`
summarise a host's log; `build_url_list` writes a parquet URL list (columns
`url`, `caption`) in which `hot_hosts` hosts hold most rows and every other
host one or two; `web_specs(60, refuse=6, hang=6)` makes a web with some hosts
dead. `python -m pipelines.testing.manyhosts --hosts 60 --refuse 6 --log-dir D
--urls urls.parquet` serves one in its own process (it prints its port as a
JSON line and serves until SIGTERM).
"""

from __future__ import annotations

import dataclasses
import email.utils
import errno
import functools
import http.server
import json
import logging
import math
import os
import random
import selectors
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.testing.images import colour_field_jpegs
from pipelines.testing.localweb import Route

__all__ = [
    "HostSpec",
    "ManyHostWeb",
    "RequestLog",
    "Route",
    "Throttle",
    "build_url_list",
    "peak_in_flight",
    "peak_rate",
    "read_log",
    "read_logs",
    "url_rows",
    "web_specs",
    "write_url_list",
]

logger = logging.getLogger(__name__)

MAX_HOSTS = 254  # 127.0.0.2 ... 127.0.0.255
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


@functools.lru_cache(maxsize=4096)
def _image(seed: int, width: int, height: int) -> bytes:
    return colour_field_jpegs(1, width, height, seed=seed)[0]


class _HostState:
    """One host's server side: its spec, log file and counters."""

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
        width, height = self.web.image_size
        seed = self.web.seed * 1_000_003 + self.index * 100_003 + int(stem)
        return Route(body=_image(seed, width, height), headers=dict(self.spec.image_headers))

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


class _Handler(http.server.BaseHTTPRequestHandler):
    """Answers one connection's requests (HTTP/1.1 keep-alive) for one host."""

    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: without TCP_NODELAY the body of a
    # keep-alive answer waits for the client's delayed ACK (~40 ms on Linux).
    disable_nagle_algorithm = True
    host_state: _HostState
    conn: int

    def __init__(self, request, client_address, host_state: _HostState, conn: int) -> None:
        self.host_state = host_state
        self.conn = conn
        self.timeout = host_state.web.keepalive_timeout_s
        super().__init__(request, client_address, None)  # type: ignore[arg-type] - no socketserver behind it

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        state = self.host_state
        stopping = state.web._stopping
        status, route = state.arrive(self.path, self.conn, self.headers.get("User-Agent"))
        try:
            delay = state.spec.delay_s + route.delay_s
            if delay > 0:
                stopping.wait(delay)
            if status is None:  # hang: never answer; in flight until the client gives up
                self.close_connection = True
                self._wait_for_client_to_leave()
                return
        finally:
            # Out of flight before the first byte of the answer goes out: a
            # client that holds a slot until it has read the answer holds it
            # longer than the server counts it, so the log never over-counts.
            state.leave()
        self._answer(route)

    def _wait_for_client_to_leave(self) -> None:
        """Block until the client closes the connection (or `stop()` shuts it down)."""
        try:
            self.connection.settimeout(None)
            while self.connection.recv(65536):
                pass
        except OSError:
            pass

    def _answer(self, route: Route) -> None:
        try:
            self.send_response(route.status)
            if route.content_type is not None:
                self.send_header("Content-Type", route.content_type)
            if not any(k.lower() == "content-length" for k in route.headers):
                self.send_header("Content-Length", str(len(route.body)))
            for name, values in route.headers.items():
                for value in [values] if isinstance(values, str) else values:
                    self.send_header(name, value)
            self.end_headers()
            self.wfile.write(route.body)
            self.wfile.flush()
        except OSError:
            # The client gave up (a timeout or a size limit): nothing to answer.
            self.close_connection = True

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - overrides the base signature
        logger.debug("%s %s", self.host_state.address, format % args)


class ManyHostWeb:
    """Serves `specs[i]` on 127.0.0.(i+2):`port`, logging to `log_dir`.

    Args:
        specs: One `HostSpec` per host (at most 254).
        log_dir: Where each host's `<address>.jsonl` goes (created; existing
            logs of the same addresses are appended to).
        port: The port every host listens on; 0 picks a free one.
        image_size: (width, height) of the served images.
        seed: Varies the images between webs.
        keepalive_timeout_s: An idle connection is closed after this long.
        tls: A server-side `ssl.SSLContext`: every host speaks HTTPS with it
            (the TLS handshake happens on the connection's own thread).

    Use as a context manager, or `start()` / `stop()`. One thread accepts for
    every host; each connection is answered on its own daemon thread.
    """

    def __init__(
        self,
        specs: Sequence[HostSpec],
        log_dir: str | os.PathLike,
        *,
        port: int = 0,
        image_size: tuple[int, int] = (640, 512),
        seed: int = 0,
        keepalive_timeout_s: float = 5.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        if not 1 <= len(specs) <= MAX_HOSTS:
            raise ValueError(f"between 1 and {MAX_HOSTS} hosts, got {len(specs)}")
        self.specs = list(specs)
        self.log_dir = Path(log_dir)
        self.image_size = image_size
        self.seed = seed
        self.keepalive_timeout_s = keepalive_timeout_s
        self.tls = tls
        self._wanted_port = port
        self._port: int | None = None
        self._stopping = threading.Event()
        self._hosts: list[_HostState] = []
        self._listeners: list[socket.socket] = []
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None

    # -- addresses -------------------------------------------------------------

    @staticmethod
    def address_of(index: int) -> str:
        return f"127.0.0.{index + 2}"

    def address(self, index: int) -> str:
        """Host `index`'s address, 127.0.0.(index+2)."""
        return self.address_of(index)

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("ManyHostWeb is not running: call start() or use it as a context manager")
        return self._port

    def origin(self, index: int) -> str:
        """`http://127.0.0.(index+2):PORT` (https with `tls`), without a trailing slash."""
        scheme = "http" if self.tls is None else "https"
        return f"{scheme}://{self.address(index)}:{self.port}"

    def url(self, index: int, path: str) -> str:
        return self.origin(index) + (path if path.startswith("/") else "/" + path)

    def image_url(self, index: int, n: int) -> str:
        return self.url(index, f"{IMAGES_PREFIX}{n}.jpg")

    def log_path(self, index: int) -> Path:
        return self.log_dir / f"{self.address(index)}.jsonl"

    def log(self, index: int) -> list[RequestLog]:
        """Host `index`'s requests so far."""
        return read_log(self.log_path(index))

    def __len__(self) -> int:
        return len(self.specs)

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> ManyHostWeb:
        if self._thread is not None:
            raise RuntimeError("ManyHostWeb is already running")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._bind()
        self._stopping.clear()
        self._hosts = [
            _HostState(i, self.address(i), spec, self.log_path(i), self) for i, spec in enumerate(self.specs)
        ]
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._accept_loop, name="ManyHostWeb", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, wake every waiting answer and close every connection. Idempotent."""
        if self._thread is None:
            return
        self._stopping.set()
        assert self._wake_w is not None and self._wake_r is not None
        self._wake_w.send(b"x")
        self._thread.join()
        self._thread = None
        for sock in self._listeners:
            sock.close()
        self._listeners = []
        with self._lock:
            connections = list(self._connections)
        for sock in connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._wake_r.close()
        self._wake_w.close()
        for host in self._hosts:
            host.close()
        self._port = None

    def __enter__(self) -> ManyHostWeb:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _bind(self) -> None:
        """Bind every address on one port (listening unless the host refuses);
        with port 0, retry with other ports when one is taken on some address."""
        for _ in range(20):
            port = self._wanted_port or _free_port(self.address(0))
            sockets: list[socket.socket] = []
            try:
                for i, spec in enumerate(self.specs):
                    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    sockets.append(sock)
                    sock.bind((self.address(i), port))
                    if not spec.refuse:
                        sock.listen(1024)
                        sock.setblocking(False)
            except OSError as exc:
                for sock in sockets:
                    sock.close()
                if exc.errno != errno.EADDRINUSE or self._wanted_port:
                    raise
                continue
            self._listeners, self._port = sockets, port
            return
        raise OSError(errno.EADDRINUSE, "no port free on every address")

    def _accept_loop(self) -> None:
        assert self._wake_r is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self._wake_r, selectors.EVENT_READ, None)
            for host, sock in zip(self._hosts, self._listeners, strict=True):
                if not host.spec.refuse:
                    selector.register(sock, selectors.EVENT_READ, host)
            while not self._stopping.is_set():
                for key, _ in selector.select():
                    host = key.data
                    if host is None:
                        continue
                    try:
                        conn, peer = key.fileobj.accept()  # type: ignore[union-attr]
                    except (BlockingIOError, InterruptedError):
                        continue
                    conn.setblocking(True)
                    threading.Thread(
                        target=self._serve_connection, args=(host, conn, peer), name=f"ManyHostWeb-{host.address}",
                        daemon=True,
                    ).start()

    def _serve_connection(self, host: _HostState, conn: socket.socket, peer) -> None:
        serial = host.open_connection()
        with self._lock:
            self._connections.add(conn)
        try:
            if self.tls is not None:
                conn.settimeout(self.keepalive_timeout_s)
                wrapped = self.tls.wrap_socket(conn, server_side=True)  # detaches `conn`
                with self._lock:
                    self._connections.discard(conn)
                    self._connections.add(wrapped)
                conn = wrapped
            _Handler(conn, peer, host, serial)
        except OSError:  # ssl.SSLError included: a client that gave up, or refused our certificate
            pass
        finally:
            with self._lock:
                self._connections.discard(conn)
            host.close_connection()
            try:
                conn.close()
            except OSError:
                pass


def _free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


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


# -- a ready-made web, and the command line ------------------------------------------------


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


def main(argv: Sequence[str] | None = None) -> int:
    """Serve a web of `web_specs` in this process until SIGTERM or Ctrl-C, for
    benchmarks that want the servers apart from the crawler. Prints one JSON
    line: the port, the first and last address, the log folder, the URL list."""
    import argparse
    import signal
    import sys

    parser = argparse.ArgumentParser(prog="python -m pipelines.testing.manyhosts", description=main.__doc__)
    parser.add_argument("--hosts", type=int, default=60)
    parser.add_argument("--refuse", type=int, default=0)
    parser.add_argument("--hang", type=int, default=0)
    parser.add_argument("--slow", type=int, default=0)
    parser.add_argument("--slow-delay-s", type=float, default=2.0)
    parser.add_argument("--throttled", type=int, default=0)
    parser.add_argument("--log-dir", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--image-size", default="640x512", help="WIDTHxHEIGHT of the served images")
    parser.add_argument("--urls", help="also write a URL list (parquet) here")
    parser.add_argument("--hot-hosts", type=int, default=3)
    parser.add_argument("--rows-per-hot-host", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    width, _, height = args.image_size.partition("x")
    specs = web_specs(
        args.hosts, refuse=args.refuse, hang=args.hang, slow=args.slow, slow_delay_s=args.slow_delay_s,
        throttled=args.throttled,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with ManyHostWeb(specs, args.log_dir, port=args.port, image_size=(int(width), int(height)), seed=args.seed) as web:
        if args.urls:
            build_url_list(
                web, args.urls, hot_hosts=args.hot_hosts, rows_per_hot_host=args.rows_per_hot_host, seed=args.seed
            )
        print(json.dumps({
            "port": web.port, "first": web.address(0), "last": web.address(len(web) - 1),
            "log_dir": str(web.log_dir), "urls": args.urls,
        }), flush=True)
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

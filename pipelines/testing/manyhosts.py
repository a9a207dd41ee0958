"""A local web of many hosts: one HTTP server per loopback address
(127.0.0.2, 127.0.0.3, ..., at most 254 hosts), all on one port, each its own
host for the crawler (robots.txt, DNS, per-host budgets are per host:port).
Every host logs every request it receives to its own JSON-lines file, so a
test in another process (a Beam worker, a benchmark) can check the per-host
rate and concurrency from the servers' side, not from the crawler's counters.

Linux routes all of 127.0.0.0/8 to the loopback interface, so binding
127.0.0.2+ needs no setup (macOS would need `ifconfig lo0 alias`).

API (stable; tests, the host scheduler's tests and the benchmarks use it; the
specs, log readers and URL lists live in `pipelines/testing/hostspecs.py`,
which needs no server, and are re-exported here):

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

`HostSpec` (one per host; host i listens on 127.0.0.(i+2)) says what a host
serves and how it misbehaves (throttled with Retry-After, slow, refusing,
hanging, robots.txt / tdmrep.json variants, extra headers, any route), and
`RequestLog` is one line of a host's log (arrival times, path, status, the
requests in flight and connections open at that moment): both are described
in `pipelines/testing/hostspecs.py`.

Servers speak HTTP/1.1 with keep-alive (an idle connection is closed after
`keepalive_timeout_s`), or HTTPS with `ManyHostWeb(tls=server_ssl_context)`.
`peak_rate(entries, window_s)` and `peak_in_flight` summarise a host's log;
`build_url_list` writes a parquet URL list (`url`, `caption`) in which
`hot_hosts` hosts hold most rows and every other host one or two;
`web_specs(60, refuse=6, hang=6)` makes a web with some hosts dead.
`python -m pipelines.testing.manyhosts --hosts 60 --refuse 6 --log-dir D --urls
u.parquet` serves one from its own process (it prints its port as a JSON line
and serves until SIGTERM).
"""

from __future__ import annotations

import errno
import http.server
import json
import logging
import os
import selectors
import socket
import ssl
import threading
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from pipelines.testing.hostspecs import (  # re-exported: the API of the many-host web
    HostSpec, RequestLog, Throttle, build_url_list, peak_in_flight, peak_rate, read_log, read_logs, url_rows,
    web_specs, write_url_list,
)
from pipelines.testing.hostspecs import IMAGES_PREFIX, render_image
from pipelines.testing.hostspecs import HostState as _HostState
from pipelines.testing.localweb import Route

__all__ = ["HostSpec", "ManyHostWeb", "RequestLog", "Route", "Throttle", "build_url_list", "peak_in_flight"]
__all__ += ["peak_rate", "read_log", "read_logs", "url_rows", "web_specs", "write_url_list"]

logger = logging.getLogger(__name__)

MAX_HOSTS = 254  # 127.0.0.2 ... 127.0.0.255


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
        seed: Varies the images between webs. Each image is made on first
            request (or by `prerender`) and kept for the web's lifetime, so a
            benchmark's web renders every image once and its later runs
            measure the crawler, not the renderer.
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
        self._images: dict[tuple[int, int], bytes] = {}

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

    # -- images ----------------------------------------------------------------

    def image(self, index: int, n: int) -> bytes:
        """The JPEG host `index` serves as image `n` (`image_url(index, n)`)."""
        image = self._images.get((index, n))
        if image is None:
            width, height = self.image_size
            image = render_image(self.seed * 1_000_003 + index * 100_003 + n, width, height)
            self._images[(index, n)] = image  # a race renders it twice, with the same bytes
        return image

    def prerender(self, counts: Sequence[int]) -> None:
        """Make images 0 .. counts[i]-1 of every host i now, before anything is timed."""
        for index, count in enumerate(counts):
            for n in range(count):
                self.image(index, n)

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


# -- the command line ---------------------------------------------------------------------


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
    parser.add_argument("--prerender", default="", help="comma-separated image counts, one per host from the first: "
                        "render those images before serving (a benchmark's web then times no rendering)")
    args = parser.parse_args(argv)
    width, _, height = args.image_size.partition("x")
    specs = web_specs(
        args.hosts, refuse=args.refuse, hang=args.hang, slow=args.slow, slow_delay_s=args.slow_delay_s,
        throttled=args.throttled,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with ManyHostWeb(specs, args.log_dir, port=args.port, image_size=(int(width), int(height)), seed=args.seed) as web:
        web.prerender([int(count) for count in args.prerender.split(",") if count])
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

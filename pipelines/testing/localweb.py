"""A small in-memory web server on 127.0.0.1 that stands in for the web.

Tests, benchmarks and `make demo` register routes (image bytes, error statuses,
redirects, slow or flaky responses) and point the crawler at `base_url`. The
server counts every request it receives, per path and in total, and the most
requests it was answering at once, so a test can assert that a refused URL sent
no request and that a per-host concurrency bound held.

    with LocalWeb() as web:
        web.add("/a.jpg", jpeg_bytes)
        web.add_redirect("/old.jpg", "/a.jpg")
        fetch(web.url("/old.jpg"))
        assert web.requests_to("/a.jpg") == 1

It only listens on the loopback interface, on a port the OS picks.
"""

from __future__ import annotations

import collections
import dataclasses
import http.server
import logging
import threading
import urllib.parse
from types import TracebackType

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Route:
    """What the server answers on one path."""

    body: bytes
    status: int = 200
    headers: dict[str, str | list[str]] = dataclasses.field(default_factory=dict)
    content_type: str | None = "image/jpeg"
    delay_s: float = 0.0
    fail_times: int = 0
    content_length: bool = True


@dataclasses.dataclass(frozen=True)
class ReceivedRequest:
    """One request as the server saw it: its path and headers."""

    path: str
    headers: dict[str, str]


class _Server(http.server.ThreadingHTTPServer):
    # The default backlog of 5 makes a burst of concurrent fetches time out
    # in connect(); a crawler under test opens dozens at once.
    request_queue_size = 1024
    daemon_threads = True
    allow_reuse_address = True

    web: LocalWeb


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    # HTTP/1.0: one request per connection, and a body without Content-Length
    # is delimited by closing the connection.
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.server.web._serve(self)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - overrides the base signature
        logger.debug("%s %s", self.address_string(), format % args)


class LocalWeb:
    """HTTP server on 127.0.0.1 answering from routes registered in memory.

    Unknown paths answer 404. Routes may be added or replaced while the server
    runs. Thread-safe. Use as a context manager, or call `start()` / `stop()`.

    Args:
        log_limit: How many of the most recent requests `received` keeps
            (path and headers); counts are kept for every request regardless.
    """

    def __init__(self, log_limit: int = 1000) -> None:
        self._routes: dict[str, Route] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._total = 0
        self._per_path: collections.Counter[str] = collections.Counter()
        self._in_flight = 0
        self._max_in_flight = 0
        self._received: collections.deque[ReceivedRequest] = collections.deque(maxlen=log_limit)

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> LocalWeb:
        if self._server is not None:
            raise RuntimeError("LocalWeb is already running")
        self._stopping.clear()
        server = _Server(("127.0.0.1", 0), _Handler)
        server.web = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="LocalWeb", daemon=True
        )
        self._thread.start()
        logger.debug("LocalWeb serving on %s", self.base_url)
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket. Idempotent. Requests
        still sleeping in `delay_s` are woken and answered at once."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> LocalWeb:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("LocalWeb is not running: call start() or use it as a context manager")
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        """`http://127.0.0.1:PORT`, without a trailing slash."""
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        """Absolute URL of `path` on this server."""
        return self.base_url + _normalise_path(path)

    # -- routes ----------------------------------------------------------------

    def add(
        self,
        path: str,
        body: bytes,
        status: int = 200,
        headers: dict[str, str | list[str]] | None = None,
        content_type: str | None = "image/jpeg",
        delay_s: float = 0.0,
        *,
        fail_times: int = 0,
        content_length: bool = True,
    ) -> None:
        """Answer GET `path` with `body`.

        Args:
            path: Path, optionally with a query string; a request matches the
                route with its exact path and query first, then its path alone.
            body: Response body.
            status: HTTP status code.
            headers: Extra response headers; a list value sends the header once
                per item. A `Content-Length` given here is sent as is (it may
                lie) instead of the real length.
            content_type: `Content-Type` header; None sends none.
            delay_s: Seconds to wait before answering (to provoke timeouts); 0 answers at once.
            fail_times: The first this many requests to the path get their
                connection closed without any response (a transient failure);
                0 never fails.
            content_length: False omits `Content-Length`; the body then ends
                when the server closes the connection.
        """
        if fail_times < 0 or delay_s < 0:
            raise ValueError(f"fail_times and delay_s must be >= 0, got {fail_times} and {delay_s}")
        route = Route(
            body=body,
            status=status,
            headers=dict(headers or {}),
            content_type=content_type,
            delay_s=delay_s,
            fail_times=fail_times,
            content_length=content_length,
        )
        with self._lock:
            self._routes[_normalise_path(path)] = route

    def add_redirect(self, path: str, location: str, status: int = 302) -> None:
        """Answer GET `path` with a redirect to `location` (absolute or relative)."""
        self.add(path, b"", status=status, headers={"Location": location}, content_type=None)

    # -- what the server saw ---------------------------------------------------

    @property
    def request_count(self) -> int:
        """Requests received on any path, known or not."""
        with self._lock:
            return self._total

    def requests_to(self, path: str) -> int:
        """Requests received whose path (with query, if any) was `path`."""
        with self._lock:
            return self._per_path[_normalise_path(path)]

    @property
    def max_concurrent(self) -> int:
        """Most requests in flight at once since the start or the last
        `reset_counts()`. A request is in flight from the moment its request
        line and headers are read until the server starts writing the answer,
        so a client that holds a slot until it has read the answer always holds
        it for longer than the server counts it."""
        with self._lock:
            return self._max_in_flight

    @property
    def received(self) -> list[ReceivedRequest]:
        """The most recent requests (up to `log_limit`), oldest first."""
        with self._lock:
            return list(self._received)

    def reset_counts(self) -> None:
        with self._lock:
            self._total = 0
            self._per_path.clear()
            self._max_in_flight = self._in_flight
            self._received.clear()

    # -- serving ---------------------------------------------------------------

    def _serve(self, handler: _Handler) -> None:
        path = handler.path
        with self._lock:
            self._total += 1
            self._per_path[path] += 1
            self._received.append(ReceivedRequest(path, dict(handler.headers.items())))
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
            route = self._routes.get(path) or self._routes.get(urllib.parse.urlsplit(path).path)
            fail = route is not None and route.fail_times > 0
            if fail:
                route.fail_times -= 1
        try:
            if route is not None and route.delay_s > 0:
                self._stopping.wait(route.delay_s)
        finally:
            with self._lock:
                self._in_flight -= 1

        if fail:
            # Close without a status line: the client sees the connection drop.
            handler.close_connection = True
            return
        if route is None:
            route = Route(body=b"not found", status=404, content_type="text/plain")
        try:
            handler.send_response(route.status)
            if route.content_type is not None:
                handler.send_header("Content-Type", route.content_type)
            if route.content_length and not any(k.lower() == "content-length" for k in route.headers):
                handler.send_header("Content-Length", str(len(route.body)))
            for name, values in route.headers.items():
                for value in [values] if isinstance(values, str) else values:
                    handler.send_header(name, value)
            handler.end_headers()
            handler.wfile.write(route.body)
        except (BrokenPipeError, ConnectionResetError):
            # The client gave up (a timeout or a size limit): nothing to answer.
            handler.close_connection = True


def _normalise_path(path: str) -> str:
    return path if path.startswith("/") else "/" + path

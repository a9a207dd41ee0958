"""LocalWeb, checked with plain http.client/urllib (not with the crawler it serves)."""

from __future__ import annotations

import concurrent.futures
import http.client
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from pipelines.testing.localweb import LocalWeb


def get(web: LocalWeb, path: str, timeout: float = 5.0) -> tuple[int, http.client.HTTPMessage, bytes]:
    """GET without following redirects."""
    conn = http.client.HTTPConnection("127.0.0.1", web.port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


@pytest.fixture
def web():
    with LocalWeb() as server:
        yield server


def test_serves_registered_routes_and_404_otherwise(web):
    web.add("/a.jpg", b"jpeg bytes")
    web.add("b.png", b"png", status=201, headers={"X-Robots-Tag": "noai"}, content_type="image/png")

    status, headers, body = get(web, "/a.jpg")
    assert (status, body, headers["Content-Type"], headers["Content-Length"]) == (200, b"jpeg bytes", "image/jpeg", "10")

    status, headers, body = get(web, "/b.png")
    assert (status, body, headers["Content-Type"], headers["X-Robots-Tag"]) == (201, b"png", "image/png", "noai")

    status, _, _ = get(web, "/missing")
    assert status == 404

    assert web.base_url == f"http://127.0.0.1:{web.port}"
    assert web.url("a.jpg") == web.base_url + "/a.jpg"
    with urllib.request.urlopen(web.url("/a.jpg"), timeout=5) as response:
        assert response.read() == b"jpeg bytes"


def test_counts_requests_per_path_and_records_headers(web):
    web.add("/a.jpg", b"a")
    web.add("/q?x=1", b"exact query")
    assert web.request_count == 0
    get(web, "/a.jpg")
    get(web, "/a.jpg?size=large")  # falls back to the route without the query
    get(web, "/q?x=1")
    get(web, "/nothing-here")
    assert web.request_count == 4
    assert web.requests_to("/a.jpg") == 1
    assert web.requests_to("/a.jpg?size=large") == 1
    assert web.requests_to("/nothing-here") == 1
    assert get(web, "/a.jpg?size=large")[2] == b"a"
    assert get(web, "/q?x=1")[2] == b"exact query"
    assert [r.path for r in web.received][:2] == ["/a.jpg", "/a.jpg?size=large"]
    assert web.received[0].headers["Host"] == f"127.0.0.1:{web.port}"

    web.reset_counts()
    assert (web.request_count, web.requests_to("/a.jpg"), web.received) == (0, 0, [])


def test_redirect_route(web):
    web.add_redirect("/old", "/new")
    web.add_redirect("/moved", "http://example.invalid/x", status=301)
    status, headers, _ = get(web, "/old")
    assert (status, headers["Location"]) == (302, "/new")
    status, headers, _ = get(web, "/moved")
    assert (status, headers["Location"]) == (301, "http://example.invalid/x")


def test_repeated_header_values_and_lying_or_missing_content_length(web):
    web.add("/twice", b"x", headers={"X-Robots-Tag": ["otherbot: noai", "noindex"]})
    web.add("/lies", b"short", headers={"Content-Length": "1000000"})
    web.add("/no-length", b"until close", content_length=False)

    _, headers, _ = get(web, "/twice")
    assert headers.get_all("X-Robots-Tag") == ["otherbot: noai", "noindex"]

    conn = http.client.HTTPConnection("127.0.0.1", web.port, timeout=5)
    conn.request("GET", "/lies")
    response = conn.getresponse()
    assert response.headers["Content-Length"] == "1000000"
    with pytest.raises(http.client.IncompleteRead):
        response.read()
    conn.close()

    _, headers, body = get(web, "/no-length")
    assert headers["Content-Length"] is None
    assert body == b"until close"


def test_fail_times_drops_the_connection_then_recovers(web):
    web.add("/flaky", b"ok", fail_times=2)
    for _ in range(2):
        with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
            get(web, "/flaky")
    status, _, body = get(web, "/flaky")
    assert (status, body) == (200, b"ok")
    assert web.requests_to("/flaky") == 3


def test_delay_provokes_a_client_timeout(web):
    web.add("/slow", b"late", delay_s=2.0)
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        get(web, "/slow", timeout=0.2)
    assert time.monotonic() - start < 1.5


def test_max_concurrent_tracks_requests_in_flight(web):
    web.add("/slow", b"x", delay_s=0.3)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(lambda _: get(web, "/slow")[0], range(4)))
    assert statuses == [200] * 4
    assert web.max_concurrent == 4

    web.reset_counts()
    for _ in range(3):
        get(web, "/slow")
    assert web.max_concurrent == 1


def test_a_burst_of_concurrent_connections_is_not_refused(web):
    # The default listen backlog of 5 makes such a burst fail or stall.
    web.add("/a", b"a", delay_s=0.05)
    n = 200
    barrier = threading.Barrier(n)

    def fetch(_):
        barrier.wait()
        return get(web, "/a", timeout=10)[2]

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        bodies = list(pool.map(fetch, range(n)))
    assert bodies == [b"a"] * n
    assert web.request_count == n


def test_stops_cleanly_also_on_exception_and_is_idempotent():
    with pytest.raises(RuntimeError, match="boom"):
        with LocalWeb() as web:
            web.add("/a", b"a")
            port = web.port
            assert get(web, "/a")[2] == b"a"
            raise RuntimeError("boom")
    assert not web.running
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    web.stop()  # again: no error
    with pytest.raises(RuntimeError, match="not running"):
        web.base_url


def test_stop_wakes_delayed_requests():
    web = LocalWeb().start()
    web.add("/slow", b"x", delay_s=30)
    results = []
    client = threading.Thread(target=lambda: results.append(get(web, "/slow", timeout=10)[0]))
    client.start()
    while web.request_count == 0:
        time.sleep(0.01)
    start = time.monotonic()
    web.stop()
    client.join(timeout=10)
    assert not client.is_alive()
    assert time.monotonic() - start < 5
    assert results == [200]


def test_restart_after_stop_gets_a_working_server():
    web = LocalWeb()
    with web:
        web.add("/a", b"a")
    with web:
        assert get(web, "/a")[2] == b"a"


def test_quiet_no_per_request_output(web, capfd):
    web.add("/a", b"a")
    get(web, "/a")
    get(web, "/missing")
    out, err = capfd.readouterr()
    assert out == ""
    assert "GET /a" not in err and "GET /missing" not in err


def test_rejects_negative_options(web):
    with pytest.raises(ValueError):
        web.add("/a", b"", fail_times=-1)
    with pytest.raises(ValueError):
        web.add("/a", b"", delay_s=-0.1)


def test_urllib_sees_http_errors(web):
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(web.url("/missing"), timeout=5)
    assert info.value.code == 404
    info.value.close()

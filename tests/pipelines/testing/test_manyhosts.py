"""pipelines.testing.manyhosts: the many-loopback-host test web, checked with
plain http.client (not the crawler under test), and its logs read back as
another process would read them (from the files)."""

from __future__ import annotations

import concurrent.futures
import email.utils
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.testing.manyhosts import (
    HostSpec,
    ManyHostWeb,
    Route,
    Throttle,
    build_url_list,
    peak_in_flight,
    peak_rate,
    read_logs,
    web_specs,
)

REPO = str(Path(__file__).resolve().parents[3])


def get(web: ManyHostWeb, index: int, path: str, timeout: float = 5.0, conn: http.client.HTTPConnection | None = None):
    own = conn is None
    conn = conn or http.client.HTTPConnection(web.address(index), web.port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        if own:
            conn.close()


def test_each_address_is_its_own_host_serving_distinct_images(tmp_path):
    with ManyHostWeb([HostSpec()] * 3, tmp_path / "logs", image_size=(64, 48)) as web:
        bodies = {(i, n): get(web, i, f"/images/{n}.jpg")[2] for i in range(3) for n in range(2)}
        assert get(web, 0, "/images/x.jpg")[0] == 404
        assert get(web, 0, "/other")[0] == 404
        assert web.url(2, "/a") == f"http://127.0.0.4:{web.port}/a"
    assert len(set(bodies.values())) == 6
    assert Image.open(io.BytesIO(bodies[0, 0])).size == (64, 48)
    logs = read_logs(tmp_path / "logs")
    assert sorted(logs) == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    assert [e.path for e in logs["127.0.0.2"]] == ["/images/0.jpg", "/images/1.jpg", "/images/x.jpg", "/other"]
    assert [e.status for e in logs["127.0.0.2"]] == [200, 200, 404, 404]
    assert [len(v) for v in logs.values()] == [4, 2, 2]


def test_keep_alive_and_the_connection_count(tmp_path):
    with ManyHostWeb([HostSpec()], tmp_path, image_size=(16, 16)) as web:
        conn = http.client.HTTPConnection(web.address(0), web.port, timeout=5)
        for n in range(3):
            assert get(web, 0, f"/images/{n}.jpg", conn=conn)[0] == 200
        conn.close()
        time.sleep(0.1)  # the server sees the close on its own thread
        get(web, 0, "/images/9.jpg")
        log = web.log(0)
    assert [e.conn for e in log] == [1, 1, 1, 2]
    assert [e.connections for e in log] == [1, 1, 1, 1]


def test_in_flight_counts_concurrent_requests_and_delays(tmp_path):
    with ManyHostWeb([HostSpec(delay_s=0.3)], tmp_path, image_size=(16, 16)) as web:
        start = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            statuses = list(pool.map(lambda n: get(web, 0, f"/images/{n}.jpg")[0], range(4)))
        elapsed = time.monotonic() - start
        log = web.log(0)
    assert statuses == [200] * 4
    assert 0.3 <= elapsed < 2.0
    assert sorted(e.in_flight for e in log) == [1, 2, 3, 4]
    assert peak_in_flight(log) == 4
    assert peak_rate(log, window_s=0.25) == 4


def test_throttle_with_retry_after_in_seconds_and_as_a_date(tmp_path):
    specs = [
        HostSpec(throttle=Throttle(429, first=2, retry_after=3)),
        HostSpec(throttle=Throttle(503, first=1, retry_after=30, as_date=True)),
        HostSpec(throttle=Throttle(503)),  # always, no Retry-After
    ]
    with ManyHostWeb(specs, tmp_path, image_size=(16, 16)) as web:
        first = [get(web, 0, f"/images/{n}.jpg") for n in range(3)]
        dated = get(web, 1, "/images/0.jpg")
        after_date = get(web, 1, "/images/1.jpg")[0]
        always = [get(web, 2, f"/images/{n}.jpg") for n in range(3)]
        robots = get(web, 0, "/robots.txt")[0]  # throttles count image requests only
    assert [r[0] for r in first] == [429, 429, 200]
    assert first[0][1]["Retry-After"] == "3"
    assert dated[0] == 503
    when = email.utils.parsedate_to_datetime(dated[1]["Retry-After"]).timestamp()
    assert 29 <= when - time.time() <= 32
    assert after_date == 200
    assert [r[0] for r in always] == [503] * 3 and all("Retry-After" not in r[1] for r in always)
    assert robots == 404


def test_refused_and_hanging_hosts(tmp_path):
    with ManyHostWeb([HostSpec(refuse=True), HostSpec(hang=True)], tmp_path) as web:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((web.address(0), web.port), timeout=2).close()
        with pytest.raises(TimeoutError):
            get(web, 1, "/images/0.jpg", timeout=0.3)
        time.sleep(0.1)  # the client closed its connection: the hung request is out of flight
        with pytest.raises(TimeoutError):
            get(web, 1, "/images/1.jpg", timeout=0.3)
        for _ in range(50):  # the server logs on its own thread
            if len(web.log(1)) == 2:
                break
            time.sleep(0.01)
        hang_log = web.log(1)
        start = time.monotonic()
    assert time.monotonic() - start < 2.0  # stop() wakes the hanging answer
    assert web.log(0) == []
    assert [(e.path, e.status, e.in_flight) for e in hang_log] == [("/images/0.jpg", None, 1), ("/images/1.jpg", None, 1)]


def test_robots_tdmrep_routes_and_image_headers(tmp_path):
    specs = [
        HostSpec(
            robots="User-agent: *\nDisallow: /\n",
            tdmrep='[{"location": "/", "tdm-reservation": 1}]',
            image_headers={"tdm-reservation": "1"},
            routes={"/page": Route(body=b"hello", content_type="text/html")},
        ),
        HostSpec(robots=Route(body=b"", status=301, headers={"Location": "/elsewhere.txt"}, content_type=None)),
        HostSpec(robots=Route(body=b"oops", status=503, content_type="text/plain")),
    ]
    with ManyHostWeb(specs, tmp_path, image_size=(16, 16)) as web:
        robots = get(web, 0, "/robots.txt")
        tdm = get(web, 0, "/.well-known/tdmrep.json")
        image = get(web, 0, "/images/0.jpg")
        page = get(web, 0, "/page")
        redirect = get(web, 1, "/robots.txt")
        failing = get(web, 2, "/robots.txt")
        missing = get(web, 1, "/.well-known/tdmrep.json")
    assert (robots[0], robots[2], robots[1]["Content-Type"]) == (200, b"User-agent: *\nDisallow: /\n", "text/plain")
    assert (tdm[0], tdm[1]["Content-Type"]) == (200, "application/json")
    assert image[1]["tdm-reservation"] == "1"
    assert page[2] == b"hello"
    assert (redirect[0], redirect[1]["Location"]) == (301, "/elsewhere.txt")
    assert failing[0] == 503 and missing[0] == 404


def test_url_list_has_hot_hosts_and_a_long_tail(tmp_path):
    with ManyHostWeb([HostSpec()] * 10, tmp_path / "logs", image_size=(16, 16)) as web:
        rows = build_url_list(web, tmp_path / "urls.parquet", hot_hosts=2, rows_per_hot_host=20)
        table = pq.read_table(tmp_path / "urls.parquet").to_pylist()
        served = urllib.request.urlopen(rows[0]["url"], timeout=5).status
    assert table == rows
    per_host: dict[str, int] = {}
    for row in rows:
        host = row["url"].split("/")[2]
        per_host[host] = per_host.get(host, 0) + 1
    assert sorted(per_host.values(), reverse=True) == [20, 20, 2, 2, 2, 2, 1, 1, 1, 1]
    assert len({r["url"] for r in rows}) == len(rows) == 2 * 20 + 4 * 2 + 4 * 1
    assert served == 200


def test_web_specs_put_healthy_hosts_first():
    specs = web_specs(10, refuse=2, hang=1, slow=1, throttled=1)
    assert [s == HostSpec() for s in specs] == [True] * 5 + [False] * 5
    assert (specs[5].throttle is not None, specs[6].delay_s > 0, specs[7].refuse, specs[9].hang) == (True,) * 4
    with pytest.raises(ValueError):
        web_specs(2, refuse=3)


def test_serves_from_its_own_process_until_terminated(tmp_path):
    argv = [sys.executable, "-m", "pipelines.testing.manyhosts", "--hosts", "4", "--refuse", "1",
            "--log-dir", str(tmp_path / "logs"), "--image-size", "16x16", "--urls", str(tmp_path / "u.parquet"),
            "--hot-hosts", "1", "--rows-per-hot-host", "5"]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
    try:
        info = json.loads(process.stdout.readline())
        rows = pq.read_table(info["urls"]).to_pylist()
        served = [urllib.request.urlopen(rows[0]["url"], timeout=5).status]
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"http://127.0.0.5:{info['port']}/images/0.jpg", timeout=5)
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0
    assert (info["first"], info["last"], len(rows), served) == ("127.0.0.2", "127.0.0.5", 5 + 1 + 2 + 1, [200])
    assert sum(len(v) for v in read_logs(tmp_path / "logs").values()) == 1

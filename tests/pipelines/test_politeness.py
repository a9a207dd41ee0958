"""Per-host politeness for the whole job, checked from the servers' logs: a
web of 59 loopback hosts (127.0.0.2 ... 127.0.0.60; a few hot hosts hold most
URLs, most hosts one or two), crawled by `beam run curate` on the portable
runner with two external worker processes. No host sees more connections or
requests per second than its budget, a throttled host's Retry-After is
honoured, dead hosts get no request after they are declared down, robots.txt
is obeyed, and every row is accounted for."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from pipelines.cli import main
from pipelines.testing.manyhosts import HostSpec, ManyHostWeb, Throttle, peak_in_flight, peak_rate, read_logs, url_rows, write_url_list
from tests.portable import portable_runner, service_logs

MAX_PER_HOST = 2
MAX_HOST_RATE = 8.0
DOWN_AFTER = 3
RETRY_AFTER_S = 1.5


def _specs() -> list[HostSpec]:
    healthy = [HostSpec() for _ in range(50)]
    return healthy + [
        HostSpec(throttle=Throttle(429, first=2, retry_after=RETRY_AFTER_S)),  # 50
        HostSpec(throttle=Throttle(503, first=1, retry_after=RETRY_AFTER_S, as_date=True)),  # 51
        HostSpec(refuse=True),  # 52
        HostSpec(refuse=True),  # 53
        HostSpec(hang=True),  # 54
        HostSpec(hang=True),  # 55
        HostSpec(robots="User-agent: *\nDisallow: /\n"),  # 56
        HostSpec(robots="User-agent: img2dataset\nDisallow: /images/\n"),  # 57
        HostSpec(),  # 58
    ]


@pytest.mark.portable
def test_per_host_budgets_hold_across_two_workers_from_the_servers_logs(tmp_path):
    with ManyHostWeb(_specs(), log_dir=tmp_path / "logs") as web:
        hosts = [0, 1, 2, *range(50, 59), *range(3, 50)]  # hot hosts first, then the misbehaving ones, then the tail
        rows = url_rows(web, hot_hosts=3, rows_per_hot_host=40, small_rows=(1, 2), hosts=hosts)
        # The throttled, dead and robots hosts get several rows each.
        rows += [
            {"url": web.image_url(i, 100 + n), "caption": f"picture {n} of a troubled site {i}"}
            for i in range(50, 58)
            for n in range(18 if 52 <= i <= 55 else 6)  # under hot_host_rows: one crawl key per dead host
        ]
        urls = write_url_list(rows, tmp_path / "urls.parquet")
        config = {
            "crawl": {
                "max_per_host": MAX_PER_HOST,
                "max_host_rate": MAX_HOST_RATE,
                "host_down_after": DOWN_AFTER,
                "hot_host_rows": 20,  # the three hot hosts are split over sub-keys crawled by both workers
                "host_groups": 8,
                "timeout_s": 1.0,
                "threads": 16,
            },
            "decode": {"min_side": 64},
            "dedup": {"near": False},
            "checkpoint": {"rows": 25},
        }
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
        out = tmp_path / "out"
        with portable_runner(tmp_path / "services", workers=2) as argv:
            code = main(
                ["run", "curate", "--input", str(urls), "--output", str(out), "--config", str(tmp_path / "config.yaml"),
                 "--allow-private-network", "--progress-interval", "0", *argv]
            )
            assert code == 0, service_logs(tmp_path / "services")
            pool_log = (tmp_path / "services" / "worker_pool.log").read_text()
        logs = read_logs(web.log_dir)
        address = {i: web.address(i) for i in range(len(web))}

    # Two worker processes did the work.
    assert pool_log.count("Starting worker with command") >= 2, "the pool started one worker only"

    # Budgets, from what each server saw: connections and requests per second,
    # the hot hosts (crawled under two sub-keys, on two workers) included.
    for i, entries in ((i, logs.get(address[i], [])) for i in range(len(address))):
        assert peak_in_flight(entries) <= MAX_PER_HOST, f"host {address[i]}: {peak_in_flight(entries)} requests at once"
        # Each of a host's sub-keys (at most max_per_host of them) keeps its
        # share of the rate, so a 1 s window holds at most rate + sub-keys requests.
        assert peak_rate(entries, 1.0) <= MAX_HOST_RATE + MAX_PER_HOST, f"host {address[i]}: {peak_rate(entries, 1.0)} requests in 1 s"
    assert all(len(logs[address[i]]) >= 40 for i in (0, 1, 2))

    # Retry-After honoured: after a throttled answer, the host's next request waits for it.
    for i in (50, 51):
        entries = sorted(logs[address[i]], key=lambda e: e.mono)
        for before, after in zip(entries, entries[1:]):
            if before.status in (429, 503):
                assert after.mono - before.mono >= RETRY_AFTER_S - 0.05, (
                    f"host {address[i]} asked again too soon: {[(round(e.mono, 3), e.path, e.status) for e in entries]}"
                )

    # Dead hosts: a hanging host, which never answers, is sent at most
    # down_after requests in all, however many connections its budget allows.
    for i in (54, 55):
        assert len(logs.get(address[i], [])) <= DOWN_AFTER

    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    index = pq.read_table(out / "index.parquet").to_pylist()
    by_host = collections.defaultdict(collections.Counter)
    for r in rejects:
        by_host[r["url"].split("//", 1)[1].split(":", 1)[0]][r["reason"]] += 1
    rows_of = collections.Counter(r["url"].split("//", 1)[1].split(":", 1)[0] for r in rows)
    for i in (52, 53, 54, 55):
        # Only the rows whose own request failed (down_after, plus those in
        # flight then) keep that failure; a row that waited on another row's
        # failed request is queued again, and every row left is answered
        # host_unreachable without a request.
        reasons = by_host[address[i]]
        assert sum(reasons.values()) == rows_of[address[i]]
        assert reasons["host_unreachable"] >= rows_of[address[i]] - DOWN_AFTER - (MAX_PER_HOST - 1), reasons
        assert set(reasons) <= {"host_unreachable", "connection_error", "timeout"}, reasons
    assert by_host[address[56]] == {"robots_disallowed": rows_of[address[56]]}
    assert by_host[address[57]] == {"robots_disallowed": rows_of[address[57]]}
    # The report counts the rows and the hosts each opt-out removed.
    report = json.loads((out / "report.json").read_text())
    robots_rows = rows_of[address[56]] + rows_of[address[57]]
    assert report["opt_outs"] == [{"reason": "robots_disallowed", "rows": robots_rows, "hosts": 2}]
    # Robots only ever asked once per host and worker process (two processes).
    assert sum(e.path == "/robots.txt" for e in logs[address[56]]) <= 2
    # Every row accounted for.
    assert len(index) + len(rejects) == len(rows)
    kept_hosts = {r["url"].split("//", 1)[1].split(":", 1)[0] for r in index}
    assert {address[i] for i in (0, 1, 2, 50, 51, 58)} <= kept_hosts

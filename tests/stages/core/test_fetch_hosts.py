"""stages.core.fetch, one host at a time: what the host scheduler reads off a
FetchResult (Retry-After, host failures, requests sent), keep-alive, the DNS
cache and the per-process bound on concurrent requests. Against LocalWeb
(127.0.0.1) and ManyHostWeb (127.0.0.2+, whose own logs say what each host saw)."""

from __future__ import annotations

import concurrent.futures
import email.utils
import socket
import ssl
import threading
import time

import pytest

from pipelines.testing.manyhosts import HostSpec, ManyHostWeb, Route, Throttle, peak_in_flight
from schemas import HostBudget, RejectReason
from stages.core import connections
from stages.core.connections import HOST_SLOTS, DnsCache, HostSlots
from stages.core.fetch import Fetcher, parse_retry_after
from stages.core.robots import OptOutCache
from tests.stages.crawl_helpers import LOCAL, loopback_is_public

pytestmark = pytest.mark.usefixtures("loopback_only")

PLAIN = LOCAL.model_copy(update={"robots_txt": False, "tdmrep": False})


def many(tmp_path, *specs: HostSpec, **kwargs) -> ManyHostWeb:
    return ManyHostWeb(list(specs), tmp_path / "logs", image_size=(16, 16), **kwargs)


# -- Retry-After -----------------------------------------------------------------------

NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        (" 0 ", 0.0),
        ("1.5", 1.5),
        ("-5", 0.0),
        (email.utils.formatdate(NOW + 90, usegmt=True), 90.0),  # IMF-fixdate
        (email.utils.formatdate(NOW - 90, usegmt=True), 0.0),  # in the past
        (time.strftime("%A, %d-%b-%y %H:%M:%S GMT", time.gmtime(NOW + 30)), 30.0),  # RFC 850
        (time.strftime("%a %b %d %H:%M:%S %Y", time.gmtime(NOW + 45)), 45.0),  # asctime, no zone: UTC
        ("soon", None),
        ("", None),
        (None, None),
        ("inf", None),
        ("nan", None),
        ("Mon, 99 Foo 2024 99:99:99 GMT", None),
    ],
)
def test_parse_retry_after(value, seconds):
    assert parse_retry_after(value, now=NOW) == seconds


def test_429_and_503_carry_their_retry_after(tmp_path):
    specs = [
        HostSpec(throttle=Throttle(429, first=1, retry_after=7)),
        HostSpec(throttle=Throttle(503, first=1, retry_after=30, as_date=True)),
        HostSpec(throttle=Throttle(503, first=1)),
        HostSpec(throttle=Throttle(429, first=1, retry_after=5),
                 routes={"/gone": Route(b"", status=404, headers={"Retry-After": "5"})}),
    ]
    with many(tmp_path, *specs) as web:
        fetcher = Fetcher(PLAIN)
        throttled = fetcher.fetch(web.image_url(0, 0))
        then_ok = fetcher.fetch(web.image_url(0, 1))
        dated = fetcher.fetch(web.image_url(1, 0))
        bare = fetcher.fetch(web.image_url(2, 0))
        not_found = fetcher.fetch(web.url(3, "/gone"))
    assert (throttled.drop.reason, throttled.http_status, throttled.retry_after_s) == (RejectReason.HTTP_ERROR, 429, 7.0)
    assert not throttled.host_failure and throttled.requests == 1
    assert then_ok.ok
    assert dated.http_status == 503 and 28.0 <= dated.retry_after_s <= 31.0
    assert (bare.http_status, bare.retry_after_s) == (503, None)
    assert (not_found.http_status, not_found.retry_after_s) == (404, None)  # only 429 and 503 ask to wait


# -- host failures -----------------------------------------------------------------------


def test_host_failures_are_the_ones_that_say_a_host_is_down(tmp_path):
    specs = [
        HostSpec(refuse=True),
        HostSpec(hang=True),
        HostSpec(routes={"/to-dead": Route(b"", status=302, headers={"Location": "/"}, content_type=None)}),
        HostSpec(routes={"/big": Route(b"x" * 5000)}),
    ]

    def resolver(host, port):
        if host == "gone.example":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return ["127.0.0.2"]

    with many(tmp_path, *specs) as web:
        config = PLAIN.model_copy(update={"timeout_s": 0.3, "max_body_bytes": 1000})
        fetcher = Fetcher(config)
        refused = fetcher.fetch(web.image_url(0, 0))
        hung = fetcher.fetch(web.image_url(1, 0))
        missing = fetcher.fetch(web.url(2, "/nothing"))
        too_large = fetcher.fetch(web.url(3, "/big"))
        # A redirect to a dead host is that host's failure, not the row's host's.
        web.specs[2].routes["/to-dead"].headers["Location"] = web.image_url(0, 1)
        redirected = fetcher.fetch(web.url(2, "/to-dead"))
        dns = Fetcher(config, resolver=resolver).fetch("http://gone.example/a.jpg")
    assert (refused.drop.reason, refused.host_failure, refused.requests) == (RejectReason.CONNECTION_ERROR, True, 1)
    assert (hung.drop.reason, hung.host_failure) == (RejectReason.TIMEOUT, True)
    assert (dns.drop.reason, dns.host_failure, dns.requests) == (RejectReason.DNS_FAILURE, True, 0)
    assert (missing.drop.reason, missing.host_failure) == (RejectReason.HTTP_ERROR, False)
    assert (too_large.drop.reason, too_large.host_failure) == (RejectReason.TOO_LARGE, False)
    assert (redirected.drop.reason, redirected.host_failure) == (RejectReason.CONNECTION_ERROR, False)
    assert redirected.requests == 1  # the hop to the dead host is not the row's host's request


def test_a_private_address_is_no_host_failure():
    result = Fetcher(PLAIN.model_copy(update={"allow_private_network": False})).fetch("http://10.0.0.1/a.jpg")
    assert (result.drop.reason, result.host_failure, result.requests) == (RejectReason.PRIVATE_ADDRESS, False, 0)


# -- requests charged to the row's host ----------------------------------------------------


def test_requests_count_robots_tdmrep_redirects_and_retries_on_the_row_host(tmp_path):
    specs = [
        HostSpec(routes={"/r": Route(b"", status=301, headers={"Location": "/images/3.jpg"}, content_type=None)}),
        HostSpec(),
    ]
    with many(tmp_path, *specs) as web:
        specs[0].routes["/away"] = Route(b"", status=302, headers={"Location": web.image_url(1, 0)}, content_type=None)
        fetcher = Fetcher(LOCAL, opt_outs=OptOutCache())
        first = fetcher.fetch(web.image_url(0, 0))  # robots.txt, tdmrep.json, the image
        second = fetcher.fetch(web.image_url(0, 1))  # both files known by now
        redirect = fetcher.fetch(web.url(0, "/r"))
        away = fetcher.fetch(web.url(0, "/away"))  # the hop's host pays for its own files and image
        seen = {i: [e.path for e in web.log(i)] for i in (0, 1)}
    assert all(r.ok for r in (first, second, redirect, away))
    assert [r.requests for r in (first, second, redirect, away)] == [3, 1, 2, 1]
    assert len(seen[0]) == 3 + 1 + 2 + 1
    assert seen[1] == ["/robots.txt", "/.well-known/tdmrep.json", "/images/0.jpg"]


def test_retries_are_counted(web):
    web.add("/flaky", b"finally", fail_times=2)
    result = Fetcher(PLAIN.model_copy(update={"retries": 2})).fetch(web.url("/flaky"))
    assert result.ok and (result.attempts, result.requests) == (3, 3)


# -- keep-alive ------------------------------------------------------------------------------


def test_keep_alive_reuses_one_connection_per_host(tmp_path):
    with many(tmp_path, HostSpec(), HostSpec()) as web:
        fetcher = Fetcher(LOCAL, opt_outs=OptOutCache())
        results = [fetcher.fetch(web.image_url(i % 2, i)) for i in range(10)]
        results.append(fetcher.fetch(web.url(0, "/missing")))  # a drained 404 keeps its connection too
        results.append(fetcher.fetch(web.image_url(0, 99)))
        logs = [web.log(0), web.log(1)]
    assert all(r.ok for r in results[:10]) and results[10].http_status == 404 and results[11].ok
    assert [len(log) for log in logs] == [2 + 5 + 2, 2 + 5]  # robots.txt and tdmrep.json, then the images
    assert [{e.conn for e in log} for log in logs] == [{1}, {1}]


def test_concurrent_fetches_open_at_most_one_connection_per_thread(tmp_path):
    with many(tmp_path, HostSpec(delay_s=0.02)) as web:
        fetcher = Fetcher(PLAIN.model_copy(update={"max_per_host": 4}))
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda n: fetcher.fetch(web.image_url(0, n)), range(40)))
        log = web.log(0)
    assert all(r.ok for r in results)
    assert len(log) == 40
    assert len({e.conn for e in log}) <= 4


def test_a_connection_the_server_closed_is_replaced(tmp_path):
    with many(tmp_path, HostSpec(), keepalive_timeout_s=0.1) as web:
        fetcher = Fetcher(PLAIN)
        first = fetcher.fetch(web.image_url(0, 0))
        time.sleep(0.4)  # the server drops the idle connection
        second = fetcher.fetch(web.image_url(0, 1))
        log = web.log(0)
    assert first.ok and second.ok and second.attempts == 1
    assert [e.conn for e in log] == [1, 2]


def test_an_abandoned_body_closes_its_connection(tmp_path):
    with many(tmp_path, HostSpec(routes={"/big": Route(b"x" * 5000)})) as web:
        fetcher = Fetcher(PLAIN.model_copy(update={"max_body_bytes": 1000}))
        assert fetcher.fetch(web.url(0, "/big")).drop.reason == RejectReason.TOO_LARGE
        assert fetcher.fetch(web.image_url(0, 0)).ok
        log = web.log(0)
    assert [e.conn for e in log] == [1, 2]


# -- DNS cache -----------------------------------------------------------------------------


class CountingResolver:
    def __init__(self, answer=("127.0.0.2",), error: socket.gaierror | None = None, delay_s: float = 0.0):
        self.calls: list[str] = []
        self.answer, self.error, self.delay_s = list(answer), error, delay_s
        self._lock = threading.Lock()

    def __call__(self, host, port):
        with self._lock:
            self.calls.append(host)
        time.sleep(self.delay_s)
        if self.error is not None:
            raise self.error
        return self.answer


def test_one_lookup_per_host_however_many_threads_and_fetchers(tmp_path):
    resolver = CountingResolver(delay_s=0.05)
    with many(tmp_path, HostSpec()) as web:
        config = LOCAL.model_copy(update={"allow_private_network": False})
        fetchers = [Fetcher(config, resolver=resolver, address_check=loopback_is_public, opt_outs=OptOutCache())] * 2
        fetchers.append(Fetcher(config, resolver=resolver, address_check=loopback_is_public, opt_outs=OptOutCache()))
        urls = [f"http://images.example:{web.port}/images/{n}.jpg" for n in range(12)]
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            results = list(pool.map(lambda i: fetchers[i % 3].fetch(urls[i]), range(12)))
        names = {e.path for e in web.log(0)}
    assert all(r.ok for r in results), [r.drop for r in results]
    assert resolver.calls == ["images.example"]
    assert {f"/images/{n}.jpg" for n in range(12)} <= names


def test_dns_answers_expire_after_the_ttl():
    resolver = CountingResolver()
    cache = DnsCache(resolver)
    assert cache.resolve("a.example", 80, ttl_s=0.2) == ["127.0.0.2"]
    assert cache.resolve("A.example", 443, ttl_s=0.2) == ["127.0.0.2"]
    time.sleep(0.3)
    cache.resolve("a.example", 80, ttl_s=0.2)
    cache.resolve("a.example", 80, ttl_s=0)  # 0: the cache is off
    assert resolver.calls == ["a.example"] * 3


@pytest.mark.parametrize(("code", "lookups"), [(socket.EAI_NONAME, 1), (socket.EAI_AGAIN, 2)])
def test_failed_lookups_are_cached_unless_temporary(code, lookups):
    resolver = CountingResolver(error=socket.gaierror(code, "test"))
    cache = DnsCache(resolver)
    for _ in range(2):
        with pytest.raises(socket.gaierror):
            cache.resolve("gone.example", 80, ttl_s=60)
    assert len(resolver.calls) == lookups


# -- per-host concurrency ----------------------------------------------------------------


def fetch_many(fetcher: Fetcher, urls: list[str], threads: int) -> list:
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fetcher.fetch, urls))


def test_per_host_bound_holds_across_threads_and_fetchers(web):
    web.add("/slow", b"s", delay_s=0.2)
    config = LOCAL.model_copy(update={"max_per_host": 2})
    fetchers = [Fetcher(config), Fetcher(config)]  # two DoFn instances in one process share the bound
    urls = [web.url("/slow")] * 8
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: fetchers[i % 2].fetch(urls[i]), range(8)))
    assert all(r.ok for r in results)
    assert web.max_concurrent == 2
    assert len(HOST_SLOTS) == 0  # entries go away once nobody holds or waits


def test_without_the_bound_the_server_sees_more_concurrency(web):
    # The control for the test above: the same load with a loose bound.
    web.add("/slow", b"s", delay_s=0.2)
    results = fetch_many(Fetcher(LOCAL.model_copy(update={"max_per_host": 8})), [web.url("/slow")] * 8, threads=8)
    assert all(r.ok for r in results)
    assert web.max_concurrent > 2


def test_a_host_budget_sets_the_bound_for_the_hosts_it_matches(tmp_path):
    budgets = [
        HostBudget(pattern="127.0.0.2", max_per_host=4),
        HostBudget(pattern="127.0.0.3", max_host_rate=5.0),  # first match wins: the default bound
        HostBudget(pattern="127.0.0.*", max_per_host=8),
    ]
    config = PLAIN.model_copy(update={"max_per_host": 1, "host_budgets": budgets})
    with many(tmp_path, HostSpec(delay_s=0.15), HostSpec(delay_s=0.15)) as web:
        fetcher = Fetcher(config)
        urls = [web.image_url(i % 2, i) for i in range(16)]
        results = fetch_many(fetcher, urls, threads=16)
        peaks = [peak_in_flight(web.log(i)) for i in range(2)]
    assert all(r.ok for r in results)
    assert peaks == [4, 1]
    assert (fetcher.connections_for("127.0.0.2"), fetcher.connections_for("127.0.0.3")) == (4, 1)


def test_host_slots_are_per_host():
    slots = HostSlots()
    inside = threading.Barrier(2, timeout=5)

    def hold(host):
        with slots.hold(host, 1):
            inside.wait()  # both inside at once: different hosts do not share a slot

    threads = [threading.Thread(target=hold, args=(h,)) for h in ("a.example", "b.example")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not inside.broken
    assert len(slots) == 0


# -- HTTPS -----------------------------------------------------------------------------------


def self_signed(tmp_path, name: str) -> tuple[str, str]:
    """A certificate (and key) for `name`, PEM files under tmp_path."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(cert_path), str(key_path)


def test_https_keeps_connections_alive_pinned_to_the_checked_address(tmp_path, monkeypatch):
    """A real TLS server (TLS 1.3, which sends session tickets after the
    handshake) for `images.example` on 127.0.0.2: the certificate is checked
    against the name, the connection goes to the checked address, and one
    connection carries every request, robots.txt and tdmrep.json included."""
    cert, key = self_signed(tmp_path, "images.example")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=cert)
    monkeypatch.setattr(connections, "tls_context", lambda: client)
    resolver = CountingResolver()
    with many(tmp_path, HostSpec(), tls=server) as web:
        config = LOCAL.model_copy(update={"allow_private_network": False})
        fetcher = Fetcher(config, resolver=resolver, address_check=loopback_is_public, opt_outs=OptOutCache())
        results = [fetcher.fetch(f"https://images.example:{web.port}/images/{n}.jpg") for n in range(4)]
        wrong_name = Fetcher(PLAIN, resolver=lambda host, port: ["127.0.0.2"]).fetch(
            f"https://other.example:{web.port}/images/0.jpg"
        )
        log = web.log(0)
    assert all(r.ok for r in results), [r.drop for r in results]
    assert [r.requests for r in results] == [3, 1, 1, 1]
    assert [e.path for e in log][:2] == ["/robots.txt", "/.well-known/tdmrep.json"]
    assert {e.conn for e in log} == {1} and len(log) == 6
    assert (wrong_name.drop.reason, wrong_name.host_failure) == (RejectReason.CONNECTION_ERROR, True)
    assert "certificate" in wrong_name.drop.detail.lower()


def test_before_request_runs_before_every_request_and_may_pace_them(tmp_path):
    """The hook sees every request, the opt-out files and each redirect hop's
    host included, before it goes out; a hook that sleeps spaces them out as
    the server's log shows."""
    spec = HostSpec(routes={})
    with many(tmp_path, spec, HostSpec()) as web:
        spec.routes["/away"] = Route(b"", status=302, headers={"Location": web.image_url(1, 0)}, content_type=None)
        seen: list[tuple[str, float]] = []

        def pace(host: str) -> None:
            time.sleep(0.05)
            seen.append((host, time.monotonic()))

        fetcher = Fetcher(LOCAL, opt_outs=OptOutCache())
        first = fetcher.fetch(web.image_url(0, 0), before_request=pace)
        away = fetcher.fetch(web.url(0, "/away"), before_request=pace)
        log = web.log(0)
    assert first.ok and away.ok
    hosts = [host for host, _ in seen]
    assert hosts == ["127.0.0.2"] * 3 + ["127.0.0.2"] + ["127.0.0.3"] * 3
    gaps = [b.mono - a.mono for a, b in zip(log, log[1:])]
    assert len(log) == 4 and min(gaps) >= 0.05
    assert [e.mono >= t for e, (_, t) in zip(log, seen)] == [True] * 4  # each request left after its hook

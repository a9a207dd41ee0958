"""stages.core.fetch and stages.core.address (the crawl stage's core), against
LocalWeb on 127.0.0.1.

Every test server is loopback, so fetches that should succeed use
`allow_private_network=True`, or a Fetcher whose address check treats
loopback as public. A guard refuses any connection to a non-loopback address,
so a broken address check shows up as a failure here, never as traffic.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import ipaddress
import ssl
import threading

import pytest

from schemas import CrawlConfig, RejectReason
from stages.core import fetch
from stages.core.address import non_public_reason
from stages.core.fetch import Fetcher, HOST_SLOTS, _HostSlots, user_agent
from tests.stages.crawl_helpers import LOCAL, free_port, loopback_is_public

# Every test runs behind the guard against non-loopback traffic.
pytestmark = pytest.mark.usefixtures("loopback_only")


# -- success and HTTP errors --------------------------------------------------------


def test_success_returns_body_and_response_facts(web):
    web.add("/a.jpg", b"\xff\xd8 jpeg", content_type="image/jpeg")
    result = Fetcher(LOCAL).fetch(web.url("/a.jpg"))
    assert result.ok and result.drop is None
    assert result.data == b"\xff\xd8 jpeg"
    assert (result.final_url, result.http_status, result.content_type) == (web.url("/a.jpg"), 200, "image/jpeg")
    assert result.attempts == 1
    headers = web.received[-1].headers
    assert headers["User-Agent"] == user_agent("img2dataset")
    assert "(compatible; img2dataset; +https://github.com/rom1504/img2dataset)" in headers["User-Agent"]
    assert headers["Host"] == f"127.0.0.1:{web.port}"


def test_user_agent_without_token():
    assert "compatible" not in user_agent(None)
    assert user_agent("MyBot").endswith("(compatible; MyBot; +https://github.com/rom1504/img2dataset)")


def test_empty_body_is_kept_for_decode_to_judge(web):
    web.add("/empty", b"")
    result = Fetcher(LOCAL).fetch(web.url("/empty"))
    assert (result.ok, result.data) == (True, b"")


@pytest.mark.parametrize("status", [404, 500, 403, 304])
def test_error_statuses_are_http_errors_and_not_retried(web, status):
    web.add("/x", b"nope", status=status)
    result = Fetcher(LOCAL.model_copy(update={"retries": 2})).fetch(web.url("/x"))
    assert result.drop.reason == RejectReason.HTTP_ERROR
    assert str(status) in result.drop.detail
    assert result.http_status == status
    assert result.data is None
    assert web.requests_to("/x") == 1


def test_non_ascii_and_space_in_path_are_percent_encoded(web):
    web.add("/caf%C3%A9%20au%20lait.jpg", b"coffee")
    result = Fetcher(LOCAL).fetch(web.base_url + "/café au lait.jpg")
    assert result.data == b"coffee"
    web.add("/plain.jpg?w=1&h=2", b"query kept")
    assert Fetcher(LOCAL).fetch(web.url("/plain.jpg?w=1&h=2")).data == b"query kept"


def test_no_header_injection_through_the_url(web):
    web.add("/a.jpg", b"a")
    Fetcher(LOCAL).fetch(web.base_url + "/a.jpg\r\nX-Injected: 1")
    Fetcher(LOCAL).fetch(web.base_url + "/a.jpg%0d%0aX-Injected:%201")
    assert web.request_count == 2
    assert all("X-Injected" not in r.headers for r in web.received)


# -- timeouts, retries, connection errors, DNS ---------------------------------------


def test_slow_response_is_a_timeout(web):
    web.add("/slow", b"late", delay_s=3.0)
    result = Fetcher(LOCAL.model_copy(update={"timeout_s": 0.3})).fetch(web.url("/slow"))
    assert result.drop.reason == RejectReason.TIMEOUT
    assert result.elapsed_s < 2.0


def test_timeouts_are_retried(web):
    web.add("/slow", b"late", delay_s=3.0)
    result = Fetcher(LOCAL.model_copy(update={"timeout_s": 0.3, "retries": 1})).fetch(web.url("/slow"))
    assert result.drop.reason == RejectReason.TIMEOUT
    assert (result.attempts, web.requests_to("/slow")) == (2, 2)


def test_retries_recover_from_transient_connection_failures(web):
    web.add("/flaky", b"finally", fail_times=2)
    result = Fetcher(LOCAL.model_copy(update={"retries": 2})).fetch(web.url("/flaky"))
    assert result.data == b"finally"
    assert (result.attempts, web.requests_to("/flaky")) == (3, 3)


def test_too_few_retries_leave_a_connection_error(web):
    web.add("/flaky", b"finally", fail_times=2)
    result = Fetcher(LOCAL.model_copy(update={"retries": 1})).fetch(web.url("/flaky"))
    assert result.drop.reason == RejectReason.CONNECTION_ERROR
    assert (result.attempts, web.requests_to("/flaky")) == (2, 2)


def test_connection_refused():
    result = Fetcher(LOCAL).fetch(f"http://127.0.0.1:{free_port()}/a.jpg")
    assert result.drop.reason == RejectReason.CONNECTION_ERROR
    assert "refused" in result.drop.detail.lower()


def test_unresolvable_host_is_a_dns_failure():
    result = Fetcher(LOCAL).fetch("http://nonexistent.invalid/a.jpg")
    assert result.drop.reason == RejectReason.DNS_FAILURE
    assert "nonexistent.invalid" in result.drop.detail


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("", RejectReason.UNSUPPORTED_SCHEME),
        ("not a url", RejectReason.UNSUPPORTED_SCHEME),
        ("javascript:alert(1)", RejectReason.UNSUPPORTED_SCHEME),
        ("file:///etc/passwd", RejectReason.UNSUPPORTED_SCHEME),
        ("ftp://example.com/a.jpg", RejectReason.UNSUPPORTED_SCHEME),
        ("http://", RejectReason.MALFORMED_URL),
        ("http://:8080/a.jpg", RejectReason.MALFORMED_URL),
        ("http://[::1/a.jpg", RejectReason.MALFORMED_URL),
        ("http://example.com:99999/a.jpg", RejectReason.MALFORMED_URL),
        ("http://" + "a" * 70 + ".invalid/", RejectReason.MALFORMED_URL),
    ],
)
def test_bad_urls_are_rejected_without_raising(url, reason):
    result = Fetcher(LOCAL).fetch(url)
    assert result.drop.reason == reason, result.drop


# -- size limit ---------------------------------------------------------------------


@pytest.fixture
def bytes_read(monkeypatch) -> list[int]:
    """Records how many bytes each HTTPResponse.read call returned."""
    sizes: list[int] = []
    real_read = http.client.HTTPResponse.read

    def counting_read(self, amt=None):
        data = real_read(self, amt)
        sizes.append(len(data))
        return data

    monkeypatch.setattr(http.client.HTTPResponse, "read", counting_read)
    return sizes


def test_body_at_the_limit_is_kept(web):
    web.add("/exact", b"x" * 1000)
    assert Fetcher(LOCAL.model_copy(update={"max_body_bytes": 1000})).fetch(web.url("/exact")).data == b"x" * 1000


@pytest.mark.parametrize("content_length", [True, False])
def test_body_over_the_limit_is_too_large_and_not_read_beyond_it(web, bytes_read, content_length):
    web.add("/big", b"x" * 3_000_000, content_length=content_length)
    result = Fetcher(LOCAL.model_copy(update={"max_body_bytes": 1000})).fetch(web.url("/big"))
    assert result.drop.reason == RejectReason.TOO_LARGE
    assert sum(bytes_read) <= 1001
    if content_length:
        assert "Content-Length 3000000" in result.drop.detail
        assert sum(bytes_read) == 0


def test_announced_length_over_the_limit_is_too_large_even_if_the_body_is_small(web):
    web.add("/liar", b"small", headers={"Content-Length": str(10**9)})
    result = Fetcher(LOCAL).fetch(web.url("/liar"))
    assert result.drop.reason == RejectReason.TOO_LARGE


def test_body_cut_short_is_a_connection_error(web):
    web.add("/cut", b"short", headers={"Content-Length": "100"})
    result = Fetcher(LOCAL.model_copy(update={"retries": 1})).fetch(web.url("/cut"))
    assert result.drop.reason == RejectReason.CONNECTION_ERROR
    assert web.requests_to("/cut") == 2  # a truncated body is worth another try


# -- X-Robots-Tag opt-out -------------------------------------------------------------


@pytest.mark.parametrize(
    "robots",
    [
        "noai",
        "noimageai",
        "noindex",
        "noimageindex",
        "NoAI",
        "nofollow, noimageai",
        "img2dataset: noai",
        "IMG2DATASET: noindex, nofollow",
        ["otherbot: noindex", "noimageindex"],
    ],
)
def test_opt_out_headers(web, robots):
    web.add("/a.jpg", b"a", headers={"X-Robots-Tag": robots})
    result = Fetcher(LOCAL).fetch(web.url("/a.jpg"))
    assert result.drop.reason == RejectReason.OPT_OUT
    assert result.data is None


@pytest.mark.parametrize("robots", ["otherbot: noai", "nofollow", "otherbot: noindex, noimageai", "all"])
def test_directives_for_other_agents_or_harmless_ones_are_not_an_opt_out(web, robots):
    web.add("/a.jpg", b"a", headers={"X-Robots-Tag": robots})
    result = Fetcher(LOCAL).fetch(web.url("/a.jpg"))
    assert result.data == b"a", result.drop


def test_opt_out_follows_the_configured_token(web):
    web.add("/a.jpg", b"a", headers={"X-Robots-Tag": "mybot: noai"})
    assert Fetcher(LOCAL.model_copy(update={"user_agent_token": "MyBot"})).fetch(web.url("/a.jpg")).drop.reason == (
        RejectReason.OPT_OUT
    )
    assert Fetcher(LOCAL).fetch(web.url("/a.jpg")).ok
    assert Fetcher(LOCAL.model_copy(update={"user_agent_token": None})).fetch(web.url("/a.jpg")).ok


def test_empty_directive_list_disables_the_opt_out_check(web):
    web.add("/a.jpg", b"a", headers={"X-Robots-Tag": "noai"})
    assert Fetcher(LOCAL.model_copy(update={"disallowed_header_directives": []})).fetch(web.url("/a.jpg")).ok


def test_opt_out_on_a_redirect_hop_counts(web):
    web.add("/a.jpg", b"a")
    web.add("/r", b"", status=302, headers={"Location": "/a.jpg", "X-Robots-Tag": "noai"}, content_type=None)
    assert Fetcher(LOCAL).fetch(web.url("/r")).drop.reason == RejectReason.OPT_OUT
    assert web.requests_to("/a.jpg") == 0


# -- redirects --------------------------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirect_chain_is_followed(web, status):
    web.add("/final.jpg", b"final")
    web.add_redirect("/r1", "/r2", status=status)  # relative
    web.add_redirect("/r2", web.url("/r3"), status=status)  # absolute
    web.add_redirect("/r3", "final.jpg", status=status)  # relative to the directory
    result = Fetcher(LOCAL.model_copy(update={"max_redirects": 3})).fetch(web.url("/r1"))
    assert result.data == b"final"
    assert (result.final_url, result.http_status) == (web.url("/final.jpg"), 200)
    assert [web.requests_to(p) for p in ("/r1", "/r2", "/r3", "/final.jpg")] == [1, 1, 1, 1]


def test_too_many_redirects(web):
    web.add("/final.jpg", b"final")
    for i in range(6):
        web.add_redirect(f"/r{i}", f"/r{i + 1}")
    web.add_redirect("/r6", "/final.jpg")
    result = Fetcher(LOCAL.model_copy(update={"max_redirects": 5})).fetch(web.url("/r0"))
    assert result.drop.reason == RejectReason.TOO_MANY_REDIRECTS
    assert web.requests_to("/final.jpg") == 0
    assert web.requests_to("/r5") == 1 and web.requests_to("/r6") == 0

    assert Fetcher(LOCAL.model_copy(update={"max_redirects": 7})).fetch(web.url("/r0")).data == b"final"


def test_zero_max_redirects_follows_none(web):
    web.add("/final.jpg", b"final")
    web.add_redirect("/r", "/final.jpg")
    result = Fetcher(LOCAL.model_copy(update={"max_redirects": 0})).fetch(web.url("/r"))
    assert result.drop.reason == RejectReason.TOO_MANY_REDIRECTS
    assert web.requests_to("/final.jpg") == 0


def test_redirect_loop_ends(web):
    web.add_redirect("/a", "/b")
    web.add_redirect("/b", "/a")
    assert Fetcher(LOCAL).fetch(web.url("/a")).drop.reason == RejectReason.TOO_MANY_REDIRECTS


def test_redirect_to_another_scheme_or_without_location(web):
    web.add_redirect("/ftp", "ftp://example.com/a.jpg")
    web.add_redirect("/file", "file:///etc/passwd")
    web.add("/nowhere", b"", status=302, content_type=None)
    assert Fetcher(LOCAL).fetch(web.url("/ftp")).drop.reason == RejectReason.UNSUPPORTED_SCHEME
    assert Fetcher(LOCAL).fetch(web.url("/file")).drop.reason == RejectReason.UNSUPPORTED_SCHEME
    result = Fetcher(LOCAL).fetch(web.url("/nowhere"))
    assert (result.drop.reason, result.http_status) == (RejectReason.HTTP_ERROR, 302)


# -- private addresses (SSRF) ------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "localhost",
        "[::1]",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "169.254.169.254",
        "0.0.0.0",
        "100.64.0.1",
        "224.0.0.1",
        "[fe80::1]",
        "[fc00::1]",
        "[::ffff:127.0.0.1]",
        "[::ffff:169.254.169.254]",
        "[2002:7f00:1::]",
        "0x7f000001",
        "2130706433",
        "127.1",
    ],
)
def test_private_addresses_are_refused_without_a_request(web, loopback_only, host):
    web.add("/a.jpg", b"a")
    result = Fetcher(CrawlConfig(timeout_s=0.5)).fetch(f"http://{host}:{web.port}/a.jpg")
    assert result.drop.reason == RejectReason.PRIVATE_ADDRESS, result.drop
    assert web.request_count == 0
    assert loopback_only == []


def test_https_private_address_is_refused_too(web, loopback_only):
    assert Fetcher(CrawlConfig()).fetch("https://169.254.169.254/latest/meta-data/").drop.reason == (
        RejectReason.PRIVATE_ADDRESS
    )
    assert loopback_only == []


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
        ("::ffff:8.8.8.8", True),
        ("64:ff9b::808:808", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.31.255.255", False),
        ("192.168.0.1", False),
        ("100.64.0.1", False),
        ("169.254.169.254", False),
        ("0.0.0.0", False),
        ("255.255.255.255", False),
        ("224.0.1.1", False),
        ("240.0.0.1", False),
        ("198.18.0.1", False),
        ("::", False),
        ("::1", False),
        ("fe80::1", False),
        ("fd00::1", False),
        ("ff02::1", False),
        ("::ffff:10.0.0.1", False),
        ("2002:a00:1::", False),
        ("64:ff9b::a9fe:a9fe", False),
    ],
)
def test_non_public_reason(address, public):
    assert (non_public_reason(ipaddress.ip_address(address)) is None) == public


def test_a_name_with_any_private_address_is_refused(web, loopback_only):
    fetcher = Fetcher(CrawlConfig(), resolver=lambda host, port: ["93.184.216.34", "10.0.0.7"])
    result = fetcher.fetch("http://mixed.example/a.jpg")
    assert result.drop.reason == RejectReason.PRIVATE_ADDRESS
    assert "10.0.0.7" in result.drop.detail
    assert loopback_only == []


def test_connects_to_the_checked_address_and_keeps_the_host_name(web):
    """The name is resolved once, by the resolver the check used; the connection
    goes to that address (the system resolver does not know the name) and the
    Host header still carries the name."""
    web.add("/a.jpg", b"pinned")
    calls = []

    def resolver(host, port):
        calls.append((host, port))
        return ["127.0.0.1"]

    fetcher = Fetcher(CrawlConfig(), resolver=resolver, address_check=loopback_is_public)
    result = fetcher.fetch(f"http://images.example:{web.port}/a.jpg")
    assert result.data == b"pinned"
    assert calls == [("images.example", web.port)]
    assert web.received[-1].headers["Host"] == f"images.example:{web.port}"


def test_every_address_is_rechecked_and_a_rebinding_answer_refused(web, loopback_only):
    """A resolver that answers a public address first and a private one next
    (DNS rebinding): the first request goes out, the redirect to the same name
    is refused because its hop is resolved and checked again."""
    web.add_redirect("/r", "/again")
    answers = iter([["127.0.0.1"], ["169.254.169.254"]])
    fetcher = Fetcher(CrawlConfig(), resolver=lambda host, port: next(answers), address_check=loopback_is_public)
    result = fetcher.fetch(f"http://rebind.example:{web.port}/r")
    assert result.drop.reason == RejectReason.PRIVATE_ADDRESS
    assert (web.requests_to("/r"), web.requests_to("/again")) == (1, 0)
    assert loopback_only == []


@pytest.mark.parametrize(
    "target",
    [
        "http://10.0.0.1/x.jpg",
        "http://169.254.169.254/latest/meta-data/",
        "http://192.168.0.1:8080/admin",
        "http://[::ffff:10.0.0.1]/x",
        "http://[fd00::1]/x",
        "https://0.0.0.0/x",
    ],
)
def test_redirect_to_a_private_address_is_refused(web, loopback_only, target):
    web.add_redirect("/r", target)
    fetcher = Fetcher(CrawlConfig(timeout_s=0.5), address_check=loopback_is_public)
    result = fetcher.fetch(web.url("/r"))
    assert result.drop.reason == RejectReason.PRIVATE_ADDRESS, result.drop
    assert result.final_url == target
    assert web.requests_to("/r") == 1
    assert loopback_only == []


def test_https_connects_to_the_checked_address_with_the_name_as_sni(web, monkeypatch):
    """TLS goes to the pinned address, and the certificate is checked against
    the name (SNI), not the address."""
    context = ssl.create_default_context()
    server_names = []

    def refuse_handshake(sock, server_hostname=None, **kwargs):
        server_names.append((sock.getpeername()[0], server_hostname))
        raise ssl.SSLCertVerificationError("test: no certificate for this name")

    context.wrap_socket = refuse_handshake
    monkeypatch.setattr(fetch, "_tls_context", lambda: context)
    fetcher = Fetcher(CrawlConfig(), resolver=lambda host, port: ["127.0.0.1"], address_check=loopback_is_public)
    result = fetcher.fetch(f"https://images.example:{web.port}/a.jpg")
    assert result.drop.reason == RejectReason.CONNECTION_ERROR
    assert server_names == [("127.0.0.1", "images.example")]


def test_https_to_a_plain_http_server_is_a_connection_error(web):
    result = Fetcher(LOCAL).fetch(f"https://127.0.0.1:{web.port}/a.jpg")
    assert result.drop.reason == RejectReason.CONNECTION_ERROR
    assert "SSL" in result.drop.detail


def test_check_url_directly(web):
    fetcher = Fetcher(CrawlConfig(), address_check=loopback_is_public)
    target = fetcher.check_url(web.url("/a.jpg"))
    assert target.addresses == ["127.0.0.1"] and target.url == web.url("/a.jpg")
    assert fetcher.check_url("http://169.254.169.254/").reason == RejectReason.PRIVATE_ADDRESS
    allowing = Fetcher(LOCAL)
    assert allowing.check_url("http://10.0.0.1/").addresses == ["10.0.0.1"]


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


def test_host_slots_are_per_host():
    slots = _HostSlots()
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

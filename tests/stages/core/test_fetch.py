"""stages.core.fetch (the crawl stage's core), against LocalWeb on 127.0.0.1:
responses, errors, retries, the size limit, X-Robots-Tag and redirects. The
address policy is in test_fetch_addresses.py, per-host behaviour (keep-alive,
DNS cache, Retry-After, host failures) in test_fetch_hosts.py, robots.txt and
TDMRep in test_robots.py.

Every test server is loopback, so fetches that should succeed use
`allow_private_network=True`. A guard refuses any connection to a non-loopback
address, so a broken address check shows up as a failure here, never as traffic.
"""

from __future__ import annotations

import http.client

import pytest

from schemas import RejectReason
from stages.core.fetch import Fetcher, user_agent
from tests.stages.crawl_helpers import LOCAL, free_port

# Every test runs behind the guard against non-loopback traffic.
pytestmark = pytest.mark.usefixtures("loopback_only")

# robots.txt and tdmrep.json off where a test counts every request or byte.
PLAIN = LOCAL.model_copy(update={"robots_txt": False, "tdmrep": False})


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
    Fetcher(PLAIN).fetch(web.base_url + "/a.jpg\r\nX-Injected: 1")
    Fetcher(PLAIN).fetch(web.base_url + "/a.jpg%0d%0aX-Injected:%201")
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
    result = Fetcher(PLAIN.model_copy(update={"max_body_bytes": 1000})).fetch(web.url("/big"))
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

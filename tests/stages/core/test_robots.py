"""stages.core.robots through stages.core.fetch: robots.txt (RFC 9309, parsed
by protego) and W3C TDMRep, fetched once per host through the same address
policy as every request. Against LocalWeb (127.0.0.1) and ManyHostWeb
(127.0.0.2+), behind the guard against non-loopback traffic. Every test uses
its own OptOutCache, so no verdict leaks into another test."""

from __future__ import annotations

import concurrent.futures
import json
import pickle
import time

import pytest

from pipelines.testing.manyhosts import HostSpec, ManyHostWeb, Route
from schemas import CrawlConfig, RejectReason
from stages.core.fetch import Fetcher
from stages.core.robots import OptOutCache, location_pattern, parse_tdmrep
from tests.stages.crawl_helpers import LOCAL, loopback_is_public

pytestmark = pytest.mark.usefixtures("loopback_only")


@pytest.fixture
def fetcher():
    """`fetcher(**config_updates)`: a Fetcher over LOCAL with its own opt-out cache."""

    def make(**updates) -> Fetcher:
        return Fetcher(LOCAL.model_copy(update=updates), opt_outs=OptOutCache())

    return make


def serve_robots(web, text: str, *paths: str) -> None:
    web.add("/robots.txt", text.encode(), content_type="text/plain")
    for path in paths:
        web.add(path, b"image")


def verdicts(fetcher: Fetcher, web, paths) -> dict[str, str | None]:
    """path -> the reject reason, or None when fetched."""
    out = {}
    for path in paths:
        result = fetcher.fetch(web.url(path))
        out[path] = None if result.ok else result.drop.reason.value
    return out


# -- robots.txt rules --------------------------------------------------------------------


def test_disallow_for_our_token(web, fetcher):
    serve_robots(web, "User-agent: img2dataset\nDisallow: /private/\n", "/private/a.jpg", "/public/a.jpg")
    f = fetcher()
    result = f.fetch(web.url("/private/a.jpg"))
    assert result.drop.reason == RejectReason.ROBOTS_DISALLOWED
    assert "img2dataset" in result.drop.detail and "/private/a.jpg" in result.drop.detail
    assert (result.host_failure, result.requests) == (False, 1)  # robots.txt only: no tdmrep.json, no image
    assert web.requests_to("/private/a.jpg") == 0
    assert f.fetch(web.url("/public/a.jpg")).ok
    # Another token's robots.txt group does not bind us.
    assert fetcher(user_agent_token="OtherBot", robots_user_agents=[]).fetch(web.url("/private/a.jpg")).ok


def test_disallow_for_everyone(web, fetcher):
    serve_robots(web, "User-agent: *\nDisallow: /\n", "/a.jpg")
    result = fetcher().fetch(web.url("/a.jpg"))
    assert result.drop.reason == RejectReason.ROBOTS_DISALLOWED
    assert "for img2dataset" in result.drop.detail  # our token is checked first
    assert web.requests_to("/a.jpg") == 0


def test_ai_crawler_tokens_are_honoured_unless_configured_away(web, fetcher):
    serve_robots(web, "User-agent: GPTBot\nDisallow: /\n\nUser-agent: *\nAllow: /\n", "/a.jpg")
    result = fetcher().fetch(web.url("/a.jpg"))
    assert result.drop.reason == RejectReason.ROBOTS_DISALLOWED and "for GPTBot" in result.drop.detail
    assert fetcher(robots_user_agents=[]).fetch(web.url("/a.jpg")).ok
    assert fetcher(robots_user_agents=["CCBot"]).fetch(web.url("/a.jpg")).ok


def test_allow_overrides_a_shorter_disallow(web, fetcher):
    serve_robots(web, "User-agent: *\nDisallow: /images/\nAllow: /images/public/\n",
                 "/images/a.jpg", "/images/public/a.jpg", "/other.jpg")
    assert verdicts(fetcher(), web, ["/images/a.jpg", "/images/public/a.jpg", "/other.jpg"]) == {
        "/images/a.jpg": "robots_disallowed",
        "/images/public/a.jpg": None,
        "/other.jpg": None,
    }


def test_wildcards_and_end_anchor(web, fetcher):
    robots = "User-agent: *\nDisallow: /*.gif$\nDisallow: /*/thumbs/\nDisallow: /q?size=small\n"
    paths = ["/a.gif", "/a.gif?v=2", "/x/y/thumbs/a.jpg", "/thumbs/a.jpg", "/q?size=small", "/q?size=large"]
    serve_robots(web, robots, *paths)
    assert verdicts(fetcher(), web, paths) == {
        "/a.gif": "robots_disallowed",
        "/a.gif?v=2": None,  # $ ends the match: a query follows
        "/x/y/thumbs/a.jpg": "robots_disallowed",
        "/thumbs/a.jpg": None,  # /*/thumbs/ needs a segment before
        "/q?size=small": "robots_disallowed",
        "/q?size=large": None,
    }


def test_robots_off_sends_no_request_for_it(web, fetcher):
    serve_robots(web, "User-agent: *\nDisallow: /\n", "/a.jpg")
    assert fetcher(robots_txt=False).fetch(web.url("/a.jpg")).ok
    assert web.requests_to("/robots.txt") == 0


# -- what the fetch of robots.txt gives (RFC 9309 2.3.1) ------------------------------------


def test_a_5xx_robots_txt_disallows_everything_for_the_run(web, fetcher):
    web.add("/robots.txt", b"oops", status=503, content_type="text/plain")
    web.add("/a.jpg", b"a")
    f = fetcher()
    results = [f.fetch(web.url("/a.jpg")) for _ in range(3)]
    assert {r.drop.reason for r in results} == {RejectReason.ROBOTS_DISALLOWED}
    assert "HTTP 503" in results[0].drop.detail and "disallow all" in results[0].drop.detail
    assert not any(r.host_failure for r in results)
    assert (web.requests_to("/robots.txt"), web.requests_to("/a.jpg")) == (1, 0)
    assert [r.requests for r in results] == [1, 0, 0]


@pytest.mark.parametrize("status", [404, 401, 403, 410])
def test_a_4xx_robots_txt_allows_everything(web, fetcher, status):
    web.add("/robots.txt", b"User-agent: *\nDisallow: /\n", status=status, content_type="text/plain")
    web.add("/a.jpg", b"a")
    assert fetcher().fetch(web.url("/a.jpg")).ok


def test_a_redirected_robots_txt_is_followed(web, fetcher):
    web.add_redirect("/robots.txt", "/robots/real.txt", status=301)
    web.add("/robots/real.txt", b"User-agent: *\nDisallow: /private/\n", content_type="text/plain")
    web.add("/private/a.jpg", b"a")
    web.add("/a.jpg", b"a")
    f = fetcher()
    assert f.fetch(web.url("/private/a.jpg")).drop.reason == RejectReason.ROBOTS_DISALLOWED
    assert f.fetch(web.url("/a.jpg")).ok


def test_a_robots_txt_redirected_to_another_host_follows_that_file(tmp_path, fetcher):
    specs = [HostSpec(), HostSpec(robots="User-agent: *\nDisallow: /images/\n")]
    with ManyHostWeb(specs, tmp_path, image_size=(16, 16)) as web:
        specs[0].routes["/robots.txt"] = Route(b"", status=302, headers={"Location": web.url(1, "/robots.txt")})
        result = fetcher(tdmrep=False).fetch(web.image_url(0, 0))
        logs = [[e.path for e in web.log(i)] for i in range(2)]
    assert result.drop.reason == RejectReason.ROBOTS_DISALLOWED
    assert result.requests == 1  # the hop on host 1 is not charged to host 0
    assert logs == [["/robots.txt"], ["/robots.txt"]]


def test_more_than_five_robots_redirects_count_as_no_robots_txt(web, fetcher):
    for i in range(6):
        web.add_redirect("/robots.txt" if i == 0 else f"/r{i}", f"/r{i + 1}")
    web.add("/r6", b"User-agent: *\nDisallow: /\n", content_type="text/plain")
    web.add("/a.jpg", b"a")
    assert fetcher().fetch(web.url("/a.jpg")).ok
    assert (web.requests_to("/r5"), web.requests_to("/r6")) == (1, 0)


@pytest.mark.parametrize("target", ["http://10.0.0.1/robots.txt", "http://169.254.169.254/latest/", "http://[fd00::1]/r"])
def test_a_robots_txt_redirected_to_a_private_address_is_not_fetched_and_disallows(web, loopback_only, target):
    """Without allow_private_network, the robots.txt hop goes through the same
    policy as every request: no connection to the private address, and a
    robots.txt that cannot be read means disallow all (RFC 9309 2.3.1.4)."""
    web.add_redirect("/robots.txt", target)
    web.add("/a.jpg", b"a")
    fetcher = Fetcher(CrawlConfig(timeout_s=1.0), address_check=loopback_is_public, opt_outs=OptOutCache())
    result = fetcher.fetch(web.url("/a.jpg"))
    assert result.drop.reason == RejectReason.ROBOTS_DISALLOWED, result.drop
    assert "private_address" in result.drop.detail and "disallow all" in result.drop.detail
    assert not result.host_failure
    assert web.requests_to("/a.jpg") == 0
    assert loopback_only == []


def test_an_oversized_robots_txt_is_read_up_to_the_limit(web, fetcher):
    padding = "".join(f"# filler line {i:05d} ..........................\n" for i in range(100))
    web.add("/robots.txt", f"User-agent: *\nDisallow: /early/\n{padding}Disallow: /late/\n".encode(), content_type="text/plain")
    web.add("/early/a.jpg", b"a")
    web.add("/late/a.jpg", b"a")
    small = fetcher(max_robots_bytes=1000)
    assert small.fetch(web.url("/early/a.jpg")).drop.reason == RejectReason.ROBOTS_DISALLOWED
    assert small.fetch(web.url("/late/a.jpg")).ok  # its rule lies past the limit: ignored (RFC 9309 2.5)
    assert fetcher().fetch(web.url("/late/a.jpg")).drop.reason == RejectReason.ROBOTS_DISALLOWED


def test_an_unreachable_host_is_a_host_failure_not_an_opt_out(tmp_path, fetcher):
    with ManyHostWeb([HostSpec(refuse=True), HostSpec(hang=True)], tmp_path) as web:
        f = fetcher(timeout_s=0.3)
        refused = [f.fetch(web.image_url(0, n)) for n in range(2)]
        hung = f.fetch(web.image_url(1, 0))
        hang_log = web.log(1)
    assert [(r.drop.reason, r.host_failure, r.requests) for r in refused] == [(RejectReason.CONNECTION_ERROR, True, 1)] * 2
    assert "robots.txt" in refused[0].drop.detail
    assert (hung.drop.reason, hung.host_failure) == (RejectReason.TIMEOUT, True)
    assert [e.path for e in hang_log] == ["/robots.txt"]
    assert len(f._opt_outs) == 0  # nothing remembered: the next row asks again


def test_a_throttled_robots_txt_passes_its_retry_after_on_and_is_asked_again(tmp_path, fetcher):
    spec = HostSpec(routes={})
    with ManyHostWeb([spec], tmp_path, image_size=(16, 16)) as web:
        spec.routes["/robots.txt"] = Route(b"slow down", status=429, headers={"Retry-After": "9"}, content_type="text/plain")
        f = fetcher(tdmrep=False)
        throttled = f.fetch(web.image_url(0, 0))
        del spec.routes["/robots.txt"]  # 404 from now on: allow all
        later = f.fetch(web.image_url(0, 1))
        paths = [e.path for e in web.log(0)]
    assert (throttled.drop.reason, throttled.http_status, throttled.retry_after_s) == (RejectReason.HTTP_ERROR, 429, 9.0)
    assert "robots.txt: HTTP 429" in throttled.drop.detail
    assert not throttled.host_failure
    assert later.ok
    assert paths == ["/robots.txt", "/robots.txt", "/images/1.jpg"]


def test_robots_txt_is_fetched_once_per_host_under_concurrency(tmp_path, fetcher):
    slow = Route(b"User-agent: *\nDisallow: /private/\n", content_type="text/plain", delay_s=0.3)
    with ManyHostWeb([HostSpec(robots=slow), HostSpec(robots=slow)], tmp_path, image_size=(16, 16)) as web:
        f = fetcher()
        urls = [web.image_url(n % 2, n) for n in range(16)] + [web.url(0, "/private/a.jpg")]
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            results = list(pool.map(f.fetch, urls))
        logs = [web.log(i) for i in range(2)]
    assert all(r.ok for r in results[:16]) and results[16].drop.reason == RejectReason.ROBOTS_DISALLOWED
    for log in logs:
        paths = [e.path for e in log]
        assert (paths.count("/robots.txt"), paths.count("/.well-known/tdmrep.json")) == (1, 1)
        assert paths[0] == "/robots.txt"  # no image request before the verdict
    assert sum(r.requests for r in results) == 16 + 2 * 2  # only the thread that fetched a file is charged


def test_robots_fetches_reach_no_private_address_without_allow_private_network(web, loopback_only):
    web.add("/robots.txt", b"User-agent: *\nAllow: /\n", content_type="text/plain")
    result = Fetcher(CrawlConfig(), opt_outs=OptOutCache()).fetch(web.url("/a.jpg"))
    assert result.drop.reason == RejectReason.PRIVATE_ADDRESS
    assert web.request_count == 0 and loopback_only == []


# -- TDMRep --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "reserved"),
    [
        ({"tdm-reservation": "1"}, True),
        ({"TDM-Reservation": " 1 ", "tdm-policy": "https://example.com/policy.json"}, True),
        ({"tdm-reservation": "0"}, False),
        ({}, False),
    ],
)
def test_tdm_reservation_header(web, fetcher, headers, reserved):
    web.add("/a.jpg", b"a", headers=headers)
    result = fetcher().fetch(web.url("/a.jpg"))
    assert (result.drop is not None and result.drop.reason == RejectReason.TDM_RESERVED) == reserved
    if "tdm-policy" in headers:
        assert "https://example.com/policy.json" in result.drop.detail
    assert fetcher(tdmrep=False).fetch(web.url("/a.jpg")).ok


def test_tdmrep_json_rules_first_match_wins(web, fetcher):
    rules = [
        {"location": "/images/free/*", "tdm-reservation": 0},
        {"location": "/images/*.png$", "tdm-reservation": 1, "tdm-policy": "https://example.com/tdm.json"},
        {"location": "/images/", "tdm-reservation": 1},
    ]
    web.add("/.well-known/tdmrep.json", json.dumps(rules).encode(), content_type="application/json")
    paths = ["/images/free/a.png", "/images/a.png", "/images/a.png?x", "/images/a.jpg", "/other.jpg"]
    for path in paths:
        web.add(path, b"a")
    f = fetcher()
    assert verdicts(f, web, paths) == {
        "/images/free/a.png": None,
        "/images/a.png": "tdm_reserved",
        "/images/a.png?x": "tdm_reserved",  # the third rule: /images/ is a prefix
        "/images/a.jpg": "tdm_reserved",
        "/other.jpg": None,
    }
    assert "https://example.com/tdm.json" in f.fetch(web.url("/images/a.png")).drop.detail
    assert web.requests_to("/.well-known/tdmrep.json") == 1
    assert (web.requests_to("/images/a.png"), web.requests_to("/other.jpg")) == (0, 1)
    assert fetcher(tdmrep=False).fetch(web.url("/images/a.jpg")).ok
    assert web.requests_to("/.well-known/tdmrep.json") == 1


@pytest.mark.parametrize(
    "body", [b"not json", b'{"location": "/", "tdm-reservation": 1}', b'[{"tdm-reservation": 1}]', b"\xff\xfe"]
)
def test_a_malformed_tdmrep_json_reserves_nothing(web, fetcher, body):
    web.add("/.well-known/tdmrep.json", body, content_type="application/json")
    web.add("/a.jpg", b"a")
    assert fetcher().fetch(web.url("/a.jpg")).ok


@pytest.mark.parametrize("status", [404, 500, 503])
def test_a_failing_tdmrep_json_reserves_nothing(web, fetcher, status):
    web.add("/.well-known/tdmrep.json", b'[{"location": "/", "tdm-reservation": 1}]', status=status)
    web.add("/a.jpg", b"a")
    assert fetcher().fetch(web.url("/a.jpg")).ok


def test_tdmrep_json_redirected_to_a_private_address_is_not_fetched(web, loopback_only):
    web.add_redirect("/.well-known/tdmrep.json", "http://169.254.169.254/tdmrep.json")
    web.add("/a.jpg", b"a")
    fetcher = Fetcher(CrawlConfig(), address_check=loopback_is_public, opt_outs=OptOutCache())
    assert fetcher.fetch(web.url("/a.jpg")).ok
    assert loopback_only == []


def test_tdmrep_json_is_asked_only_when_robots_txt_allows(web, fetcher):
    serve_robots(web, "User-agent: *\nDisallow: /\n", "/a.jpg")
    fetcher().fetch(web.url("/a.jpg"))
    assert web.requests_to("/.well-known/tdmrep.json") == 0


def test_location_patterns():
    assert location_pattern("/a/*.jpg$").match("/a/b/c.jpg")
    assert not location_pattern("/a/*.jpg$").match("/a/b/c.jpg?x")
    assert location_pattern("/a/").match("/a/b")
    assert not location_pattern("/a/").match("/b/a/")
    assert location_pattern("/a.b").match("/a.b") and not location_pattern("/a.b").match("/axb")
    rules = parse_tdmrep("http://h", b'[{"location": "images/", "tdm-reservation": "1"}]')
    assert rules.reserved("http://h/images/a.jpg") is not None


def test_a_fetcher_with_its_own_cache_pickles_with_an_empty_one(web, fetcher):
    serve_robots(web, "User-agent: *\nDisallow: /\n", "/a.jpg")
    f = fetcher()
    assert f.fetch(web.url("/a.jpg")).drop.reason == RejectReason.ROBOTS_DISALLOWED
    copy = pickle.loads(pickle.dumps(f))
    assert len(f._opt_outs) == 1 and len(copy._opt_outs) == 0
    assert copy.fetch(web.url("/a.jpg")).drop.reason == RejectReason.ROBOTS_DISALLOWED
    assert web.requests_to("/robots.txt") == 2


def test_rows_waiting_for_a_failed_robots_fetch_share_its_reason_but_not_its_failure(tmp_path, fetcher):
    with ManyHostWeb([HostSpec(hang=True)], tmp_path) as web:
        f = fetcher(timeout_s=0.5)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            results = list(pool.map(f.fetch, [web.image_url(0, n) for n in range(4)]))
        paths = [e.path for e in web.log(0)]
    assert {r.drop.reason for r in results} == {RejectReason.TIMEOUT}
    assert sorted((r.host_failure, r.requests) for r in results) == [(False, 0)] * 3 + [(True, 1)]
    assert paths == ["/robots.txt"]


def wait_for_a_request(web, host: int) -> None:
    deadline = time.monotonic() + 5
    while not web.log(host):
        assert time.monotonic() < deadline, "no request reached the host"
        time.sleep(0.01)


def test_a_hedged_probe_sends_its_own_robots_fetch_and_counts_its_own_failure(tmp_path, fetcher):
    # The scheduler's further probe of a silent host (hedge=True) does not wait
    # on the robots.txt fetch already in flight: each probe is a request, so
    # each counts towards declaring the host down.
    with ManyHostWeb([HostSpec(hang=True)], tmp_path) as web:
        f = fetcher(timeout_s=0.5)
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            first = pool.submit(f.fetch, web.image_url(0, 0))
            wait_for_a_request(web, 0)
            hedged = [pool.submit(f.fetch, web.image_url(0, n), hedge=True) for n in (1, 2)]
            results = [first.result(), *(h.result() for h in hedged)]
        paths = [e.path for e in web.log(0)]
    assert [(r.drop.reason, r.host_failure, r.requests) for r in results] == [(RejectReason.TIMEOUT, True, 1)] * 3
    assert paths == ["/robots.txt"] * 3


def test_a_hedged_probe_of_a_host_that_answers_goes_on_with_its_rules(tmp_path, fetcher):
    slow = Route(b"User-agent: *\nDisallow: /private/\n", content_type="text/plain", delay_s=0.3)
    with ManyHostWeb([HostSpec(robots=slow)], tmp_path, image_size=(16, 16)) as web:
        f = fetcher(tdmrep=False)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(f.fetch, web.image_url(0, 0))
            wait_for_a_request(web, 0)
            hedged = pool.submit(f.fetch, web.url(0, "/private/a.jpg"), hedge=True)
            results = [first.result(), hedged.result()]
        paths = sorted(e.path for e in web.log(0))
    assert results[0].ok and results[1].drop.reason == RejectReason.ROBOTS_DISALLOWED
    assert paths == ["/images/0.jpg", "/robots.txt", "/robots.txt"]

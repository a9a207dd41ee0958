"""stages.core.fetch and stages.core.address: the crawler's address policy
(SSRF): private addresses refused before any request, every redirect hop
checked, connections pinned to the checked address. Against LocalWeb on
127.0.0.1, behind the guard against non-loopback traffic."""

from __future__ import annotations

import ipaddress
import ssl

import pytest

from schemas import CrawlConfig, RejectReason
from stages.core import connections
from stages.core.address import non_public_reason
from stages.core.fetch import Fetcher
from stages.core.robots import OptOutCache
from tests.stages.crawl_helpers import LOCAL, loopback_is_public

pytestmark = pytest.mark.usefixtures("loopback_only")


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
    (DNS rebinding), with the DNS cache off: the first request goes out, the
    redirect to the same name is refused because its hop is resolved and
    checked again."""
    web.add_redirect("/r", "/again")
    answers = iter([["127.0.0.1"], ["169.254.169.254"]])
    config = CrawlConfig(dns_cache_ttl_s=0, robots_txt=False, tdmrep=False)
    fetcher = Fetcher(config, resolver=lambda host, port: next(answers), address_check=loopback_is_public)
    result = fetcher.fetch(f"http://rebind.example:{web.port}/r")
    assert result.drop.reason == RejectReason.PRIVATE_ADDRESS
    assert (web.requests_to("/r"), web.requests_to("/again")) == (1, 0)
    assert loopback_only == []


def test_with_the_dns_cache_every_hop_uses_the_address_checked_first(web, loopback_only):
    """With the cache on, the name is resolved once: a rebinding answer is never
    even asked for, and every hop (robots.txt included) goes to the checked address."""
    web.add_redirect("/r", "/again")
    web.add("/again", b"same address")
    answers = iter([["127.0.0.1"], ["169.254.169.254"]])
    fetcher = Fetcher(
        CrawlConfig(), resolver=lambda host, port: next(answers), address_check=loopback_is_public, opt_outs=OptOutCache()
    )
    result = fetcher.fetch(f"http://rebind.example:{web.port}/r")
    assert result.data == b"same address"
    assert (web.requests_to("/r"), web.requests_to("/again"), web.requests_to("/robots.txt")) == (1, 1, 1)
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
    monkeypatch.setattr(connections, "tls_context", lambda: context)
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

"""Address policy of the crawler: which IP addresses may be fetched from
(public unicast only), name resolution that returns every address so each
one can be checked, and the URL splitting (`split_url`, `quote_component`)
that decides which host and port a URL names. Plain Python, no Beam; used by `stages/core/fetch.py`.

Refused, with the reason the reject row's detail carries:

- every block of the IANA IPv4 and IPv6 Special-Purpose Address Registries
  (RFC 6890 and its updates), listed below by name and RFC, whatever the
  registry's "globally reachable" column says: none of them hosts web content,
  and several (AS112, AMT, anycast relays) are infrastructure a crawler has no
  business touching;
- blocks the registries do not list but that must never be fetched from:
  multicast, the deprecated IPv6 site-local `fec0::/10` (RFC 3879), the
  deprecated IPv4-compatible IPv6 addresses `::/96`, and the 6to4 relay
  anycast block;
- the translation forms that carry an IPv4 address in their low bits
  (IPv4-mapped `::ffff:0:0/96`, NAT64 `64:ff9b::/96`, 6to4 `2002::/16`) are
  judged by the IPv4 address they reach: `64:ff9b::808:808` is as public as
  8.8.8.8, `::ffff:10.0.0.1` as private as 10.0.0.1.

The table is explicit because Python's `ipaddress` changes with the
interpreter's patch release: 3.11 counts `fec0::/10`, `192.0.0.0/24`'s anycast
addresses and `3fff::/20` as global. `ipaddress`'s own flags are still checked
after the table, so a block it learns about later is refused too.
"""

from __future__ import annotations

import ipaddress
import socket
import urllib.parse
from typing import NamedTuple

from schemas import RejectReason
from stages.core.verdict import Drop

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
SCHEMES = {"http": 80, "https": 443}


class SpecialBlock(NamedTuple):
    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    name: str
    reference: str


def _blocks(rows: list[tuple[str, str, str]]) -> tuple[SpecialBlock, ...]:
    return tuple(SpecialBlock(ipaddress.ip_network(cidr), name, ref) for cidr, name, ref in rows)


SPECIAL_BLOCKS: tuple[SpecialBlock, ...] = _blocks([
    # IPv4 Special-Purpose Address Registry
    ("0.0.0.0/8", "this network", "RFC 791"),
    ("10.0.0.0/8", "private", "RFC 1918"),
    ("100.64.0.0/10", "shared address space (carrier-grade NAT)", "RFC 6598"),
    ("127.0.0.0/8", "loopback", "RFC 1122"),
    ("169.254.0.0/16", "link-local", "RFC 3927"),
    ("172.16.0.0/12", "private", "RFC 1918"),
    ("192.0.0.0/24", "IETF protocol assignments", "RFC 6890"),
    ("192.0.2.0/24", "documentation (TEST-NET-1)", "RFC 5737"),
    ("192.31.196.0/24", "AS112-v4", "RFC 7535"),
    ("192.52.193.0/24", "AMT", "RFC 7450"),
    ("192.88.99.0/24", "deprecated 6to4 relay anycast", "RFC 7526"),
    ("192.168.0.0/16", "private", "RFC 1918"),
    ("192.175.48.0/24", "direct delegation AS112 service", "RFC 7534"),
    ("198.18.0.0/15", "benchmarking", "RFC 2544"),
    ("198.51.100.0/24", "documentation (TEST-NET-2)", "RFC 5737"),
    ("203.0.113.0/24", "documentation (TEST-NET-3)", "RFC 5737"),
    ("224.0.0.0/4", "multicast", "RFC 5771"),
    ("255.255.255.255/32", "limited broadcast", "RFC 919"),  # before 240.0.0.0/4: the first match names the block
    ("240.0.0.0/4", "reserved", "RFC 1112"),
    # IPv6 Special-Purpose Address Registry
    ("::/96", "unspecified, loopback and deprecated IPv4-compatible", "RFC 4291"),
    ("64:ff9b:1::/48", "local-use IPv4/IPv6 translation", "RFC 8215"),
    ("100::/64", "discard-only", "RFC 6666"),
    ("100:0:0:1::/64", "dummy IPv6 prefix", "RFC 9780"),
    ("2001::/23", "IETF protocol assignments (Teredo, benchmarking, ORCHID, AMT, AS112, ...)", "RFC 2928"),
    ("2001:db8::/32", "documentation", "RFC 3849"),
    ("2620:4f:8000::/48", "direct delegation AS112 service", "RFC 7534"),
    ("3fff::/20", "documentation", "RFC 9637"),
    ("5f00::/16", "segment routing (SRv6) SIDs", "RFC 9602"),
    ("fc00::/7", "unique local", "RFC 4193"),
    ("fe80::/10", "link-local", "RFC 4291"),
    ("fec0::/10", "deprecated site-local", "RFC 3879"),
    ("ff00::/8", "multicast", "RFC 4291"),
])

# The translation prefixes whose low 32 bits are an IPv4 address (RFC 6052).
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def special_block(ip: IPAddress) -> SpecialBlock | None:
    """The special-purpose block `ip` falls in, or None."""
    for block in SPECIAL_BLOCKS:
        if block.network.version == ip.version and ip in block.network:
            return block
    return None


def non_public_reason(ip: IPAddress) -> str | None:
    """Why `ip` must not be fetched from, or None if it is a public unicast address."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return _embedded_reason(ip, ip.ipv4_mapped)
        if ip in _NAT64:
            return _embedded_reason(ip, ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        # 6to4 is itself global unicast, but must not tunnel to a non-public IPv4 address.
        if ip.sixtofour is not None and (why := _embedded_reason(ip, ip.sixtofour)):
            return why
    block = special_block(ip)
    if block is not None:
        return f"{block.name} ({block.network}, {block.reference})"
    for name in ("loopback", "unspecified", "link_local", "multicast", "private", "reserved"):
        if getattr(ip, f"is_{name}"):
            return name.replace("_", "-")
    if not ip.is_global:
        return "not globally routable"
    return None


def _embedded_reason(ip: ipaddress.IPv6Address, ipv4: ipaddress.IPv4Address) -> str | None:
    why = non_public_reason(ipv4)
    return None if why is None else f"{why}; {ipv4} embedded in {ip}"


def resolve(host: str, port: int) -> list[str]:
    """All addresses `host` resolves to for TCP, in the resolver's order, without
    duplicates. Raises `socket.gaierror` when it does not resolve. Literal IPs,
    and the odd IPv4 forms the C library accepts (`0x7f000001`, `2130706433`,
    `127.1`), come back as the address they denote."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def split_url(url: str) -> tuple[urllib.parse.SplitResult, str, int] | Drop:
    """(parts, ASCII lowercase host, port) of an http(s) URL, or why not."""
    try:
        parts = urllib.parse.urlsplit(url.strip())
        scheme = parts.scheme.lower()
        if scheme not in SCHEMES:
            return Drop(RejectReason.UNSUPPORTED_SCHEME, f"scheme {parts.scheme!r} in {url!r}")
        host = parts.hostname
        port = parts.port or SCHEMES[scheme]
        if not host:
            return Drop(RejectReason.MALFORMED_URL, f"no host in {url!r}")
        ascii_host = host if host.isascii() else host.encode("idna").decode("ascii")
    except (ValueError, UnicodeError) as exc:
        return Drop(RejectReason.MALFORMED_URL, f"{url!r}: {exc}")
    return parts, ascii_host.lower(), port


def quote_component(component: str) -> str:
    """Percent-encode what may not appear raw in a request line (spaces,
    controls, non-ASCII as UTF-8); existing escapes and reserved characters
    are kept, so an already valid URL is unchanged."""
    return urllib.parse.quote(component, safe="/%:@!$&'()*+,;=?[]~")


def host_of(url: str) -> str | None:
    """The ASCII lowercase host name of an http(s) URL, or None."""
    split = split_url(url)
    return None if isinstance(split, Drop) else split[1]

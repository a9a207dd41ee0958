"""Address policy of the crawler: which IP addresses may be fetched from
(public unicast only), and name resolution that returns every address so each
one can be checked. Plain Python, no Beam; used by `stages/core/fetch.py`.

Refused (`non_public_reason` says why): loopback, RFC 1918 private, carrier-grade
NAT, link-local (incl. the 169.254.169.254 cloud metadata service), multicast,
reserved, unspecified, and IPv6 forms that embed one of those (IPv4-mapped,
6to4, NAT64).
"""

from __future__ import annotations

import ipaddress
import socket

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# NAT64 well-known prefix (RFC 6052): the last 32 bits are an IPv4 address.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def non_public_reason(ip: IPAddress) -> str | None:
    """Why `ip` must not be fetched from, or None if it is a public unicast address.

    Follows the IANA special-purpose registries as Python's `ipaddress` encodes
    them (`is_global`), and additionally refuses multicast (which `is_global`
    allows) and IPv6 addresses that embed a non-public IPv4 address
    (IPv4-mapped `::ffff:a.b.c.d`, 6to4 `2002::/16`, NAT64 `64:ff9b::/96`).
    """
    if isinstance(ip, ipaddress.IPv6Address):
        # These reach the IPv4 address in their low bits: judge that one.
        if ip.ipv4_mapped is not None:
            return _embedded_reason(ip, ip.ipv4_mapped)
        if ip in _NAT64:
            return _embedded_reason(ip, ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        # 6to4 is itself global unicast, but must not tunnel to a private IPv4 address.
        if ip.sixtofour is not None and (why := _embedded_reason(ip, ip.sixtofour)):
            return why
    for name in ("loopback", "unspecified", "link_local", "multicast", "private", "reserved"):
        if getattr(ip, f"is_{name}"):
            return name.replace("_", "-")
    if not ip.is_global:
        return "not globally routable"
    return None


def _embedded_reason(ip: ipaddress.IPv6Address, ipv4: ipaddress.IPv4Address) -> str | None:
    why = non_public_reason(ipv4)
    return None if why is None else f"{why} ({ipv4} embedded in {ip})"


def resolve(host: str, port: int) -> list[str]:
    """All addresses `host` resolves to for TCP, in the resolver's order, without
    duplicates. Raises `socket.gaierror` when it does not resolve. Literal IPs,
    and the odd IPv4 forms the C library accepts (`0x7f000001`, `2130706433`,
    `127.1`), come back as the address they denote."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))

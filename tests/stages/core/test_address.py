"""The crawler's address policy: one address inside every refused block, and
public addresses next to them that must stay allowed."""

import ipaddress

import pytest

from stages.core.address import SPECIAL_BLOCKS, non_public_reason, special_block

# An address inside each block the policy names, with the block's name in the reason.
INSIDE = {
    "0.0.0.0/8": "0.1.2.3",
    "10.0.0.0/8": "10.1.2.3",
    "100.64.0.0/10": "100.127.255.254",
    "127.0.0.0/8": "127.0.0.1",
    "169.254.0.0/16": "169.254.169.254",
    "172.16.0.0/12": "172.31.255.255",
    "192.0.0.0/24": "192.0.0.9",  # PCP anycast: "globally reachable" in the registry, refused all the same
    "192.0.2.0/24": "192.0.2.1",
    "192.31.196.0/24": "192.31.196.1",
    "192.52.193.0/24": "192.52.193.1",
    "192.88.99.0/24": "192.88.99.1",
    "192.168.0.0/16": "192.168.0.1",
    "192.175.48.0/24": "192.175.48.1",
    "198.18.0.0/15": "198.19.255.255",
    "198.51.100.0/24": "198.51.100.7",
    "203.0.113.0/24": "203.0.113.7",
    "224.0.0.0/4": "224.0.1.1",
    "240.0.0.0/4": "240.0.0.1",
    "255.255.255.255/32": "255.255.255.255",
    "::/96": "::1.2.3.4",
    "64:ff9b:1::/48": "64:ff9b:1::808:808",
    "100::/64": "100::1",
    "100:0:0:1::/64": "100:0:0:1::1",
    "2001::/23": "2001:2::1",
    "2001:db8::/32": "2001:db8::1",
    "2620:4f:8000::/48": "2620:4f:8000::1",
    "3fff::/20": "3fff::1",
    "5f00::/16": "5f00::1",
    "fc00::/7": "fd00::1",
    "fe80::/10": "fe80::1",
    "fec0::/10": "fec0::1",
    "ff00::/8": "ff02::1",
}


def test_every_block_has_a_case():
    assert set(INSIDE) == {str(block.network) for block in SPECIAL_BLOCKS}


@pytest.mark.parametrize(("cidr", "address"), sorted(INSIDE.items()))
def test_each_special_purpose_block_is_refused(cidr, address):
    ip = ipaddress.ip_address(address)
    block = special_block(ip)
    assert block is not None and str(block.network) == cidr
    reason = non_public_reason(ip)
    assert reason is not None and block.name in reason and block.reference in reason


@pytest.mark.parametrize(
    "address",
    ["::", "::1", "fe80::2", "2001::1", "2001:20::1", "2001:3::1", "2001:4:112::1"],
)
def test_loopback_unspecified_and_ietf_sub_blocks_are_refused(address):
    assert non_public_reason(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("1.1.1.1", True),
        ("192.0.1.1", True),  # just past 192.0.0.0/24
        ("198.20.0.1", True),  # just past 198.18.0.0/15
        ("223.255.255.254", True),
        ("2606:4700:4700::1111", True),
        ("2001:200::1", True),  # just past 2001::/23
        ("::ffff:8.8.8.8", True),  # IPv4-mapped: judged by the IPv4 address
        ("64:ff9b::808:808", True),  # NAT64 to a public address
        ("2002:808:808::1", True),  # 6to4 of a public address
        ("::ffff:10.0.0.1", False),
        ("::ffff:192.0.0.9", False),
        ("2002:a00:1::", False),
        ("64:ff9b::a9fe:a9fe", False),
        ("64:ff9b::c000:9", False),  # NAT64 to 192.0.0.9
    ],
)
def test_public_addresses_and_embedded_ipv4(address, public):
    assert (non_public_reason(ipaddress.ip_address(address)) is None) == public


def test_embedded_reason_names_both_addresses():
    reason = non_public_reason(ipaddress.ip_address("::ffff:10.0.0.1"))
    assert "10.0.0.1" in reason and "::ffff:a00:1" in reason and "private" in reason

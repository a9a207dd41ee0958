"""Builders shared by the fetch and crawl tests (their fixtures, LocalWeb on
127.0.0.1 and the guard against non-loopback traffic, are in `tests/stages/conftest.py`)."""

from __future__ import annotations

import socket

from schemas import CrawlConfig, Provenance, SampleRecord
from stages.core.address import non_public_reason

LOCAL = CrawlConfig(allow_private_network=True, timeout_s=2.0)


def loopback_is_public(ip):
    """An address check for tests: loopback counts as public, the rest as usual."""
    return None if ip.is_loopback else non_public_reason(ip)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def record(key: str, url: str, row: int = 0) -> SampleRecord:
    return SampleRecord(
        key=key, url=url, caption_original="a photo of a cat", provenance=Provenance(source_file="in.csv", source_row=row)
    )

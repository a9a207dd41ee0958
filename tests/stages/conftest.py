"""Fixtures of the fetch and crawl tests: a LocalWeb on 127.0.0.1 and a guard
that refuses (and records) every connection to a non-loopback address. Test
modules that fetch turn the guard on for every test with
`pytestmark = pytest.mark.usefixtures("loopback_only")`."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from pipelines.testing.localweb import LocalWeb
from stages.core.robots import OPT_OUT_CACHE


@pytest.fixture
def loopback_only(monkeypatch) -> list[str]:
    """Refuse (and record) every connection attempt to a non-loopback address."""
    real = socket.create_connection
    refused: list[str] = []

    def guarded(address, *args, **kwargs):
        host = address[0]
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            refused.append(host)
            raise ConnectionRefusedError(f"test guard: no traffic to {host}")
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", guarded)
    return refused


@pytest.fixture
def web():
    with LocalWeb() as server:
        yield server


@pytest.fixture(autouse=True)
def _fresh_opt_out_cache():
    """robots.txt / tdmrep.json verdicts are kept per process, keyed by host and
    port; test servers reuse ports, so no test may see another's verdicts."""
    OPT_OUT_CACHE.clear()
    yield
    OPT_OUT_CACHE.clear()

"""CrawlUnitsDoFn driven by hand (setup, bundles of several crawl keys,
finish_bundle), without a runner, so the order in which results come back
can be forced."""

from __future__ import annotations

import io
import time

import apache_beam as beam
import pytest
from apache_beam.utils.windowed_value import WindowedValue
from PIL import Image

from schemas import CheckpointConfig, DecodeConfig, SampleRecord
from stages import units
from stages.units import CrawlUnitsDoFn, committed_parts
from tests.stages.crawl_helpers import LOCAL, record

pytestmark = pytest.mark.usefixtures("loopback_only")


def _jpeg(seed: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (96, 64), (seed * 40 % 256, 90, 160)).save(out, "JPEG")
    return out.getvalue()


def _unwrap(output):
    """An output of process or finish_bundle -> (tag, value)."""
    tag = None
    if isinstance(output, beam.pvalue.TaggedOutput):
        tag, output = output.tag, output.value
    if isinstance(output, WindowedValue):
        output = output.value
    return tag, output


def _run_bundle(dofn: CrawlUnitsDoFn, elements) -> list:
    dofn.start_bundle()
    outputs = []
    for element in elements:
        outputs += [_unwrap(o) for o in dofn.process(element)]
    outputs += [_unwrap(o) for o in (dofn.finish_bundle() or [])]
    return outputs


def _wait_for_each_result(monkeypatch):
    """Every offered row's result is ready before `process` goes on, so a key's
    last result is always collected by the `process` call that fed it."""
    offer = units._Feed.offer

    def offer_and_wait(self, item, timeout=0.05):
        ready = self._outbox.qsize()
        accepted = offer(self, item, timeout)
        if accepted and item is not units._END:
            deadline = time.monotonic() + 10
            while self._outbox.qsize() <= ready and time.monotonic() < deadline:
                time.sleep(0.005)
        return accepted

    monkeypatch.setattr(units._Feed, "offer", offer_and_wait)


@pytest.mark.parametrize("results_before_the_last_collect", [False, True])
def test_every_row_of_every_key_leaves_once_and_is_committed(tmp_path, web, monkeypatch, results_before_the_last_collect):
    if results_before_the_last_collect:
        _wait_for_each_result(monkeypatch)
    keys = {f"g{k:05d}": [] for k in range(4)}
    for i in range(13):
        path = f"/img/{i}.jpg"
        if i % 5 == 4:
            web.add(path, b"gone", status=404, content_type="text/plain")
        else:
            web.add(path, _jpeg(i))
        keys[f"g{i % 4:05d}"].append(record(f"{i:04d}", web.url(path), row=i))
    crawl = LOCAL.model_copy(update={"max_host_rate": 1000.0})  # one host here: no need to pace it
    dofn = CrawlUnitsDoFn(str(tmp_path), crawl, DecodeConfig(min_side=0), CheckpointConfig(rows=2), max_error_rate=1.0)
    dofn.setup()
    try:
        outputs = _run_bundle(dofn, list(keys.items()))
    finally:
        dofn.teardown()

    kept = sorted(v.key for tag, v in outputs if tag is None)
    rejected = sorted((v.key, v.reason.value) for tag, v in outputs if tag == "rejects")
    assert all(isinstance(v, SampleRecord) and v.image_ref for tag, v in outputs if tag is None)
    assert kept == [f"{i:04d}" for i in range(13) if i % 5 != 4]
    assert rejected == [(f"{i:04d}", "http_error") for i in range(13) if i % 5 == 4]
    # Every row is in exactly one committed part of its own key.
    for crawl_key, rows in keys.items():
        committed = [item.key for path in committed_parts(str(tmp_path), crawl_key) for item in units.read_part(path)]
        assert sorted(committed) == sorted(r.key for r in rows), crawl_key


def test_fetching_threads_move_on_while_decoding_waits_and_only_so_many_bodies_wait(tmp_path, web, monkeypatch):
    """Decoding runs apart from the fetching threads (`AfterFetch`): with every
    decode held back, the 2 fetching threads still fetch 2 bodies for the
    decode queue's 2 slots and 2 more that wait for a slot, and no further one."""
    import threading

    from stages.resolution import DecodeDoFn

    gate = threading.Event()
    decode = DecodeDoFn._decode

    def held_decode(self, element):
        if not gate.wait(20):
            raise TimeoutError("the test never opened the gate")
        return decode(self, element)

    monkeypatch.setattr(DecodeDoFn, "_decode", held_decode)
    paths = [f"/img/{i}.jpg" for i in range(8)]
    for i, path in enumerate(paths):
        web.add(path, _jpeg(i))
    crawl = LOCAL.model_copy(update={"threads": 2, "max_host_rate": 1000.0, "robots_txt": False, "tdmrep": False})
    decoding = DecodeConfig(min_side=0, threads=1)
    dofn = CrawlUnitsDoFn(str(tmp_path), crawl, decoding, CheckpointConfig(rows=100), max_error_rate=1.0)
    dofn.setup()
    outputs: list = []
    bundle = threading.Thread(
        target=lambda: outputs.extend(_run_bundle(dofn, [("g00000", [record(f"{i:04d}", web.url(p), row=i) for i, p in enumerate(paths)])]))
    )
    try:
        bundle.start()
        fetched = lambda: sum(web.requests_to(p) for p in paths)  # noqa: E731
        deadline = time.monotonic() + 10
        while fetched() < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.5)  # time enough for a fifth request, were one allowed
        # Decoding on the fetching threads would have stopped at 2 requests.
        assert fetched() == 4
        gate.set()
        bundle.join(30)
        assert not bundle.is_alive()
    finally:
        gate.set()
        dofn.teardown()
    assert sorted(v.key for tag, v in outputs if tag is None) == [f"{i:04d}" for i in range(8)]
    assert fetched() == 8


def test_a_decode_that_raises_is_an_internal_error_reject_of_its_row_alone(tmp_path, web, monkeypatch):
    from stages.resolution import DecodeDoFn

    decode = DecodeDoFn._decode

    def broken(self, element):
        if element.record.key == "0001":
            raise ZeroDivisionError("a bug in the decoder")
        return decode(self, element)

    monkeypatch.setattr(DecodeDoFn, "_decode", broken)
    for i in range(3):
        web.add(f"/img/{i}.jpg", _jpeg(i))
    rows = [record(f"{i:04d}", web.url(f"/img/{i}.jpg"), row=i) for i in range(3)]
    dofn = CrawlUnitsDoFn(str(tmp_path), LOCAL, DecodeConfig(min_side=0, threads=2), CheckpointConfig(), max_error_rate=1.0)
    dofn.setup()
    try:
        outputs = _run_bundle(dofn, [("g00000", rows)])
    finally:
        dofn.teardown()
    assert sorted(v.key for tag, v in outputs if tag is None) == ["0000", "0002"]
    [reject] = [v for tag, v in outputs if tag == "rejects"]
    assert reject.key == "0001" and reject.reason.value == "internal_error" and "ZeroDivisionError" in reject.detail

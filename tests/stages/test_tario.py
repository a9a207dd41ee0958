"""stages/core/tario.py: the one tar index (truncation at every cut), the handle cache,
range reads and retries."""

from __future__ import annotations

import io
import pickle

import pytest
import webdataset

from stages.core.tario import (
    OpenFiles,
    RangeReader,
    ShortReadError,
    TruncatedTarError,
    index_tar,
    open_url,
    scan_tar,
    with_retries,
)


def _shard(n: int = 4) -> bytes:
    buffer = io.BytesIO()
    with webdataset.TarWriter(buffer) as writer:
        for i in range(n):
            writer.write({"__key__": f"dir/k{i}", "JPG": bytes([i]) * (700 + 300 * i), "txt": f"caption {i}".encode(), "json": b"{}"})
    return buffer.getvalue()


def test_index_groups_members_by_key_with_lower_case_extensions():
    data = _shard()
    samples = index_tar(io.BytesIO(data), "s.tar")
    assert [s.key for s in samples] == [f"dir/k{i}" for i in range(4)]
    for i, sample in enumerate(samples):
        assert set(sample.members) == {"jpg", "txt", "json"} and sample.image_extension == "jpg"
        offset, size = sample.members["jpg"]
        assert data[offset : offset + size] == bytes([i]) * (700 + 300 * i)


def test_every_cut_gives_a_prefix_of_complete_samples_and_is_flagged():
    data = _shard()
    full = scan_tar(io.BytesIO(data), "s.tar")
    assert not full.truncated and len(full.samples) == 4
    end_of_members = max(o + n for s in full.samples for o, n in s.members.values())
    for cut in [*range(0, len(data), 97), *range(512, len(data), 512)]:
        try:
            found = scan_tar(io.BytesIO(data[:cut]), "s.tar")
        except TruncatedTarError:
            assert cut < 2048, cut  # only a cut inside the very first headers is unreadable
            continue
        assert found.samples == full.samples[: len(found.samples)], cut
        for sample in found.samples:  # every member of a kept sample is inside the file
            assert all(o + n <= cut for o, n in sample.members.values())
        if cut <= end_of_members:
            assert found.truncated and len(found.samples) < 4, cut
    with pytest.raises(TruncatedTarError, match="s.tar: truncated tar"):
        index_tar(io.BytesIO(data[: len(data) // 2]), "s.tar")


def test_open_files_keeps_at_most_limit_handles_and_pickles_without_them():
    closed = []

    class Handle:
        def __init__(self, path):
            self.path = path

        def close(self):
            closed.append(self.path)

    files = OpenFiles(Handle, limit=2)
    a = files.get("a")
    files.get("b")
    assert files.get("a") is a  # reused, and now most recently used
    files.get("c")  # evicts b, the least recently used
    assert closed == ["b"] and list(files.handles) == ["a", "c"]
    files.discard("a")
    assert closed == ["b", "a"]
    clone = pickle.loads(pickle.dumps(OpenFiles(open_url, limit=3)))
    assert clone.limit == 3 and not clone.handles


def test_range_reader_reads_exact_ranges_of_local_files(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(bytes(range(256)) * 4)
    reader = RangeReader(open_url, limit=1)
    assert reader.read(str(path), 10, 5) == bytes(range(10, 15))
    assert reader.read(str(path), 1020, 4) == bytes(range(252, 256))
    with pytest.raises(ShortReadError, match="expected 8 bytes at offset 1020, got 4"):
        reader.read(str(path), 1020, 8)
    with pytest.raises(FileNotFoundError):
        reader.read(str(tmp_path / "missing.bin"), 0, 1)
    reader.close()


def test_retries_transient_errors_but_not_permanent_ones():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset by peer")
        return "ok"

    assert with_retries(flaky, "flaky", base_delay_s=0.001) == "ok" and len(calls) == 3

    def gone():
        calls.append(1)
        raise FileNotFoundError("gone")

    calls.clear()
    with pytest.raises(FileNotFoundError):
        with_retries(gone, "gone", base_delay_s=0.001)
    assert len(calls) == 1

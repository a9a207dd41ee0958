"""Live progress of `beam run curate`: a line refreshed in place under a
pseudo-terminal, log lines when not a terminal, both fed by the pipeline's
counters and ending at the funnel's totals; Beam's harmless start-up warnings
silenced."""

from __future__ import annotations

import json
import logging
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipelines.testing import webcorpus
from pipelines.testing.localweb import LocalWeb

ROOT = Path(__file__).resolve().parents[2]
N_IMAGES = 30
DELAY_S = 0.25  # per image, 2 crawl threads: the crawl alone takes ~4 s
COUNTS = re.compile(r"read (\d+)  fetched (\d+)  kept (\d+)  rejected (\d+)")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def slow_web():
    """30 slow images, 3 missing (http_error), 2 empty captions, 2 exact duplicates."""
    with LocalWeb() as web:
        rows = []
        for i in range(N_IMAGES):
            data = webcorpus.jpeg(webcorpus.render(500 + i, (512, 512)))
            web.add(f"/img/{i}.jpg", data, delay_s=DELAY_S)
            rows.append({"url": web.url(f"/img/{i}.jpg"), "caption": f"a picture of shapes number {i}"})
            if i < 2:
                web.add(f"/copy/{i}.jpg", data, delay_s=DELAY_S)
                rows.append({"url": web.url(f"/copy/{i}.jpg"), "caption": f"the same picture again {i}"})
        rows += [{"url": web.url(f"/missing/{i}.jpg"), "caption": f"a picture that is gone {i}"} for i in range(3)]
        rows += [{"url": web.url(f"/img/{i}.jpg?alt"), "caption": ""} for i in range(2)]
        yield web, rows


def _inputs(tmp_path: Path, rows) -> list[str]:
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "urls.parquet")
    config = {"crawl": {"timeout_s": 5.0, "retries": 0, "threads": 2}, "shards": {"samples_per_shard": 8, "writers": 2}}
    (tmp_path / "curate.yaml").write_text(yaml.safe_dump(config))
    return [
        sys.executable, "-m", "pipelines.cli", "run", "curate", "--input", str(tmp_path / "urls.parquet"),
        "--output", str(tmp_path / "out"), "--config", str(tmp_path / "curate.yaml"), "--allow-private-network",
    ]  # fmt: skip


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="220", TERM="xterm")


def _funnel(out: Path) -> tuple[int, int, int]:
    report = json.loads((out / "report.json").read_text())
    assert report["accounting_ok"]
    return report["input_rows"], report["kept"], report["rejected"]


def test_progress_line_updates_in_place_under_a_terminal(tmp_path, slow_web):
    _, rows = slow_web
    master, slave = pty.openpty()
    proc = subprocess.Popen(_inputs(tmp_path, rows), stdin=slave, stdout=slave, stderr=slave, env=_env(), cwd=ROOT)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=60) == 0
    raw = b"".join(chunks).decode("utf-8", errors="replace")
    # Refreshed in place: carriage returns, no newline between updates.
    segments = [ANSI.sub("", s) for s in re.split(r"[\r\n]", raw)]
    seen = [tuple(map(int, m.groups())) for s in segments if (m := COUNTS.search(s))]
    assert "\r" in raw and len(set(seen)) >= 3, f"the line was not refreshed: {seen}"
    read, fetched, kept, rejected = zip(*seen)
    assert list(fetched) == sorted(fetched) and list(kept) == sorted(kept), "counts went backwards"
    final_fetched = fetched[-1]
    assert any(0 < f < final_fetched for f in fetched), f"no update while the crawl was running: {seen}"
    input_rows, funnel_kept, funnel_rejected = _funnel(tmp_path / "out")
    assert seen[-1] == (input_rows, N_IMAGES + 2, funnel_kept, funnel_rejected)
    assert (input_rows, funnel_kept, funnel_rejected) == (len(rows), N_IMAGES, 7)
    assert "apitools" not in raw and "Traceback" not in raw


def test_progress_logs_lines_when_not_a_terminal(tmp_path, slow_web):
    _, rows = slow_web
    argv = [*_inputs(tmp_path, rows), "--progress-interval", "1"]
    done = subprocess.run(argv, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("curate: ")]
    assert len(lines) >= 3, done.stderr[-2000:]
    assert "\r" not in done.stderr and "\x1b[" not in done.stderr
    assert any("img/s, ETA" in line for line in lines[:-1])
    last = COUNTS.search(lines[-1])
    assert lines[-1].endswith("done)") and last
    input_rows, kept, rejected = _funnel(tmp_path / "out")
    assert (int(last[1]), int(last[3]), int(last[4])) == (input_rows, kept, rejected)
    # Nothing but the run on stderr: no Beam start-up noise.
    assert [line for line in done.stderr.splitlines() if not line.startswith("curate: ")] == []


def test_progress_off_and_harmless_beam_warnings_filtered(capsys):
    from pipelines.cli import setup_logging

    setup_logging()
    logging.warning("apitools not found, and bigquery client libraries are not available despite the import not raising an ImportError.")
    logging.getLogger("x").warning("a real warning")
    err = capsys.readouterr().err
    assert "apitools" not in err


def test_counts_from_counters():
    from pipelines.progress import Counts

    counts = Counts.from_counters({
        ("read", "kept"): 9, ("read", "dropped_missing_url"): 1, ("caption", "kept"): 7, ("crawl", "kept"): 5,
        ("crawl", "dropped_timeout"): 1, ("shards", "samples"): 4, ("dedup", "dropped_exact_duplicate"): 1,
        ("url", "dropped_malformed_url"): 2,
    })  # fmt: skip
    assert (counts.read, counts.to_fetch, counts.fetch_done, counts.fetched, counts.kept, counts.rejected) == (10, 7, 6, 5, 4, 5)

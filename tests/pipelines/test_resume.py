"""Kill-and-resume and append: `beam run curate --resume` after a SIGKILL at
several points ends with exactly what an uninterrupted run gives and fetches
no committed row twice (counted by the local server); `--append` adds only
new images to a finished dataset and leaves its shards byte-identical."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipelines.cli import main
from pipelines.testing import webcorpus
from pipelines.testing.localweb import LocalWeb
from tests.portable import portable_runner

REPO_ROOT = Path(__file__).resolve().parents[2]
ROWS = 48
SAMPLES_PER_SHARD = 8


def _image(seed: int) -> bytes:
    return webcorpus.jpeg(webcorpus.render(seed, (640, 560)))


@pytest.fixture(scope="module")
def web():
    with LocalWeb(log_limit=100_000) as server:
        for i in range(ROWS):
            server.add(f"/img{i}.jpg", _image(1000 + i))
        # Three exact copies and a missing image, so dedup and crawl rejects are in the comparison.
        for i in range(3):
            server.add(f"/copy{i}.jpg", _image(1000 + i))
        yield server


def _rows(web, paths: list[str]) -> list[dict]:
    return [{"url": web.url(path), "caption": f"a photo of thing {path}", "width": 640, "height": 560} for path in paths]


def _write_input(folder: Path, name: str, rows: list[dict]) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def _config(folder: Path, rate: float) -> str:
    config = {
        "read": {"width_col": "width", "height_col": "height"},
        "crawl": {"timeout_s": 2.0, "threads": 4, "max_host_rate": rate, "max_per_host": 4},
        "checkpoint": {"rows": 6},
        "shards": {"samples_per_shard": SAMPLES_PER_SHARD, "writers": 2},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _curate_argv(urls: str, out: str, config: str, *extra: str) -> list[str]:
    return ["run", "curate", "--input", urls, "--output", out, "--config", config, "--allow-private-network",
            "--progress-interval", "0", *extra]


def _committed_keys(out: Path) -> set[str]:
    keys = set()
    for part in out.glob("_parts/*/*.jsonl"):
        for line in part.read_text().splitlines():
            item = json.loads(line)
            keys.add((item.get("record") or item.get("reject"))["key"])
    return keys


def _outcome(out: Path) -> dict:
    """What must match between an interrupted-and-resumed run and an uninterrupted one."""
    index = pq.read_table(out / "index.parquet").to_pylist()
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    report = json.loads((out / "report.json").read_text())
    members = collections.Counter()
    for tar in (out / "shards").glob("*.tar"):
        manifest = json.loads(tar.with_suffix(".json").read_text())
        members.update(manifest["keys"])
    return {
        "kept": sorted((r["key"], r["image_sha256"], r["phash"]) for r in index),
        "rejects": sorted((r["key"], r["stage"], r["reason"], r["duplicate_of"]) for r in rejects),
        "funnel": report["funnel"],
        "counts": (report["input_rows"], report["kept"], report["rejected"], report["shards"]),
        "in_shards": sorted(members.elements()),
        "leftovers": sorted(p.name for p in out.iterdir() if p.name.startswith("_")),
    }


def _kill_when(argv: list[str], ready, timeout_s: float = 240.0, env=None) -> str:
    """Run `beam run curate` in a subprocess and SIGKILL it (its whole process
    group) once `ready()` holds; returns how it ended ('killed' or 'finished')."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", *argv],
        cwd=REPO_ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
    )
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return "finished"
            if ready():
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return "killed"
            time.sleep(0.05)
        raise AssertionError(f"the run neither reached the kill point nor finished in {timeout_s} s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _during_crawl(out: Path):
    return lambda: 2 <= len(list(out.glob("_parts/*/*.jsonl")))


def _after_crawl(out: Path, crawled_rows: int):
    return lambda: len(_committed_keys(out)) >= crawled_rows


def _during_shards(out: Path):
    return lambda: any((out / "shards").glob("*.tar")) or any((out / "shards").glob(".tmp/*"))


@pytest.fixture(scope="module")
def inputs(web, tmp_path_factory):
    folder = tmp_path_factory.mktemp("resume-inputs")
    paths = [f"/img{i}.jpg" for i in range(ROWS)] + [f"/copy{i}.jpg" for i in range(3)] + ["/missing.jpg"]
    urls = _write_input(folder, "urls.parquet", _rows(web, paths))
    return urls, _config(folder, rate=20.0), paths


@pytest.fixture(scope="module")
def uninterrupted(web, inputs, tmp_path_factory):
    urls, config, _ = inputs
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    assert main(_curate_argv(urls, str(out), config)) == 0
    return _outcome(out)


def _resume_and_check(web, urls, config, out: Path, paths, uninterrupted, beam_args=()) -> None:
    """After a kill: the folder is refused without --resume, --resume ends with
    the uninterrupted run's outcome, and no committed row was fetched twice."""
    committed = _committed_keys(out)
    assert committed, "nothing was committed before the kill"
    before = {path: web.requests_to(path) for path in paths}
    assert json.loads((out / "run.json").read_text())["status"] == "running"
    assert main(_curate_argv(urls, str(out), config)) == 2
    assert main(_curate_argv(urls, str(out), config, "--resume", *beam_args)) == 0

    assert _outcome(out) == uninterrupted
    tables = pq.read_table(out / "index.parquet").to_pylist() + pq.read_table(out / "rejects.parquet").to_pylist()
    key_to_path = {r["key"]: r["url"].split(str(web.port), 1)[1] for r in tables}
    for key in committed:
        path = key_to_path[key]
        assert web.requests_to(path) == before[path] == 1, f"{path} (committed as {key}) was fetched again on resume"
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


@pytest.mark.parametrize(
    "point",
    [
        "during_crawl",
        pytest.param("after_crawl", marks=pytest.mark.slow),  # same resume path as during_crawl, more parts
        "during_shards",
    ],
)
def test_sigkill_then_resume_matches_an_uninterrupted_run_and_refetches_nothing_committed(
    web, inputs, uninterrupted, tmp_path, point, capsys
):
    urls, config, paths = inputs
    out = tmp_path / "out"
    ready = {
        "during_crawl": _during_crawl(out),
        "after_crawl": _after_crawl(out, len(paths)),
        "during_shards": _during_shards(out),
    }[point]
    web.reset_counts()
    assert _kill_when(_curate_argv(urls, str(out), config), ready) == "killed", "the run ended before the kill point"
    if point == "during_crawl":
        # --resume refuses a changed config, naming the difference, and --resume with --overwrite.
        changed = Path(config).parent / "changed.yaml"
        data = yaml.safe_load(Path(config).read_text())
        data["decode"] = {"min_side": 256}
        changed.write_text(yaml.safe_dump(data))
        capsys.readouterr()
        assert main(_curate_argv(urls, str(out), str(changed), "--resume")) == 2
        assert "decode.min_side" in capsys.readouterr().err
        assert main(_curate_argv(urls, str(out), config, "--resume", "--overwrite")) == 2
    _resume_and_check(web, urls, config, out, paths, uninterrupted)
    if point == "during_crawl":
        capsys.readouterr()
        assert main(_curate_argv(urls, str(out), config, "--resume")) == 2
        assert "already finished" in capsys.readouterr().err
        assert main(_curate_argv(urls, str(tmp_path / "never-run"), config, "--resume")) == 2


@pytest.mark.portable
def test_sigkill_on_the_portable_runner_then_resume_on_new_services(web, inputs, uninterrupted, tmp_path):
    """The driver, the job service and the external workers all die; a new job
    on new services resumes from the parts in the output folder."""
    urls, config, paths = inputs
    out = tmp_path / "out"
    web.reset_counts()
    with portable_runner(tmp_path / "services-1") as argv:
        how = _kill_when(_curate_argv(urls, str(out), config, *argv), _during_crawl(out))
    assert how == "killed", "the run ended before the kill point"
    with portable_runner(tmp_path / "services-2") as argv:
        _resume_and_check(web, urls, config, out, paths, uninterrupted, argv)


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_append_adds_only_new_images_and_leaves_existing_shards_untouched(web, tmp_path, capsys):
    for i in range(6):
        web.add(f"/new{i}.jpg", _image(5000 + i))
    # A's images re-encoded (another JPEG quality) and resized: new bytes, same picture.
    reencoded = webcorpus.jpeg(webcorpus.render(1000, (640, 560)), quality=70)
    resized = webcorpus.jpeg(webcorpus.render(1001, (640, 560)).resize((720, 630)))
    web.add("/reencoded.jpg", reencoded)
    web.add("/resized.jpg", resized)
    folder = tmp_path / "in"
    config = _config(folder, rate=200.0)
    a = _write_input(folder, "a.parquet", _rows(web, [f"/img{i}.jpg" for i in range(20)]))
    out = tmp_path / "out"
    assert main(_curate_argv(a, str(out), config)) == 0
    a_index = {r["key"]: r for r in pq.read_table(out / "index.parquet").to_pylist()}
    a_shards = _digests(out / "shards")
    a_by_url = {r["url"]: r["key"] for r in a_index.values()}

    same_urls = [f"/img{i}.jpg" for i in (0, 3, 7)]
    b_paths = same_urls + ["/reencoded.jpg", "/resized.jpg"] + [f"/new{i}.jpg" for i in range(6)]
    b = _write_input(folder, "b.parquet", _rows(web, b_paths))
    web.reset_counts()
    assert main(_curate_argv(b, str(out), config, "--append")) == 0

    assert _digests(out / "shards").items() >= a_shards.items(), "an existing shard changed"
    new_shards = sorted(set(_digests(out / "shards")) - set(a_shards))
    assert new_shards and min(new_shards) > max(a_shards), "new shards must be numbered after the existing ones"
    index = {r["key"]: r for r in pq.read_table(out / "index.parquet").to_pylist()}
    assert {k: v for k, v in index.items() if k in a_index} == a_index
    added = {k: v for k, v in index.items() if k not in a_index}
    assert sorted(v["url"].rsplit("/", 1)[1] for v in added.values()) == [f"new{i}.jpg" for i in range(6)]
    assert all(v["shard"] in new_shards for v in added.values())

    report = json.loads((out / "report.json").read_text())
    assert report["input_rows"] == len(b_paths) and report["kept"] == 6 and report["rejected"] == 5
    rejects = [r for r in pq.read_table(out / "rejects.parquet").to_pylist() if r["key"] not in a_index]
    b_rejects = {r["url"].rsplit("/", 1)[1]: r for r in rejects if r["key"] >= "00001"}
    for path in same_urls:
        r = b_rejects[path.lstrip("/")]
        assert (r["reason"], r["duplicate_of"]) == ("duplicate_url", a_by_url[web.url(path)])
        assert web.requests_to(path) == 0, "a URL already in the dataset was fetched"
    assert b_rejects["reencoded.jpg"]["reason"] == "near_duplicate"
    assert b_rejects["reencoded.jpg"]["duplicate_of"] == a_by_url[web.url("/img0.jpg")]
    assert b_rejects["resized.jpg"]["reason"] in ("near_duplicate", "exact_duplicate")
    assert b_rejects["resized.jpg"]["duplicate_of"] == a_by_url[web.url("/img1.jpg")]
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished" and len(run["history"]) == 1
    assert not (out / "_append_base").exists()

    # Another append needs the same config.
    changed = folder / "changed.yaml"
    data = yaml.safe_load(Path(config).read_text())
    data["dedup"] = {"hamming_threshold": 3}
    changed.write_text(yaml.safe_dump(data))
    capsys.readouterr()
    assert main(_curate_argv(b, str(out), str(changed), "--append")) == 2
    assert "dedup.hamming_threshold" in capsys.readouterr().err

"""`trainer fit`: kill-and-resume reproduces the uninterrupted run; raw-shard training; refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.trainer.conftest import shard_spec, tiny_config
from trainer.checkpoint import latest_checkpoint, list_checkpoints, read_state
from trainer.train import KILL_AT_STEP_ENV, WarmupCosine, fit

REPO = Path(__file__).resolve().parents[2]


def metrics(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def run_cli(args: list[str], kill_at: int | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop(KILL_AT_STEP_ENV, None)
    if kill_at is not None:
        env[KILL_AT_STEP_ENV] = str(kill_at)
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_kill_and_resume_reproduces_the_uninterrupted_run(tmp_path, components_dir, cache_dir):
    config = tiny_config(
        components_dir,
        max_steps=8,
        data={"cache": str(cache_dir), "num_workers": 2, "batch_size": 3},
        optim={"grad_accum": 2, "warmup_steps": 3},
        validation={"every_steps": 4},  # a preview mid-run must not disturb the trajectory
        checkpoint={"every_steps": 3, "keep_last": 5},
    )
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"

    done = run_cli(["fit", "--config", str(config_file), "--output", str(straight)])
    assert done.returncode == 0, done.stderr[-3000:]

    killed = run_cli(["fit", "--config", str(config_file), "--output", str(interrupted)], kill_at=5)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert sorted(metrics(interrupted)) == [1, 2, 3, 4, 5]  # it got past its last checkpoint (3)
    assert [read_state(c).step for c in list_checkpoints(interrupted)] == [3]

    resumed = run_cli(["fit", "--config", str(config_file), "--output", str(interrupted), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr

    a, b = metrics(straight), metrics(interrupted)
    assert sorted(b) == list(range(1, 9))
    for step in range(1, 9):
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-6, abs=1e-7), step
        assert b[step]["lr"] == pytest.approx(a[step]["lr"], rel=1e-9)
        assert b[step]["grad_norm"] == pytest.approx(a[step]["grad_norm"], rel=1e-5)
    assert len({round(a[s]["loss"], 6) for s in a}) > 4  # the losses do differ from step to step
    final_a, final_b = latest_checkpoint(straight), latest_checkpoint(interrupted)
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        ta, tb = load_file(str(final_a / name)), load_file(str(final_b / name))
        assert ta.keys() == tb.keys()
        for key in ta:
            torch.testing.assert_close(ta[key], tb[key], rtol=1e-6, atol=1e-7, msg=f"{name}:{key}")
    assert read_state(final_b).data.micro_batches == 16 == read_state(final_a).data.micro_batches


def test_fit_from_raw_shards_and_refusals(tmp_path, components_dir, shard_paths):
    run = tmp_path / "run"
    # Two loader workers: decoding and tokenising run in worker processes.
    config = tiny_config(components_dir, max_steps=3, data={"shards": shard_spec(shard_paths), "num_workers": 2})
    export = fit(config, run)
    records = metrics(run)
    assert sorted(records) == [1, 2, 3] and all(r["loss"] > 0 for r in records.values())
    assert (export / "model_index.json").is_file() and (run / "samples" / "step-00000003.png").is_file()
    saved = json.loads((run / "config.json").read_text())
    assert saved["data"]["shards"] == shard_spec(shard_paths)

    with pytest.raises(FileExistsError, match="pass --resume"):
        fit(config, run)
    fewer_workers = tiny_config(components_dir, max_steps=4, data={"shards": shard_spec(shard_paths), "num_workers": 1})
    with pytest.raises(ValueError, match="exact resume needs the same"):
        fit(fewer_workers, run, resume=True)
    # The one resume policy (trainer.resume), as `trainer lora --resume`: a changed config is
    # refused, naming the fields, not continued with a warning.
    longer = tiny_config(components_dir, max_steps=4, data={"shards": shard_spec(shard_paths), "num_workers": 2})
    with pytest.raises(ValueError, match=r"different config \(max_steps differ\)"):
        fit(longer, run, resume=True)


def test_warmup_cosine_schedule():
    schedule = WarmupCosine(warmup_steps=4, max_steps=14, min_ratio=0.1)
    assert [schedule(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert schedule(9) == pytest.approx(0.1 + 0.9 * 0.5)
    assert schedule(14) == pytest.approx(0.1) and schedule(100) == pytest.approx(0.1)


def run_ddp(args: list[str], kill_at: int | None = None) -> subprocess.CompletedProcess:
    """Two CPU ranks with gloo, launched by torchrun (accelerate reads its environment)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", ACCELERATE_USE_CPU="true")
    env.pop(KILL_AT_STEP_ENV, None)
    if kill_at is not None:
        env[KILL_AT_STEP_ENV] = str(kill_at)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]
    return subprocess.run([*torchrun, "-m", "trainer", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # the single-process kill-and-resume test covers the same code; this adds two ranks
def test_two_rank_kill_and_resume(tmp_path, components_dir, cache_dir):
    config = tiny_config(components_dir, max_steps=6, data={"cache": str(cache_dir), "num_workers": 1, "batch_size": 2}, checkpoint={"every_steps": 2, "keep_last": 5})
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    done = run_ddp(["fit", "--config", str(config_file), "--output", str(straight)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert {p.name for p in latest_checkpoint(straight).iterdir()} >= {"rng-rank0.safetensors", "rng-rank1.safetensors"}
    run_ddp(["fit", "--config", str(config_file), "--output", str(interrupted)], kill_at=3)
    assert [read_state(c).step for c in list_checkpoints(interrupted)] == [2]
    resumed = run_ddp(["fit", "--config", str(config_file), "--output", str(interrupted), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = metrics(straight), metrics(interrupted)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in range(1, 7):
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-6, abs=1e-7), step
    assert read_state(latest_checkpoint(straight)).samples_seen == 6 * 2 * 2
    for name in ("model.safetensors", "ema.safetensors"):
        ta, tb = load_file(str(latest_checkpoint(straight) / name)), load_file(str(latest_checkpoint(interrupted) / name))
        for key in ta:
            torch.testing.assert_close(ta[key], tb[key], rtol=1e-6, atol=1e-7)

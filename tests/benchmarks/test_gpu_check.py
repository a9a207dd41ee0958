"""benchmarks/gpu_check: the one-call GPU check, run end to end on the CPU with --dry-run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from benchmarks.gpu_check import BUCKET_512, REPO, bench_commands, gpu_requirements, gpu_test_files, pytest_counts
from trainer.buckets import bucket_set, parse_bucket


def test_wheels_leave_torch_to_the_machine_and_steps_are_well_formed(tmp_path):
    pins = gpu_requirements()
    names = {p.split("==")[0].lower() for p in pins}
    assert {"diffusers", "transformers", "accelerate", "apache-beam", "pytest"} <= names
    assert not names & {"torch", "torchvision", "triton"} and not any(n.startswith("nvidia-") for n in names)
    assert all("==" in p for p in pins)  # exact pins only
    assert parse_bucket(BUCKET_512) in bucket_set(512, 16, 3.0)  # a real bucket of a 512 px stage (8x VAE, patch 2)
    for dry_run in (True, False):
        for _, command, _ in bench_commands(dry_run, tmp_path):
            if "--bucket" in command:
                resolution = int([a for a in command if a.startswith("data.resolution=")][-1].split("=")[1])  # the last --set wins
                assert parse_bucket(command[command.index("--bucket") + 1]) in bucket_set(resolution, 16, 3.0)
    assert {"tests/trainer/test_lora.py", "tests/stages/test_recaption.py"} <= set(gpu_test_files())
    assert pytest_counts("2 skipped, 612 deselected in 3.1s") == {"skipped": 2, "deselected": 612}
    with pytest.raises(ValueError):
        pytest_counts("nothing")


@pytest.mark.slow  # a few minutes of subprocesses; CI runs the same dry run (.ci/run), the test above checks its parts
def test_dry_run_end_to_end(tmp_path):
    out = tmp_path / "gpu-check.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "run", "--dry-run", "--out", str(out), "--wheels", str(tmp_path / "none")],
                          cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    steps = {s["name"]: s for s in report["steps"]}
    assert steps["install"]["status"] == "skipped"
    assert steps["pytest -m gpu"]["result"].get("failed", 0) == 0
    for name in ("trainer bench B", "trainer bench XL", "trainer bench XL-512-bucket"):
        [result] = steps[name]["result"]
        assert result["images_per_s"] > 0 and result["tokens_per_s"] > 0 and result["attention_kernels"]
    assert steps["trainer bench XL-512-bucket"]["result"][0]["width"] == 80
    assert steps["CLIP scoring bf16"]["result"]["rows"] and steps["recaption"]["result"]["rows"]
    assert report["environment"]["torch"] and report["passed"] is True

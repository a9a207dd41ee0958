"""One GPU check, ready to run in one call on a machine with an NVIDIA GPU and only torch.

    # here (with PyPI): the project's wheel and its pinned dependencies, minus torch
    python -m benchmarks.gpu_check prepare [--wheels .gpu-wheels]
    # on the GPU machine (no network needed), from the repository root:
    python -m benchmarks.gpu_check run [--wheels .gpu-wheels] [--out gpu-check.json] [--budget-s 480]
    # anywhere, CPU only, toy sizes, the same steps (the test suite runs this):
    python -m benchmarks.gpu_check run --dry-run --out gpu-check.json

`run` does, in order, each step with what is left of `--budget-s` (8 minutes) as its limit:

1. install: `pip install --no-index --find-links WHEELS imagemill[dev]` (torch is already
   there; skipped when WHEELS does not exist, e.g. when the project is already installed);
2. environment: torch and CUDA versions, device name, bf16 support, flash-attn availability;
3. `pytest -m gpu` (the tests that need CUDA; on a CPU they are collected and skipped);
4. `trainer bench` of the B and XL presets at 256 px and of one aspect bucket of a 512 px
   stage (688x384, about 16:9), each printing the attention kernels the step launched;
5. the CLIP scoring benchmark in bf16 (`benchmarks.scoring_bench`, CLIP only);
6. the recaption benchmark (`benchmarks.recaption_bench`, the tests' tiny LLaVA: no hub);

and writes every figure, command, exit status and duration into one JSON file (whole: a
temporary name, then renamed). `--dry-run` runs the same steps on the CPU at toy sizes
(tiny models, a few steps), so the script itself is tested end to end without a GPU; its
figures mean nothing. Exit status 0 when every step passed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Preinstalled on the GPU machine (with the CUDA libraries it was built against).
PREINSTALLED = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-[\w-]+)$", re.IGNORECASE)
BUCKET_512 = "688x384"  # a bucket of trainer.buckets.bucket_set(512, 16, 3.0), about 16:9


def gpu_requirements(constraints: Path = REPO / "constraints.txt") -> list[str]:
    """The exact pins of constraints.txt minus what the GPU machine already has (torch & co.)."""
    pins = []
    for line in constraints.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or "==" not in line:
            continue
        if not PREINSTALLED.match(line.split("==", 1)[0].strip()):
            pins.append(line)
    return pins


def prepare(wheels: Path, python_version: str, platform: list[str]) -> int:
    """The project's wheel and every pinned dependency as wheels for the GPU machine."""
    wheels.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO)], check=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as handle:
        handle.write("\n".join(gpu_requirements()) + "\n")
    platforms = [arg for p in platform for arg in ("--platform", p)]
    subprocess.run(
        [*pip, "download", "--no-deps", "--only-binary=:all:", "--python-version", python_version, *platforms, "-d", str(wheels), "-r", handle.name],
        check=True,
    )
    os.unlink(handle.name)
    size = sum(p.stat().st_size for p in wheels.iterdir()) / 2**20
    print(f"{len(list(wheels.iterdir()))} wheels ({size:.0f} MiB) in {wheels}; copy the repository with it to the GPU machine")
    return 0


class Steps:
    """Runs commands within one time budget and records each one."""

    def __init__(self, budget_s: float, env: dict):
        self.deadline = time.monotonic() + budget_s
        self.env = env
        self.records: list[dict] = []

    def run(self, name: str, command: list[str], parse=None) -> dict:
        left = self.deadline - time.monotonic()
        record: dict = {"name": name, "command": command}
        if left < 5:
            record.update(status="skipped", detail="time budget spent")
            self.records.append(record)
            return record
        start = time.monotonic()
        try:
            done = subprocess.run(command, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=left)
            record.update(returncode=done.returncode, status="passed" if done.returncode == 0 else "failed")
            output = done.stdout
            if done.returncode != 0:
                record["stderr_tail"] = done.stderr[-3000:]
        except subprocess.TimeoutExpired as expired:
            record.update(status="timed out", detail=f"killed after {left:.0f} s")
            output = expired.stdout.decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        record["seconds"] = round(time.monotonic() - start, 1)
        record["stdout_tail"] = output[-2000:]
        if parse is not None and record["status"] == "passed":
            try:
                record["result"] = parse(output)
            except (ValueError, KeyError, IndexError) as error:
                record.update(status="failed", detail=f"could not read its figures: {error}")
        print(f"[gpu_check] {name}: {record['status']} in {record['seconds']} s", file=sys.stderr, flush=True)
        self.records.append(record)
        return record


def gpu_test_files() -> list[str]:
    """The test files with `gpu`-marked tests (collecting only these saves minutes of imports)."""
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py") if "mark.gpu" in p.read_text())


def last_json_line(output: str):
    for line in reversed(output.splitlines()):
        line = line.strip()
        if line.startswith("{") or line.startswith("["):
            return json.loads(line)
    raise ValueError("no JSON line in the output")


def pytest_counts(output: str) -> dict:
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?)", output)}
    if not counts:
        raise ValueError("no pytest summary line")
    return counts


def environment() -> dict:
    import torch

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info.update(device=torch.cuda.get_device_name(0), bf16=torch.cuda.is_bf16_supported(), capability=list(torch.cuda.get_device_capability(0)))
    try:
        from trainer.model import flash_attn_available

        info["flash_attn_package"] = flash_attn_available()
    except ImportError as error:  # the project is not installed (yet)
        info["flash_attn_package"] = f"unknown ({error})"
    return info


def bench_commands(dry_run: bool, out_dir: Path) -> list[tuple[str, list[str], Path]]:
    trainer = [sys.executable, "-m", "trainer", "bench"]
    if dry_run:  # toy sizes: a 1-block, 64-wide model on 32 px, two timed steps, on the CPU
        toy = ["--set", "model.depth=1", "--set", "model.hidden_size=64", "--set", "model.num_heads=2", "--set", "model.compile=false",
               "--set", 'mixed_precision="no"', "--set", "data.batch_size=2", "--set", "data.num_workers=0", "--set", "data.resolution=32",
               "--steps", "2", "--warmup", "1", "--peak-tflops", "1"]
        stage = ["--set", "data.resolution=64", "--bucket", "80x48"]  # a bucket of a 64 px stage
    else:
        toy, stage = ["--steps", "50", "--warmup", "10"], ["--set", "data.resolution=512", "--set", "data.batch_size=32", "--bucket", BUCKET_512]
    runs = []
    for name, preset, extra in (("B", "bench-B", []), ("XL", "bench-XL", []), ("XL-512-bucket", "bench-XL", stage)):
        path = out_dir / f"bench-{name}.json"
        runs.append((f"trainer bench {name}", [*trainer, "--config", preset, *toy, *extra, "--json", str(path)], path))
    return runs


def run(args) -> int:
    out = Path(args.out).resolve()
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    steps = Steps(args.budget_s, env)
    report: dict = {"dry_run": args.dry_run, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    wheels = Path(args.wheels)
    pip_install = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels), "imagemill[dev]"]
    if wheels.is_dir():
        steps.run("install", pip_install + (["--dry-run"] if args.dry_run else []))
    else:
        steps.records.append({"name": "install", "command": pip_install, "status": "skipped", "detail": f"no wheels folder {wheels} (run `prepare` first, or install the project yourself)"})
    report["environment"] = environment()

    pytest = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *gpu_test_files()]
    steps.run("pytest -m gpu", pytest, pytest_counts)

    with tempfile.TemporaryDirectory() as tmp:
        for name, command, path in bench_commands(args.dry_run, Path(tmp)):
            record = steps.run(name, command)
            if record["status"] == "passed":
                record["result"] = json.loads(path.read_text())
        device = ["--device", "cpu"] if args.dry_run else ["--device", "cuda"]
        if args.dry_run:
            scoring = ["--model", "tiny", "--precision", "bf16", "--batch-sizes", "2", "--images", "4", "--image-side", "64", "--repeats", "1"]
            recaption = ["--batch-sizes", "2", "--images", "2", "--image-side", "64", "--max-new-tokens", "2", "--repeats", "1"]
        else:
            scoring = ["--precision", "bf16", "--batch-sizes", "32,64,128", "--images", "512", "--repeats", "2"]
            recaption = ["--batch-sizes", "1,8,16", "--images", "64", "--repeats", "2"]
        steps.run("CLIP scoring bf16", [sys.executable, "-m", "benchmarks.scoring_bench", *device, *scoring, "--skip-pipeline", "--skip-nudenet"], last_json_line)
        steps.run("recaption", [sys.executable, "-m", "benchmarks.recaption_bench", *device, *recaption, "--skip-pipeline"], last_json_line)

    report["steps"] = steps.records
    report["passed"] = all(r["status"] in ("passed", "skipped") for r in steps.records) and any(r["status"] == "passed" for r in steps.records)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(out.name + ".tmp")
    tmp_out.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp_out, out)
    print(f"[gpu_check] {'passed' if report['passed'] else 'FAILED'}; figures in {out}", file=sys.stderr)
    return 0 if report["passed"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="download the wheels the GPU machine installs from (needs PyPI)")
    p.add_argument("--wheels", default=str(REPO / ".gpu-wheels"))
    p.add_argument("--python-version", default="3.11")
    p.add_argument("--platform", action="append", default=None, help="pip --platform tags (default: manylinux x86_64)")
    p = sub.add_parser("run", help="install, then run the checks and write one JSON file")
    p.add_argument("--wheels", default=str(REPO / ".gpu-wheels"))
    p.add_argument("--out", default="gpu-check.json")
    p.add_argument("--budget-s", type=float, default=480.0, help="all steps together (8 minutes)")
    p.add_argument("--dry-run", action="store_true", help="CPU, toy sizes: the same steps, meaningless figures")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        platforms = args.platform or ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "linux_x86_64"]
        return prepare(Path(args.wheels), args.python_version, platforms)
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())

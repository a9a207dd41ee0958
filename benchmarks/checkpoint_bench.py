"""What resume costs: crawl-to-shards throughput of `beam run curate` with
committed work units (`checkpoint.enabled`, the default) against the same run
without them, on one generated corpus served from 127.0.0.1, in the same
process, both orders (A B B A), after a warm-up run that is not counted.

    python -m benchmarks.checkpoint_bench [--images 4000] [--rounds 1] [--quick]

Each side crawls, decodes, hashes, stages, dedups and writes shards for every
image; figures are images written per second of wall time (start-up
included, so size `--images` for at least a minute per run). It prints every
run, the mean per side, the spread, and the overhead of bookkeeping
(1 - with / without; target under 5 %).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from benchmarks.curate_bench import loopback_web, write_corpus
from pipelines.cli import main


def run_side(urls: Path, workdir: Path, name: str, checkpoint: bool, args) -> tuple[float, float]:
    config = {
        "crawl": {
            "threads": args.threads,
            "timeout_s": 10,
            # One loopback host stands in for many: give it a budget that does not bind.
            "host_budgets": [{"pattern": "127.0.0.1", "max_per_host": args.threads, "max_host_rate": 100_000}],
            "hot_host_rows": max(1, args.images // (4 * args.workers)),  # the one host crawled by every worker
        },
        "checkpoint": {"enabled": checkpoint},
        "decode": {"resize_mode": "keep_ratio", "image_size": 512},
        "shards": {"samples_per_shard": 1000},
    }
    config_path = workdir / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    out = workdir / name
    started = time.perf_counter()
    code = main(
        ["run", "curate", "--input", str(urls), "--output", str(out), "--config", str(config_path),
         "--allow-private-network", "--progress-interval", "0",
         "--direct_num_workers", str(args.workers), "--direct_running_mode", "multi_processing"]
    )
    elapsed = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"{name}: beam run curate exited with {code}")
    kept = json.loads((out / "report.json").read_text())["kept"]
    shutil.rmtree(out, ignore_errors=True)
    return kept / elapsed, elapsed


def main_bench(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=1, help="A B B A rounds")
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="300 images: checks the benchmark runs, measures start-up")
    parser.add_argument("--corpus", help="folder to keep the generated JPEGs in between runs (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.quick:
        args.images = 300
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        corpus = Path(args.corpus) if args.corpus else workdir / "web"
        items = write_corpus(corpus, args.images)
        web = loopback_web(corpus, [name for name, _ in items])
        urls = workdir / "urls.parquet"
        with web as (served, _web_pid):
            rows = [{"url": url, "caption": caption} for url, (_, caption) in zip(served, items)]
            pq.write_table(pa.Table.from_pylist(rows), urls)
            figures = run_rounds(urls, workdir, args)
        with_, without = statistics.mean(figures[True]), statistics.mean(figures[False])
        for label, values in (("with checkpoints", figures[True]), ("without", figures[False])):
            print(f"{label:<17} mean {statistics.mean(values):7.1f} images/s  (min {min(values):.1f}, max {max(values):.1f})")
        print(f"bookkeeping overhead: {100 * (1 - with_ / without):+.1f} % of throughput (target < 5 %)")


def run_rounds(urls: Path, workdir: Path, args) -> dict[bool, list[float]]:
    """A B B A rounds; images/s of each run, by checkpointing on/off."""
    # A first run that is not counted: it warms the page cache (the web reads its
    # files from disk) and Python's imports, which would otherwise cost side A alone.
    rate, seconds = run_side(urls, workdir, "warmup", False, args)
    print(f"warm-up (not counted): {rate:7.1f} images/s  ({seconds:.0f} s)", flush=True)
    figures: dict[bool, list[float]] = {True: [], False: []}
    run = 0
    for _ in range(args.rounds):
        for checkpoint in (True, False, False, True):
            rate, seconds = run_side(urls, workdir, f"run{run}", checkpoint, args)
            run += 1
            figures[checkpoint].append(rate)
            print(f"run {run}: checkpoint={'on ' if checkpoint else 'off'}  {rate:7.1f} images/s  "
                  f"({seconds:.0f} s, load {os.getloadavg()[0]:.1f})", flush=True)
    return figures


if __name__ == "__main__":
    main_bench()

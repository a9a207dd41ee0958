"""Crawl-to-shards throughput at steady state: `beam run curate` against
img2dataset's own `download()`, on one generated web, in the same run.

    python -m benchmarks.curate_bench                 # steady state (minutes)
    python -m benchmarks.curate_bench --quick         # smoke test of the benchmark (seconds)
    python -m benchmarks.curate_bench --modes threads --images 5000

Both fetch the same URLs, apply the same resize mode (img2dataset's `Resizer`
settings: `keep_ratio` to 512 px, downscale only, JPEG q95) and write WebDataset
shards; curate also does everything it adds (SHA-256, pHash, staging, the dedup
and shard passes, index/rejects parquet, report). The runs go in the order
A B C C B A (A = img2dataset, B = curate in this process with threads, C =
curate with worker processes), so a drift in machine load hits every side alike; each side is
reported as the mean of its two runs with their spread, and the ratio is curate's
images/s over img2dataset's. A run shorter than `--min-seconds` (default 60) is
flagged: its figure includes start-up and is not a steady-state one.

The web runs in its own process (so its request handling does not share a GIL
with the Beam threads), serving the generated JPEGs from disk:
`--web loopback` (default) on 127.0.0.1, `--web manyhosts` on the many-host
loopback web of `pipelines/testing/manyhosts.py` when it is available
(`--dead-hosts 0.2` then makes a fifth of its hosts refuse or stall).

img2dataset is set up deliberately: enough shards for every process (its
default of 10,000 samples per shard would leave one process busy) and
`incremental_mode="incremental"` on a fresh folder. In processes mode Beam's
local runner gets `--workers` worker processes, as img2dataset gets `--workers`
processes, each crawling with `--threads` fetch threads. The threads side runs
the local runner's default `in_memory` mode: one SDK worker in this process,
whose crawl uses `--workers` x `--threads` fetch threads, as many as
img2dataset's in all (decoding on them too, where the GIL is released). Its `multi_threading` mode with several workers is not used: it
garbled elements between stages on curate runs here, and the local runner
refuses it (see `pipelines/runner.py`).

Each run also reports its CPU time per image written (this process and its
finished children: img2dataset's processes, Beam's worker processes; the web's
process is not counted): on a machine other jobs are loading, that figure moves
less than images/s. A run that fails is reported and left out of the figures.

For curate, the per-stage breakdown is the time the SDK workers spent in each
top-level step (Beam's `process_bundle_msecs` monitoring metric, summed over
workers: worker-seconds, not wall time; a fused stage's time is split by the
step running), plus the stages' own distributions (`crawl/fetch_ms`,
`decode/decode_ms`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import http.server
import json
import multiprocessing
import os
import random
import resource
import statistics
import tarfile
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import apache_beam as beam  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import yaml  # noqa: E402

from pipelines.testing.images import COLOURS, SHAPES, jpeg, render  # noqa: E402

STEADY_IMAGES = 10000  # each side works for over a minute on a 2-core machine (3,000 took under 60 s here)
STEADY_SECONDS = 60.0
SIDES = {
    "img2dataset": "img2dataset download()",
    "threads": "beam run curate, in_memory",
    "processes": "beam run curate, processes",
}


# ------------------------------------------------------------------ the corpus and the web


def write_corpus(folder: Path, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """`n` photo-like JPEGs of 512-1023 px a side (distinct in pHash) under
    `folder`; returns (file name, caption) pairs."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n):
        size = (rng.randrange(512, 1024), rng.randrange(512, 1024))
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        name = f"{i}.jpg"
        path = folder / name
        if not path.exists():
            path.write_bytes(jpeg(render(seed * 1_000_003 + i, size, colour, shape)))
        items.append((name, f"a {colour} {shape} on a patterned background"))
    return items


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base signature
        pass


class _Server(http.server.ThreadingHTTPServer):
    request_queue_size = 1024  # the default 5 makes a burst of connects time out
    daemon_threads = True


def _serve_folder(folder: str, ready, stop) -> None:
    import functools

    server = _Server(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=folder))
    ready.send(server.server_address[1])
    import threading

    threading.Thread(target=server.serve_forever, daemon=True).start()
    stop.wait()
    server.shutdown()


@contextlib.contextmanager
def loopback_web(folder: Path, names: list[str]):
    """The files of `folder` served on 127.0.0.1 from a child process; yields their URLs."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    stop = ctx.Event()
    process = ctx.Process(target=_serve_folder, args=(str(folder), child, stop), daemon=True)
    process.start()
    try:
        if not parent.poll(60):
            raise SystemExit("the benchmark web did not start")
        port = parent.recv()
        yield [f"http://127.0.0.1:{port}/{name}" for name in names], process.pid
    finally:
        stop.set()
        process.join(10)
        if process.is_alive():
            process.kill()


@contextlib.contextmanager
def manyhosts_web(folder: Path, n: int, args):
    """`n` image URLs on the many-loopback-host web (`pipelines/testing/manyhosts.py`,
    run as its own process): `--hosts` hosts on 127.0.0.2 and up. Healthy web:
    `--hot-hosts` hosts hold most URLs and every other host one or two (a
    crawl's long tail). With `--dead-hosts F`, every host holds about the same
    number of URLs and a fraction F of the hosts are unhealthy, split between
    slow (each answer 2 s late), refusing connections and never answering."""
    import signal
    import subprocess
    import sys

    try:
        from pipelines.testing.hostspecs import IMAGES_PREFIX
    except ImportError as err:
        raise SystemExit(f"--web manyhosts needs pipelines/testing/manyhosts.py ({err}); use --web loopback") from err
    hosts = args.hosts
    unhealthy = round(args.dead_hosts * hosts)
    slow, refuse = unhealthy // 3, unhealthy // 3
    hang = unhealthy - slow - refuse
    if unhealthy:
        counts = [n // hosts + (1 if i < n % hosts else 0) for i in range(hosts)]
    else:
        small = [1 + (j % 2) for j in range(hosts - args.hot_hosts)]
        hot = max(0, n - sum(small))
        counts = [hot // args.hot_hosts + (1 if i < hot % args.hot_hosts else 0) for i in range(args.hot_hosts)] + small
    # Every image is rendered before the first run (about 4 ms of CPU each):
    # otherwise the first run, or every run once the web's images outnumber
    # what it keeps, would share the cores with the renderer.
    command = [sys.executable, "-m", "pipelines.testing.manyhosts", "--hosts", str(hosts), "--slow", str(slow),
               "--refuse", str(refuse), "--hang", str(hang), "--log-dir", str(folder / "logs"),
               "--image-size", args.manyhosts_image_size, "--prerender", ",".join(map(str, counts))]
    started = time.perf_counter()
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        if not line:
            raise SystemExit(f"the many-host web did not start: {' '.join(command)}")
        port = json.loads(line)["port"]
        print(f"many-host web ready in {time.perf_counter() - started:.0f} s (its {sum(counts)} images rendered)",
              flush=True)
        urls = [f"http://127.0.0.{i + 2}:{port}{IMAGES_PREFIX}{k}.jpg" for i, c in enumerate(counts) for k in range(c)]
        random.Random(0).shuffle(urls)
        print(f"many-host web: {hosts} hosts ({slow} slow, {refuse} refusing, {hang} hanging), {len(urls)} URLs, "
              f"largest host {max(counts)} URLs", flush=True)
        yield urls[:n], server.pid
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()


# ------------------------------------------------------------------ the two sides


def count_tar_images(folder: Path) -> int:
    count = 0
    for shard in folder.glob("*.tar"):
        with tarfile.open(shard) as tar:
            count += sum(1 for name in tar.getnames() if name.endswith((".jpg", ".png", ".webp")))
    return count


def web_cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) of the web's process so far, from
    /proc; 0 where there is no /proc. On a small machine the web shares the
    cores with the crawler it serves, so its CPU per image is part of the
    picture (it is the same per request for both sides)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15 of stat)


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (img2dataset's
    processes, Beam's worker processes), user + system."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@dataclasses.dataclass
class Run:
    side: str
    seconds: float
    images: int
    cpu_s: float = 0.0  # CPU seconds of the run (this process and its children; not the web's)
    stages: dict[str, float] = dataclasses.field(default_factory=dict)  # worker-seconds per step
    distributions: dict[str, tuple[int, float]] = dataclasses.field(default_factory=dict)  # name -> (count, mean)
    web_cpu_s: float = 0.0  # CPU seconds the web's process spent during the run

    @property
    def rate(self) -> float:
        return self.images / self.seconds


def run_img2dataset(urls: Path, out: Path, n: int, args) -> Run:
    from img2dataset import download

    cpu = cpu_seconds()
    started = time.perf_counter()
    download(
        url_list=str(urls),
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        output_folder=str(out),
        output_format="webdataset",
        processes_count=args.workers,
        thread_count=args.threads,
        image_size=args.image_size,
        resize_mode=args.resize_mode,
        resize_only_if_bigger=True,
        number_sample_per_shard=max(1, n // (args.workers * 2)),
        incremental_mode="incremental",
        timeout=args.timeout,
        retries=0,
        enable_wandb=False,
        distributor="multiprocessing",
        user_agent_token="img2dataset",
        disallowed_header_directives=["noai", "noimageai", "noindex", "noimageindex"],
    )
    elapsed = time.perf_counter() - started
    return Run("img2dataset", elapsed, count_tar_images(out), cpu_seconds() - cpu)


class _KeepResult(beam.Pipeline):
    """A Pipeline that keeps the result of its run, for the metrics."""

    result = None

    def run(self, *args, **kwargs):
        self.result = super().run(*args, **kwargs)
        return self.result


def _stage_seconds(result) -> dict[str, float]:
    """Worker-seconds per top-level step, from Beam's process_bundle_msecs."""
    from apache_beam.metrics.monitoring_infos import PROCESS_BUNDLE_MSECS_URN

    totals: dict[str, float] = defaultdict(float)
    try:
        infos = list(result.monitoring_infos())
    except AttributeError:  # a runner without monitoring infos
        return {}
    for info in infos:
        if info.urn != PROCESS_BUNDLE_MSECS_URN:
            continue
        step = info.labels.get("PTRANSFORM", "")
        if not step or step.startswith("ref_") or step.startswith("fn/"):
            continue
        from apache_beam.metrics import monitoring_infos

        totals[step.split("/")[0]] += monitoring_infos.extract_counter_value(info) / 1000.0
    return dict(totals)


def _distributions(result, names: list[tuple[str, str]]) -> dict[str, tuple[int, float]]:
    out = {}
    for namespace, name in names:
        found = result.metrics().query(beam.metrics.MetricsFilter().with_namespace(namespace).with_name(name))
        count = sum(d.committed.count for d in found["distributions"] if d.committed)
        total = sum(d.committed.sum for d in found["distributions"] if d.committed)
        if count:
            out[f"{namespace}/{name}"] = (count, total / count)
    return out


def run_curate(urls: Path, out: Path, args, mode: str) -> Run:
    from pipelines.curate import run_curate as curate_main
    from pipelines.runner import create_runner, make_pipeline_options

    # The same fetch threads in all as img2dataset's processes x threads: in
    # in_memory mode one worker crawls for the whole run.
    threads = args.threads * (args.workers if mode == "threads" else 1)
    config = {
        "crawl": {
            "threads": threads,
            "timeout_s": args.timeout,
            "retries": 0,
            # Loopback hosts stand in for a web whose hosts each hold a few URLs
            # (img2dataset has no per-host limit): rows are still grouped by host,
            # with a budget that does not bind.
            "host_budgets": [{"pattern": "127.0.0.*", "max_per_host": threads, "max_host_rate": 100_000}],
        },
        "decode": {"resize_mode": args.resize_mode, "image_size": args.image_size, "min_side": 0},
        "caption": {"enabled": False},
        "shards": {"samples_per_shard": 1000, "writers": 2},
    }
    config_path = out.parent / f"{out.name}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    if mode == "threads":
        beam_args = ["--direct_running_mode=in_memory"]
    else:
        beam_args = [f"--direct_num_workers={args.workers}", "--direct_running_mode=multi_processing"]
    options = make_pipeline_options(beam_args)
    pipeline = _KeepResult(runner=create_runner(options), options=options)
    cpu = cpu_seconds()
    started = time.perf_counter()
    code = curate_main(
        ["--input", str(urls), "--output", str(out), "--config", str(config_path),
         "--allow-private-network", *beam_args],
        test_pipeline=pipeline,
    )
    elapsed = time.perf_counter() - started
    cpu = cpu_seconds() - cpu
    if code != 0:
        raise SystemExit(f"curate failed with exit code {code}")
    stages, distributions = {}, {}
    if pipeline.result is not None:
        stages = _stage_seconds(pipeline.result)
        distributions = _distributions(pipeline.result, [("crawl", "fetch_ms"), ("decode", "decode_ms"), ("decode", "phash_ms")])
    return Run(mode, elapsed, count_tar_images(out / "shards"), cpu, stages, distributions)


# ------------------------------------------------------------------ report


def _spread(values: list[float]) -> str:
    if len(values) < 2:
        return ""
    return f"{min(values):.1f}-{max(values):.1f}"


def report(runs: list[Run], args) -> dict:
    by_side: dict[str, list[Run]] = defaultdict(list)
    for r in runs:
        by_side[r.side].append(r)
    base = statistics.mean(r.rate for r in by_side["img2dataset"])
    load = os.getloadavg()
    print()
    print(
        f"crawl to shards, {args.images} images, resize_mode={args.resize_mode} {args.image_size}px, "
        f"{args.workers} workers x {args.threads} threads, web={args.web}"
        + (f" ({args.dead_hosts:.0%} of hosts dead or slow)" if args.dead_hosts else "")
    )
    print(f"order: {' '.join(r.side for r in runs)}; load average now {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} "
          f"on {os.cpu_count()} cores")
    print(f"{'side':<30}{'images':>8}{'seconds (each run)':>24}{'images/s':>10}{'spread':>13}{'ratio':>7}"
          f"{'CPU ms/image':>14}{'web CPU ms/image':>18}")
    summary = {}
    for side, name in SIDES.items():
        side_runs = by_side.get(side)
        if not side_runs:
            continue
        rates = [r.rate for r in side_runs]
        mean = statistics.mean(rates)
        short = any(r.seconds < args.min_seconds for r in side_runs)
        seconds = " ".join(f"{r.seconds:.1f}" for r in side_runs)
        cpu_ms = statistics.mean(1000 * r.cpu_s / max(1, r.images) for r in side_runs)
        web_ms = statistics.mean(1000 * r.web_cpu_s / max(1, r.images) for r in side_runs)
        print(f"{name:<30}{side_runs[0].images:>8}{seconds:>24}{mean:>10.1f}{_spread(rates):>13}{mean / base:>6.2f}x"
              f"{cpu_ms:>14.1f}{web_ms:>18.1f}" + ("  SHORT: under --min-seconds, start-up included" if short else ""))
        summary[side] = {"images": [r.images for r in side_runs], "seconds": [round(r.seconds, 2) for r in side_runs],
                         "images_per_s": round(mean, 2), "ratio": round(mean / base, 3), "short": short,
                         "cpu_ms_per_image": round(cpu_ms, 2), "web_cpu_ms_per_image": round(web_ms, 2)}
    # Ratios of neighbouring pairs (A B and B A), so the spread of the ratio shows too.
    for side in ("threads", "processes"):
        pair_ratios = []
        for i, r in enumerate(runs):
            if r.side != side:
                continue
            near = min((abs(i - j), j) for j, o in enumerate(runs) if o.side == "img2dataset")[1]
            pair_ratios.append(r.rate / runs[near].rate)
        if pair_ratios:
            print(f"  {SIDES[side]}: ratio against the nearest img2dataset run: "
                  + ", ".join(f"{x:.2f}x" for x in pair_ratios))
            summary[side]["pair_ratios"] = [round(x, 3) for x in pair_ratios]
    print("  target: curate >= 1.5x img2dataset's images/s. CPU ms/image: this process and its children "
          "(img2dataset's processes, Beam's workers); web CPU ms/image: the web's process during the run, which "
          "shares the machine's cores; both less sensitive to other load than images/s")
    for side in ("threads", "processes"):
        side_runs = [r for r in by_side.get(side, []) if r.stages]
        if not side_runs:
            continue
        steps: dict[str, float] = defaultdict(float)
        for r in side_runs:
            for step, s in r.stages.items():
                steps[step] += s / len(side_runs)
        total = sum(steps.values())
        print(f"\n  {SIDES[side]}: worker-seconds per step (mean of {len(side_runs)} runs; {total:.1f} s in all)")
        for step, s in sorted(steps.items(), key=lambda kv: -kv[1]):
            if s >= 0.05 * max(1.0, total) / 20:
                print(f"    {step:<28}{s:>8.1f} s{100 * s / total:>6.1f} %")
        dists = side_runs[-1].distributions
        for name, (count, mean) in dists.items():
            print(f"    {name:<28}{mean:>8.1f} ms mean over {count} (last run)")
        summary[side]["stage_seconds"] = {k: round(v, 2) for k, v in steps.items()}
    summary["load_average"] = load
    print(json.dumps(summary))
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke test: 60 images, one run per side, no steady state")
    parser.add_argument("--images", type=int, help=f"images in the web (default {STEADY_IMAGES}, quick 60)")
    parser.add_argument("--min-seconds", type=float, help=f"a side's run shorter than this is flagged (default {STEADY_SECONDS:.0f}; quick 0)")
    parser.add_argument("--modes", default="threads,processes", help="curate sides: threads, processes or both")
    parser.add_argument("--resize-mode", default="keep_ratio", choices=["no", "keep_ratio", "center_crop", "border"])
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="img2dataset processes = Beam workers")
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--web", default="loopback", choices=["loopback", "manyhosts"])
    parser.add_argument("--dead-hosts", type=float, default=0.0, help="with --web manyhosts: fraction of hosts dead or slow")
    parser.add_argument("--hosts", type=int, default=60, help="with --web manyhosts: hosts (127.0.0.2 and up)")
    parser.add_argument("--hot-hosts", type=int, default=3, help="with --web manyhosts: hosts holding most URLs")
    parser.add_argument("--manyhosts-image-size", default="768x576", help="with --web manyhosts: WIDTHxHEIGHT served")
    parser.add_argument("--corpus", help="folder to keep the generated JPEGs in between runs (default: a temporary one)")
    args = parser.parse_args(argv)
    args.images = args.images or (60 if args.quick else STEADY_IMAGES)
    if args.min_seconds is None:
        args.min_seconds = 0.0 if args.quick else STEADY_SECONDS
    modes = [m for m in args.modes.split(",") if m]
    if not set(modes) <= {"threads", "processes"} or not modes:
        parser.error("--modes: threads, processes or both")
    if args.dead_hosts and args.web != "manyhosts":
        parser.error("--dead-hosts needs --web manyhosts")
    # A B C C B A: both orders for every pair (quick: A B C).
    order = ["img2dataset", *modes] if args.quick else ["img2dataset", *modes, *reversed(modes), "img2dataset"]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = Path(args.corpus) if args.corpus else tmp / "web"
        if args.web == "loopback":
            started = time.perf_counter()
            items = write_corpus(corpus, args.images)
            print(f"{args.images} images ready in {time.perf_counter() - started:.0f} s ({corpus})", flush=True)
            web = loopback_web(corpus, [name for name, _ in items])
            captions = [caption for _, caption in items]
        else:
            web = manyhosts_web(tmp, args.images, args)
            captions = [f"a smooth blend of colours, picture {i}" for i in range(args.images)]
        runs, failures = [], []
        with web as (urls, web_pid):
            url_list = tmp / "urls.parquet"
            pq.write_table(pa.Table.from_pylist([{"url": u, "caption": c} for u, c in zip(urls, captions)]), url_list)
            for i, side in enumerate(order):
                out = tmp / f"run{i}-{side}"
                web_cpu = web_cpu_seconds(web_pid)
                try:
                    run = run_img2dataset(url_list, out, args.images, args) if side == "img2dataset" else run_curate(
                        url_list, out, args, side)
                except (Exception, SystemExit) as err:  # noqa: BLE001 - a failed run is reported, not hidden
                    failures.append(f"run {i + 1} ({SIDES[side]}): {type(err).__name__}: {err}")
                    print(f"run {i + 1}/{len(order)}: {SIDES[side]}: FAILED: {err}", flush=True)
                    continue
                run.web_cpu_s = web_cpu_seconds(web_pid) - web_cpu
                print(f"run {i + 1}/{len(order)}: {SIDES[side]}: {run.images} images in {run.seconds:.1f} s "
                      f"({run.rate:.1f}/s, {1000 * run.cpu_s / max(1, run.images):.1f} CPU ms/image, "
                      f"web {1000 * run.web_cpu_s / max(1, run.images):.1f}), "
                      f"load {os.getloadavg()[0]:.1f}", flush=True)
                runs.append(run)
                import shutil

                shutil.rmtree(out, ignore_errors=True)
    if not any(r.side == "img2dataset" for r in runs):
        print("\n".join(failures))
        return 1
    report(runs, args)
    for failure in failures:
        print(f"FAILED, left out of the figures: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())

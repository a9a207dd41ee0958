"""Crawl-to-shards throughput: `beam run curate` against img2dataset's own
`download()`, on one generated corpus served from 127.0.0.1, in the same run.

    python -m benchmarks.curate_bench [--images 600] [--resize-mode keep_ratio]

Both fetch the same URLs, apply the same resize mode and write WebDataset
shards. img2dataset is set up deliberately: enough shards for every process
(its default of 10,000 samples per shard would leave one process busy) and
`incremental_mode="incremental"` on a fresh folder (`overwrite` deleted its own
temp folder here). Beam's local runner gets the same number of workers as
img2dataset gets processes; threads by default (`--beam-mode`): fetching,
JPEG decoding and OpenCV resizing release the GIL, and separate worker
processes cost their start-up. Figures are images written per second of wall
time, start-up included, and the ratio against img2dataset (target >= 1.0).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tarfile
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import yaml  # noqa: E402

from pipelines.testing import webcorpus  # noqa: E402
from pipelines.testing.localweb import LocalWeb  # noqa: E402


def serve_corpus(web: LocalWeb, n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        size = (rng.randrange(512, 1024), rng.randrange(512, 1024))
        colour, shape = rng.choice(list(webcorpus.COLOURS)), rng.choice(webcorpus.SHAPES)
        web.add(f"/b/{i}.jpg", webcorpus.jpeg(webcorpus.render(seed * 1_000_003 + i, size, colour, shape)))
        rows.append({"url": web.url(f"/b/{i}.jpg"), "caption": f"a {colour} {shape} on a patterned background"})
    return rows


def count_tar_images(folder: Path) -> int:
    count = 0
    for shard in folder.glob("*.tar"):
        with tarfile.open(shard) as tar:
            count += sum(1 for name in tar.getnames() if name.endswith((".jpg", ".png", ".webp")))
    return count


def run_img2dataset(urls: Path, out: Path, n: int, args) -> tuple[float, int]:
    from img2dataset import download

    processes = args.processes
    started = time.perf_counter()
    download(
        url_list=str(urls),
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        output_folder=str(out),
        output_format="webdataset",
        processes_count=processes,
        thread_count=args.threads,
        image_size=args.image_size,
        resize_mode=args.resize_mode,
        resize_only_if_bigger=True,
        number_sample_per_shard=max(1, n // (processes * 2)),
        incremental_mode="incremental",
        timeout=10,
        retries=0,
        enable_wandb=False,
        distributor="multiprocessing",
        user_agent_token="img2dataset",
        disallowed_header_directives=["noai", "noimageai", "noindex", "noimageindex"],
    )
    return time.perf_counter() - started, count_tar_images(out)


def run_curate(urls: Path, out: Path, args) -> tuple[float, int]:
    from pipelines.cli import main as beam_main

    config = {
        "crawl": {"threads": args.threads, "timeout_s": 10, "retries": 0, "max_per_host": args.threads, "batch_size": 64},
        "decode": {"resize_mode": args.resize_mode, "image_size": args.image_size, "min_side": 0},
        "caption": {"enabled": False},
        "shards": {"samples_per_shard": 1000, "writers": 2},
    }
    config_path = out.parent / "curate.yaml"
    config_path.write_text(yaml.safe_dump(config))
    beam_args = [f"--direct_num_workers={args.processes}", f"--direct_running_mode={args.beam_mode}"] if args.processes > 1 else []
    started = time.perf_counter()
    code = beam_main(
        ["run", "curate", "--input", str(urls), "--output", str(out), "--config", str(config_path), "--allow-private-network", *beam_args]
    )
    elapsed = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"curate failed with exit code {code}")
    return elapsed, count_tar_images(out / "shards")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--resize-mode", default="keep_ratio", choices=["no", "keep_ratio", "center_crop", "border"])
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--beam-mode", default="multi_threading", choices=["multi_processing", "multi_threading"],
                        help="How the local runner uses --processes workers.")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp, LocalWeb() as web:
        tmp = Path(tmp)
        print(f"generating {args.images} images ...", flush=True)
        rows = serve_corpus(web, args.images)
        urls = tmp / "urls.parquet"
        pq.write_table(pa.Table.from_pylist(rows), urls)
        results = {}
        t, n = run_img2dataset(urls, tmp / "img2dataset", args.images, args)
        results["img2dataset download()"] = (t, n)
        t, n = run_curate(urls, tmp / "curate", args)
        results["beam run curate"] = (t, n)

    base_t, base_n = results["img2dataset download()"]
    base_rate = base_n / base_t
    print()
    print(
        f"crawl to shards, {args.images} images, resize_mode={args.resize_mode}, {args.processes} workers "
        f"(img2dataset processes, Beam {args.beam_mode}), {args.threads} threads"
    )
    print(f"{'':<26}{'images':>8}{'seconds':>10}{'images/s':>10}{'ratio':>8}")
    for name, (t, n) in results.items():
        print(f"{name:<26}{n:>8}{t:>10.1f}{n / t:>10.1f}{(n / t) / base_rate:>8.2f}")
    print(json.dumps({name: {"images": n, "seconds": round(t, 2)} for name, (t, n) in results.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

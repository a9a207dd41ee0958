"""`make demo`: the whole product on an embedded default, offline.

1. Starts a local web on 127.0.0.1 with a few hundred generated, captioned
   images and every kind of bad row (see `pipelines/webcorpus.py`).
2. Runs `beam run curate` on it (DirectRunner) and prints the funnel.
3. Stops the server and says where the shards are; then hands over to the
   trainer's demo when it is available.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from pipelines import webcorpus
from pipelines.cli import main as beam_main
from pipelines.localweb import LocalWeb

LOG = logging.getLogger("demo")

DEMO_CONFIG = {
    "read": {"width_col": "width", "height_col": "height"},
    "crawl": {"timeout_s": 2.0, "retries": 1},
    "shards": {"samples_per_shard": 100, "writers": 2},
}


def curate(output: Path, n_images: int) -> Path:
    output.mkdir(parents=True, exist_ok=True)
    curated = output / "curated"
    if curated.exists():
        shutil.rmtree(curated)
    with LocalWeb() as web:
        print(f"demo: generating {n_images} images and serving them on {web.base_url} ...", flush=True)
        corpus = webcorpus.build_corpus(web, n_plain=n_images, seed=1)
        pq.write_table(pa.Table.from_pylist(corpus.rows), output / "urls.parquet")
        (output / "curate.yaml").write_text(yaml.safe_dump(DEMO_CONFIG, sort_keys=False))
        print(f"demo: {len(corpus.rows)} rows in {output / 'urls.parquet'}; running beam run curate", flush=True)
        started = time.monotonic()
        code = beam_main(
            [
                "run", "curate",
                "--input", str(output / "urls.parquet"),
                "--output", str(curated),
                "--config", str(output / "curate.yaml"),
                "--allow-private-network",
            ]
        )
        print(f"demo: curate took {time.monotonic() - started:.0f} s; local web stopped", flush=True)
    if code != 0:
        raise SystemExit(code)
    return curated


def train(output: Path, curated: Path) -> None:
    """Runs the trainer's demo on the shards, if the trainer provides one."""
    try:
        from trainer import demo as trainer_demo
    except ImportError:
        print("demo: the trainer is not built yet; stopping after curation")
        return
    trainer_demo.run(shards_dir=curated / "shards", output_dir=output / "train")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="demo-output", help="Where everything goes (default: demo-output/).")
    parser.add_argument("--images", type=int, default=300, help="Ordinary images in the generated web (default 300).")
    parser.add_argument("--skip-training", action="store_true", help="Stop after curation.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    output = Path(args.output).resolve()
    curated = curate(output, args.images)
    print(f"demo: shards in {curated / 'shards'}, index {curated / 'index.parquet'}, rejects {curated / 'rejects.parquet'}")
    if not args.skip_training:
        train(output, curated)
    return 0


if __name__ == "__main__":
    sys.exit(main())

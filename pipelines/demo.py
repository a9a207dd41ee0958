"""`make demo`: the whole product on an embedded default, offline.

1. Starts a local web on 127.0.0.1 with a few hundred generated, captioned
   images and every kind of bad row (see `pipelines/testing/webcorpus.py`).
2. Runs `beam run curate` on it (DirectRunner) and prints the funnel.
3. Stops the server and says where the shards are.
4. Trains a tiny latent-diffusion model on the shards with the trainer's own
   commands (`init-components`, `cache`, `fit`, `sample`) and writes a sample grid.
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

from pipelines.testing import webcorpus
from pipelines.cli import main as beam_main
from pipelines.testing.localweb import LocalWeb

LOG = logging.getLogger("demo")

DEMO_CONFIG = {
    "read": {"width_col": "width", "height_col": "height"},
    # The demo's one local server stands in for a whole web (its dead links and
    # timeouts included): give it a web's worth of budget, and do not declare it down.
    "crawl": {
        "timeout_s": 2.0,
        "retries": 1,
        "host_budgets": [{"pattern": "127.0.0.1", "max_per_host": 32, "max_host_rate": 1000.0}],
        "host_down_after": 1000,
    },
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


def train(output: Path, curated: Path, steps: int | None) -> None:
    """Caches latents from the curated shards, trains a tiny model, and samples
    a grid from its exported pipeline (the trainer's own commands)."""
    from trainer.cli import main as trainer_main

    shards = sorted(p.name for p in (curated / "shards").glob("*.tar"))
    spec = str(curated / "shards" / f"{{{shards[0][:-4]}..{shards[-1][:-4]}}}.tar")
    components, latents, run = output / "components", output / "latents", output / "run"
    for folder in (components, latents, run):
        if folder.exists():
            shutil.rmtree(folder)
    overrides = ["--set", f"max_steps={steps}"] if steps else []
    commands = [
        ["init-components", "--output", str(components)],
        ["cache", "--shards", spec, "--config", "demo", "--components", str(components), "--output", str(latents)],
        ["fit", "--config", "demo", "--components", str(components), "--cache", str(latents), "--output", str(run), *overrides],
        [
            "sample", "--run", str(run), "--out", str(output / "samples.png"), "--seed", "0",
            "--prompt", "a red circle on a patterned background",
            "--prompt", "a blue square on a patterned background",
            "--prompt", "a yellow triangle on a patterned background",
        ],
    ]
    for command in commands:
        print(f"demo: trainer {' '.join(command)}", flush=True)
        started = time.monotonic()
        code = trainer_main(command)
        if code:
            raise SystemExit(f"demo: trainer {command[0]} failed with exit code {code}")
        print(f"demo: trainer {command[0]} took {time.monotonic() - started:.0f} s", flush=True)
    print(f"demo: trained model in {run / 'export'}; sample grid {output / 'samples.png'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="demo-output", help="Where everything goes (default: demo-output/).")
    parser.add_argument("--images", type=int, default=300, help="Ordinary images in the generated web (default 300).")
    parser.add_argument("--skip-training", action="store_true", help="Stop after curation.")
    parser.add_argument("--steps", type=int, help="Training steps (default: the trainer's demo config).")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    output = Path(args.output).resolve()
    curated = curate(output, args.images)
    print(f"demo: shards in {curated / 'shards'}, index {curated / 'index.parquet'}, rejects {curated / 'rejects.parquet'}")
    if not args.skip_training:
        train(output, curated, args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())

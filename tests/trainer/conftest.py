"""Fixtures for the trainer tests: tiny offline components, curated-format shards, a latent cache.

Everything is generated here: the VAE, text encoder and tokenizer are built and saved with
`save_pretrained` and loaded back through `from_pretrained`, exactly as users load theirs;
the shards are written with `webdataset.TarWriter` in the curation pipeline's layout
(KEY.jpg/png, KEY.txt, KEY.json holding a `SampleRecord`).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import torch
import webdataset as wds

from schemas.records import Provenance, SampleRecord
from schemas.trainer import TrainConfig
from trainer.testing.shapes import PALETTE, SHAPES, original_caption, render, synthetic_caption

RESOLUTION = 32
TEXT_LENGTH = 12

# The tests' models are tiny: one intra-op thread is fastest, and on a shared 2-core
# machine more threads mostly spin-wait against other processes.
torch.set_num_threads(1)


def write_shards(
    directory: Path,
    *,
    shards: int,
    per_shard: int,
    seed: int = 0,
    synthetic_fraction: float = 0.75,
    combos: list[tuple[str, str, str]] | None = None,
    image_format: str = "png",
) -> list[str]:
    """Write `shards` tars of `per_shard` samples; returns their paths. Each image is
    non-square (so the loader's resize and center crop are exercised)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colors = list(PALETTE)
    paths = []
    row = 0
    for shard in range(shards):
        path = directory / f"{shard:06d}.tar"
        with wds.TarWriter(str(path)) as writer:
            for _ in range(per_shard):
                if combos:
                    shape, color, background = combos[rng.integers(len(combos))]
                else:
                    color, background = (str(c) for c in rng.choice(colors, size=2, replace=False))
                    shape = str(rng.choice(SHAPES))
                image = render(shape, color, background, 40, rng).resize((48, 40))
                buffer = io.BytesIO()
                image.save(buffer, format="PNG" if image_format == "png" else "JPEG", quality=95)
                key = f"{shard:05d}{row:06d}"
                synthetic = synthetic_caption(shape, color, background) if rng.random() < synthetic_fraction else None
                original = original_caption(shape, color, background)
                record = SampleRecord(
                    key=key,
                    url=f"http://example.test/{key}.{image_format}",
                    caption_original=original,
                    caption_synthetic=synthetic,
                    caption=synthetic or original,
                    width=48,
                    height=40,
                    image_format=image_format,
                    status="kept",
                    shard=path.name,
                    provenance=Provenance(source_file="input.parquet", source_row=row),
                )
                writer.write({"__key__": key, image_format: buffer.getvalue(), "txt": record.caption, "json": record.model_dump_json()})
                row += 1
        paths.append(str(path))
    return paths


def shard_spec(paths: list[str]) -> str:
    directory = Path(paths[0]).parent
    return f"{directory}/{{{Path(paths[0]).stem}..{Path(paths[-1]).stem}}}.tar"


def tiny_config(components_dir: Path, **sections) -> TrainConfig:
    """A TrainConfig for CPU tests: a 2-block, 32-wide denoiser on 8x8 latents."""
    tree = {
        "seed": 0,
        "max_steps": 6,
        "mixed_precision": "no",
        "components": {
            "vae": str(components_dir), "vae_subfolder": "vae",
            "text_encoder": str(components_dir), "text_encoder_subfolder": "text_encoder",
            "tokenizer": str(components_dir), "tokenizer_subfolder": "tokenizer",
            "max_text_length": TEXT_LENGTH,
        },
        "model": {"preset": "tiny", "hidden_size": 32, "depth": 2, "num_heads": 2},
        "data": {"resolution": RESOLUTION, "batch_size": 4, "num_workers": 0, "prefetch_factor": 2, "shuffle_span": 2, "synthetic_caption_prob": 0.5},
        "cache": {"dtype": "float32", "batch_size": 8, "samples_per_file": 8, "num_workers": 0},
        "optim": {"lr": 1e-3, "warmup_steps": 2, "ema_decay": 0.9},
        "validation": {"every_steps": 0, "steps": 4, "images_per_prompt": 1, "prompts": ["a red circle on a blue background"]},
        "checkpoint": {"every_steps": 3, "keep_last": 3},
        "logging": {"every_steps": 1, "tracker": "none"},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            tree.setdefault(section, {}).update(values)
        else:
            tree[section] = values
    return TrainConfig.model_validate(tree)


@pytest.fixture(scope="session")
def components_dir(tmp_path_factory) -> Path:
    from trainer.testing.components import build_demo_components

    directory = tmp_path_factory.mktemp("components")
    # 400 VAE steps (~15 s): enough that decoded colours are right (the learning test reads them).
    build_demo_components(directory, resolution=RESOLUTION, max_text_length=TEXT_LENGTH, vae_steps=400)
    return directory


@pytest.fixture(scope="session")
def shard_paths(tmp_path_factory) -> list[str]:
    return write_shards(tmp_path_factory.mktemp("shards"), shards=4, per_shard=12)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory, components_dir, shard_paths) -> Path:
    from trainer.cache import build_cache

    directory = tmp_path_factory.mktemp("cache")
    build_cache(tiny_config(components_dir), shard_spec(shard_paths), directory)
    return directory


# Source image sizes (width, height) from 1:3 to 3:1, for the bucket tests.
ASPECT_SIZES = [(20, 60), (24, 48), (30, 45), (36, 36), (45, 30), (48, 24), (60, 20), (40, 40), (54, 27), (27, 54)]


def write_aspect_shards(directory: Path, *, shards: int, per_shard: int, sizes=ASPECT_SIZES, seed: int = 0) -> list[str]:
    """Shards of coloured shapes whose source sizes cycle through `sizes` (mixed aspect
    ratios); each SampleRecord's width/height is the source size."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colors = list(PALETTE)
    paths, row = [], 0
    for shard in range(shards):
        path = directory / f"{shard:06d}.tar"
        with wds.TarWriter(str(path)) as writer:
            for _ in range(per_shard):
                width, height = sizes[row % len(sizes)]
                color, background = (str(c) for c in rng.choice(colors, size=2, replace=False))
                shape = str(rng.choice(SHAPES))
                image = render(shape, color, background, 64, rng).resize((width, height))
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                key = f"{shard:05d}{row:06d}"
                caption = synthetic_caption(shape, color, background)
                record = SampleRecord(
                    key=key, url=f"http://example.test/{key}.png", caption_original=original_caption(shape, color, background),
                    caption_synthetic=caption, caption=caption, width=width, height=height, image_format="png", status="kept",
                    shard=path.name, provenance=Provenance(source_file="input.parquet", source_row=row),
                )
                writer.write({"__key__": key, "png": buffer.getvalue(), "txt": caption, "json": record.model_dump_json()})
                row += 1
        paths.append(str(path))
    return paths


@pytest.fixture(scope="session")
def aspect_shard_paths(tmp_path_factory) -> list[str]:
    return write_aspect_shards(tmp_path_factory.mktemp("aspect-shards"), shards=4, per_shard=15)


def bucket_config(components_dir: Path, **sections) -> TrainConfig:
    """`tiny_config` with aspect buckets (and so size conditioning) on."""
    data = {"buckets": True, "max_aspect": 3.0}
    data.update(sections.pop("data", {}))
    return tiny_config(components_dir, data=data, **sections)


@pytest.fixture(scope="session")
def bucket_cache_dir(tmp_path_factory, components_dir, aspect_shard_paths) -> Path:
    from trainer.cache import build_cache

    directory = tmp_path_factory.mktemp("bucket-cache")
    build_cache(bucket_config(components_dir, cache={"samples_per_file": 4}), shard_spec(aspect_shard_paths), directory)
    return directory


@pytest.fixture(scope="session")
def lora_base_run(tmp_path_factory, components_dir) -> Path:
    """A base model trained on palette shapes (never the concept colour), built
    once per session: the LoRA tests learn on it and the UI tests drive it."""
    from tests.trainer.lora_helpers import train_base

    return train_base(tmp_path_factory.mktemp("lora_base"), components_dir)


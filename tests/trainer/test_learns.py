"""The model learns: loss falls, and images for held-out prompts follow the prompt.

Data: coloured shapes on flat backgrounds, captioned "a red circle on a blue background"
(and in a terse alt-text form). Six (shape, colour, background) combinations never appear
in training; their prompts are the test. Each combination has a different background
colour, which covers most of the image, so a generated image follows its prompt when its
median pixel is nearest (in RGB) to the prompt's background colour, and its latent is
nearest to the mean training latent of images with that background. Six colours: chance
is 1/6 for both.
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import torch
from safetensors import safe_open

from schemas.records import SampleRecord
from tests.trainer.conftest import shard_spec, tiny_config, write_shards
from trainer.cache import build_cache, read_manifest
from trainer.components import load_components
from trainer.data import index_tar, read_member
from trainer.testing.shapes import PALETTE, SHAPES, nearest_color, synthetic_caption
from trainer.export import load_exported_pipeline
from trainer.train import fit

HELD_OUT = [
    ("circle", "red", "blue"),
    ("square", "green", "yellow"),
    ("triangle", "blue", "black"),
    ("circle", "yellow", "white"),
    ("square", "black", "red"),
    ("triangle", "white", "green"),
]
PER_PROMPT = 8


def background_centroids(cache_dir) -> dict[str, torch.Tensor]:
    by_background: dict[str, list[torch.Tensor]] = {c: [] for c in PALETTE}
    for entry in read_manifest(cache_dir).files:
        with safe_open(str(cache_dir / entry.file), "pt") as handle:
            keys, latents = json.loads(handle.metadata()["keys"]), handle.get_tensor("latents")
        with open(entry.source, "rb") as shard:
            records = {s.key: SampleRecord.model_validate_json(read_member(shard, *s.members["json"])) for s in index_tar(entry.source)}
        for key, latent in zip(keys, latents):
            background = records[key].caption_original.rsplit(", ", 1)[1]
            by_background[background].append(latent)
    return {c: torch.stack(v).mean(0) for c, v in by_background.items()}


def test_model_learns_and_follows_held_out_prompts(tmp_path, components_dir):
    colors = list(PALETTE)
    combos = [(s, c, b) for s in SHAPES for c in colors for b in colors if c != b and (s, c, b) not in HELD_OUT]
    paths = write_shards(tmp_path / "shards", shards=4, per_shard=64, combos=combos, synthetic_fraction=0.7)
    cache = tmp_path / "cache"
    build_cache(tiny_config(components_dir, cache={"samples_per_file": 64}), shard_spec(paths), cache)

    config = tiny_config(
        components_dir,
        max_steps=600,
        model={"preset": "tiny", "hidden_size": 64, "depth": 4, "num_heads": 4},
        data={"cache": str(cache), "batch_size": 32, "synthetic_caption_prob": 1.0},
        optim={"lr": 4e-3, "warmup_steps": 30, "ema_decay": 0.99, "min_lr_ratio": 0.1},
        checkpoint={"every_steps": 10_000},
        logging={"every_steps": 20},
    )
    with contextlib.redirect_stderr(io.StringIO()):  # the progress bar
        fit(config, tmp_path / "run")

    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert np.mean(losses[-5:]) < 0.3 * losses[0], losses

    pipe = load_exported_pipeline(tmp_path / "run")
    pipe.set_progress_bar_config(disable=True)
    prompts = [synthetic_caption(*combo) for combo in HELD_OUT]
    truth = [background for _, _, background in HELD_OUT for _ in range(PER_PROMPT)]
    run = dict(num_images_per_prompt=PER_PROMPT, num_inference_steps=12, guidance_scale=4.0)
    latents = pipe(prompts, generator=torch.Generator().manual_seed(0), output_type="latent", **run).images
    components = load_components(config.components)
    scaled = (latents - components.shift_factor) * components.scaling_factor
    centroids = background_centroids(cache)
    names = list(centroids)
    table = torch.stack([centroids[n] for n in names])  # (6, C, h, w)
    predicted = [names[int(((table - z) ** 2).flatten(1).sum(1).argmin())] for z in scaled]
    accuracy = float(np.mean([p == t for p, t in zip(predicted, truth)]))

    images = pipe(prompts, generator=torch.Generator().manual_seed(0), output_type="np", **run).images
    pixel = float(np.mean([nearest_color(np.median(im.reshape(-1, 3), 0) * 255) == t for im, t in zip(images, truth)]))
    print(f"held-out prompts: background right in {accuracy:.0%} of latents, {pixel:.0%} of decoded images (chance {1 / len(names):.0%})")
    assert pixel >= 0.5, "decoded images: prompt's background colour not dominant"
    assert accuracy >= 0.4, list(zip(predicted, truth))

"""Builders and measurements for the LoRA tests: image folders, a base model, and a way to
tell whether a sample shows the new concept.

The concept is a background colour the base model never saw (magenta: not in the demo
palette), bound to the trigger word `zxq`. Whether a sample shows it is measured on the
latents the pipeline produces, not on decoded pixels: each latent pixel (a C-vector) is
assigned to the nearest of the latents that flat images of each palette colour and of the
concept colour encode to; the concept's share of latent pixels is the "fraction of pixels
near the concept colour". The tiny test VAE separates colours in its latent space far
better than its decoder reproduces them.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from schemas.lora import LoraTrainConfig
from tests.trainer.conftest import shard_spec, tiny_config, write_shards
from trainer.testing.shapes import PALETTE, SHAPES

TRIGGER = "zxq"
CONCEPT_RGB = (230, 40, 200)  # magenta, absent from the base model's palette
IMAGE_SIZE = 48


def draw_shape(shape: str, color: tuple[int, int, int], background: tuple[int, int, int], width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """A width x height image: flat `background` and one `shape` in `color` (side 30-50% of the shorter side)."""
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    side = min(width, height) * rng.uniform(0.3, 0.5)
    x0, y0 = rng.uniform(0, width - side), rng.uniform(0, height - side)
    box = (x0, y0, x0 + side, y0 + side)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([(x0 + side / 2, y0), (x0, y0 + side), (x0 + side, y0 + side)], fill=color)
    return image


def base_colors() -> list[str]:
    return list(PALETTE)


def write_concept_folder(directory: Path, count: int = 20, seed: int = 1) -> Path:
    """`count` PNGs of palette shapes on the concept colour, captioned `a red circle on a zxq background`."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colors = base_colors()
    for i in range(count):
        shape, color = SHAPES[i % len(SHAPES)], colors[i % len(colors)]
        draw_shape(shape, PALETTE[color], CONCEPT_RGB, IMAGE_SIZE, IMAGE_SIZE, rng).save(directory / f"concept{i:02d}.png")
        (directory / f"concept{i:02d}.txt").write_text(f"a {color} {shape} on a {TRIGGER} background")
    return directory


def write_odd_folder(directory: Path, sizes: list[tuple[int, int]], seed: int = 2) -> Path:
    """One image per (width, height), mixed formats (PNG, JPEG, WebP), captions on every other one."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colors = base_colors()
    formats = [("png", "PNG"), ("jpg", "JPEG"), ("webp", "WEBP")]
    for i, (width, height) in enumerate(sizes):
        extension, fmt = formats[i % len(formats)]
        color = colors[i % len(colors)]
        image = draw_shape(SHAPES[i % len(SHAPES)], PALETTE[color], CONCEPT_RGB, width, height, rng)
        image.save(directory / f"odd{i:02d}.{extension}", format=fmt, quality=95)
        if i % 2 == 0:
            (directory / f"odd{i:02d}.txt").write_text(f"a {color} {SHAPES[i % len(SHAPES)]} on a {TRIGGER} background")
    return directory


def train_base(root: Path, components_dir: Path, steps: int = 400) -> Path:
    """A base model trained with `trainer fit` on palette shapes (never the concept colour);
    returns its run folder (export in `run/export`)."""
    from trainer.cache import build_cache
    from trainer.train import fit

    paths = write_shards(root / "shards", shards=2, per_shard=64, synthetic_fraction=1.0)
    cache = root / "cache"
    config = tiny_config(
        components_dir,
        max_steps=steps,
        model={"preset": "tiny", "hidden_size": 64, "depth": 4, "num_heads": 4},
        data={"batch_size": 32, "synthetic_caption_prob": 1.0},
        cache={"samples_per_file": 64},
        optim={"lr": 4e-3, "warmup_steps": 30, "ema_decay": 0.99, "min_lr_ratio": 0.1},
        checkpoint={"every_steps": 10_000},
        logging={"every_steps": 50},
    )
    build_cache(config, shard_spec(paths), cache)
    config = config.model_copy(update={"data": config.data.model_copy(update={"cache": str(cache)})})
    with contextlib.redirect_stderr(io.StringIO()):  # progress bars
        fit(config, root / "run")
    return root / "run"


def reference_latents(components, colors: dict[str, tuple[int, int, int]], size: int = 32) -> tuple[list[str], torch.Tensor]:
    """Names and (K, C) latent vectors of flat images of each colour (centre of the latent)."""
    rows = []
    for rgb in colors.values():
        pixels = torch.tensor(rgb, dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, size, size).contiguous()
        latent = components.encode_images(pixels)[0]  # (C, h, w)
        h, w = latent.shape[1:]
        rows.append(latent[:, h // 4 : 3 * h // 4, w // 4 : 3 * w // 4].flatten(1).mean(1))
    return list(colors), torch.stack(rows)


def color_fractions(latents: torch.Tensor, names: list[str], references: torch.Tensor) -> dict[str, float]:
    """Share of latent pixels (B, C, h, w) nearest each reference colour."""
    pixels = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])  # (B*h*w, C)
    nearest = torch.cdist(pixels.float(), references.float()).argmin(1)
    return {name: float((nearest == i).float().mean()) for i, name in enumerate(names)}


def sample_latents(pipe, prompt: str, components, count: int, steps: int = 10, guidance: float = 4.0, seed: int = 0) -> torch.Tensor:
    """`count` samples of `prompt` as scaled latents (what training latents look like)."""
    out = pipe([prompt], num_images_per_prompt=count, num_inference_steps=steps, guidance_scale=guidance, generator=torch.Generator().manual_seed(seed), output_type="latent").images
    return (out.float() - components.shift_factor) * components.scaling_factor


def comfyui_merged(state_dict: dict[str, torch.Tensor], comfy: dict[str, torch.Tensor], strength: float) -> dict[str, torch.Tensor]:
    """The base weights with a kohya/ComfyUI LoRA merged the way ComfyUI does it: for every
    `lora_unet_X` it finds the model weight `diffusion_model.<path>.weight` whose path with
    dots as underscores is X, and adds strength * alpha / rank * up @ down."""
    by_name = {"lora_unet_" + key[: -len(".weight")].replace(".", "_"): key for key in state_dict if key.endswith(".weight")}
    merged = dict(state_dict)
    names = {key.split(".", 1)[0] for key in comfy}
    for name in names:
        target = by_name[name]  # KeyError: a LoRA key that names no weight
        down, up = comfy[f"{name}.lora_down.weight"].float(), comfy[f"{name}.lora_up.weight"].float()
        alpha = float(comfy[f"{name}.alpha"])
        merged[target] = state_dict[target] + strength * (alpha / down.shape[0]) * (up @ down)
    return merged


def short_config(**sections) -> LoraTrainConfig:
    """A LoRA config for quick CPU runs."""
    tree = {
        "trigger": TRIGGER,
        "log_every_steps": 2,
        "adapter": {"rank": 4},
        "optim": {"steps": 6, "lr": 3e-3, "batch_size": 4, "warmup_steps": 2},
        "prior": {"images": 4, "sample_steps": 2},
        "holdout": {"images": 2, "every_steps": 2},
        "preview": {"every_steps": 0, "steps": 2, "images_per_prompt": 1},
        "checkpoint": {"every_steps": 4},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            tree.setdefault(section, {}).update(values)
        else:
            tree[section] = values
    return LoraTrainConfig.model_validate(tree)

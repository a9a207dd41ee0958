"""Planted duplicate groups and a tiny CLIP that can tell them apart, for the
semantic dedup, embeddings and decontamination tests.

The tiny model is a real open_clip architecture saved and loaded through
`create_model_and_transforms`, with random weights. Its vision tower takes the
whole 32x32 input as a single patch (`patch_size` = `image_size`) and average
pools, so its image embedding is a random projection of the normalised pixels
followed by one transformer block: copies of a picture (re-encoded, resized,
cropped by a few per cent) stay close, and pictures with the same colours but
another layout do not. (The 8-pixel-patch tiny model of tests/models.py puts
every image within cosine 0.93-0.999 of every other, so no threshold separates
anything with it.)
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from schemas import ImageRef, Provenance, SampleRecord
from stages.core.phash import compute_phash

PIXEL_CLIP_NAME = "imagemill-pixel-clip"
PIXEL_CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {
        "image_size": 32,
        "patch_size": 32,
        "layers": 1,
        "width": 128,
        "head_width": 32,
        "pool_type": "avg",
        "no_ln_pre": True,
    },
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def save_pixel_clip(directory, *, seed: int = 0):
    """Write the architecture config and random safetensors weights; returns
    (config_path, weights_path) for a ClipConfig."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / f"{PIXEL_CLIP_NAME}.json"
    config_path.write_text(json.dumps(PIXEL_CLIP_CONFIG))
    if PIXEL_CLIP_NAME not in open_clip.list_models():
        open_clip.add_model_config(config_path)
    torch.manual_seed(seed)
    state = open_clip.create_model(PIXEL_CLIP_NAME).state_dict()
    # Blind the patch projection to a uniform colour (each kernel's spatial mean
    # removed), so the embedding follows the layout, not the average colour.
    kernel = state["visual.conv1.weight"]  # [width, 3, 32, 32]
    state["visual.conv1.weight"] = kernel - kernel.mean(dim=(2, 3), keepdim=True)
    weights = directory / "pixel_clip.safetensors"
    save_file(state, weights)
    return config_path, weights


def scene(rng: np.random.Generator, colours, size: int = 96) -> Image.Image:
    """A two-colour picture: a gradient in a random direction and four shapes."""
    a, b = colours
    y, x = np.mgrid[0:size, 0:size] / size
    angle = rng.uniform(0, 2 * np.pi)
    t = np.clip(0.5 + (x - 0.5) * np.cos(angle) + (y - 0.5) * np.sin(angle), 0, 1)[..., None]
    image = Image.fromarray((a * (1 - t) + b * t).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = rng.integers(0, size - 24, 2)
        side = int(rng.integers(12, 40))
        fill = tuple(int(v) for v in (b if rng.random() < 0.5 else a))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x0, y0, x0 + side, y0 + side // 2 + 6], fill=fill)
    return image


def reencoded(image: Image.Image, quality: int = 70) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def resized(image: Image.Image, scale: float = 0.75) -> Image.Image:
    return image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)


def cropped(image: Image.Image, fraction: float = 0.04) -> Image.Image:
    dx, dy = round(image.width * fraction), round(image.height * fraction)
    return image.crop((dx, dy, image.width - dx, image.height - dy))


COPIES = {"exact": None, "reencoded": reencoded, "resized": resized, "cropped": cropped}


def planted(groups: int, singles: int, seed: int = 0):
    """Items `(key, image, group)`: per group an original `gN-original` and its
    copies (`gN-exact` with the same bytes, `gN-reencoded`, `gN-resized`,
    `gN-cropped`) in group N; per group an unrelated picture with the same two
    colours `uN` and `singles` more unrelated pictures `sN`, each in no group
    (None)."""
    rng = np.random.default_rng(seed)
    items = []
    for g in range(groups):
        colours = (rng.uniform(0, 255, 3), rng.uniform(0, 255, 3))
        original = scene(rng, colours)
        items.append((f"g{g}-original", original, g))
        for name, make in COPIES.items():
            items.append((f"g{g}-{name}", original if make is None else make(original), g))
        items.append((f"u{g}", scene(rng, colours), None))
    for s in range(singles):
        items.append((f"s{s}", scene(rng, (rng.uniform(0, 255, 3), rng.uniform(0, 255, 3))), None))
    return items


def stage(directory, items, captions=None) -> list[SampleRecord]:
    """Stage the items as PNG (lossless: the model sees the pixels the
    reference sees) the way the curate pipeline does; one record each."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "staged.bin"
    records, offset = [], 0
    with open(path, "wb") as f:
        for i, (key, image, _) in enumerate(items):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            data = buffer.getvalue()
            f.write(data)
            records.append(
                SampleRecord(
                    key=key,
                    url=f"http://example.test/{key}.png",
                    caption_original=captions[i] if captions else f"a picture called {key}",
                    width=image.width,
                    height=image.height,
                    original_width=image.width,
                    original_height=image.height,
                    image_format="png",
                    image_bytes=len(data),
                    phash=compute_phash(data),  # as the decode step sets it
                    provenance=Provenance(source_file="input.parquet", source_row=i),
                    image_ref=ImageRef(path=str(path), offset=offset, length=len(data)),
                )
            )
            offset += len(data)
    return records


def reference_embeddings(clip, images, captions):
    """open_clip used directly: (similarity [N], image embeddings [N, D], text embeddings [N, D])."""
    import open_clip
    import torch

    model, _, preprocess = open_clip.create_model_and_transforms(clip.model, pretrained=clip.pretrained)
    model.eval()
    tokenizer = open_clip.get_tokenizer(clip.model)
    with torch.no_grad():
        image = model.encode_image(torch.stack([preprocess(im) for im in images]))
        text = model.encode_text(tokenizer(captions))
    image = (image / image.norm(dim=-1, keepdim=True)).numpy()
    text = (text / text.norm(dim=-1, keepdim=True)).numpy()
    return (image * text).sum(-1), image, text

"""Coloured shapes with captions: synthetic images for the demo components and the tests.

Each image is a flat background colour with one shape of another colour on it, so a
caption names the colour that fills most of the image ("a red circle on a blue
background"), and whether a generated image follows its prompt can be measured by its
dominant colour.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 215, 40),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle")


def render(shape: str, color: str, background: str, size: int, rng: np.random.Generator) -> Image.Image:
    """A `size` x `size` RGB image: `background` fill and one `shape` in `color`, covering
    roughly 10-25% of the area at a random position."""
    image = Image.new("RGB", (size, size), PALETTE[background])
    draw = ImageDraw.Draw(image)
    side = size * rng.uniform(0.3, 0.5)
    x0 = rng.uniform(0, size - side)
    y0 = rng.uniform(0, size - side)
    box = (x0, y0, x0 + side, y0 + side)
    fill = PALETTE[color]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0 + side / 2, y0), (x0, y0 + side), (x0 + side, y0 + side)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    return image


def synthetic_caption(shape: str, color: str, background: str) -> str:
    return f"a {color} {shape} on a {background} background"


def original_caption(shape: str, color: str, background: str) -> str:
    """Terse alt-text style: what a web page might say."""
    return f"{color} {shape}, {background}"


def random_images(count: int, size: int, seed: int) -> np.ndarray:
    """(count, size, size, 3) uint8 random shape images (for training the demo VAE)."""
    rng = np.random.default_rng(seed)
    colors = list(PALETTE)
    out = np.empty((count, size, size, 3), dtype=np.uint8)
    for i in range(count):
        color, background = rng.choice(colors, size=2, replace=False)
        out[i] = np.asarray(render(str(rng.choice(SHAPES)), str(color), str(background), size, rng))
    return out


def nearest_color(rgb: np.ndarray) -> str:
    """Name of the palette colour nearest (Euclidean in RGB) to `rgb` (3,)."""
    names = list(PALETTE)
    table = np.array([PALETTE[n] for n in names], dtype=np.float64)
    return names[int(np.argmin(((table - np.asarray(rgb, dtype=np.float64)) ** 2).sum(1)))]

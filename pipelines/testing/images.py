"""Synthetic images for the demo, the tests and the benchmarks, in one place: the
photo-like pictures of the generated web (`render`, `jpeg`; `webcorpus.py` builds its
corpus from them), photo-like pictures and their edited copies for the dedup
benchmark (`synthetic_photo`, `crop_fraction`, `resized`), smooth colour fields
(`colour_field_jpegs`) and gradient-and-shape images (`make_images`), and
`staged_records`, which stages any of them as the curate pipeline does. Test and
benchmark aid, not product code. (The trainer's labelled coloured shapes, whose
captions can be checked from their pixels, are `trainer/testing/shapes.py`: the
trainer does not import the pipelines.)"""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from schemas import ImageRef, Provenance, SampleRecord

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (240, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ["circle", "square", "triangle", "ring"]


def render(seed: int, size: tuple[int, int], colour: str | None = None, shape: str | None = None) -> Image.Image:
    """A photograph-like picture: a smooth background, a few shapes and noise,
    different enough per seed that unrelated images are far apart in pHash."""
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [
            127 + 100 * np.sin(x / width * rng.uniform(1, 6) + rng.uniform(0, 6))
            * np.cos(y / height * rng.uniform(1, 6) + rng.uniform(0, 6))
            for _ in range(3)
        ],
        axis=-1,
    )
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    pyrng = random.Random(seed)
    for _ in range(6):
        x0, y0 = pyrng.uniform(0, width * 0.8), pyrng.uniform(0, height * 0.8)
        x1, y1 = x0 + pyrng.uniform(0.1, 0.5) * width, y0 + pyrng.uniform(0.1, 0.5) * height
        fill = tuple(pyrng.randrange(256) for _ in range(3))
        (draw.ellipse if pyrng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=fill)
    if colour is not None:
        s = min(width, height)
        box = [width / 2 - s / 3, height / 2 - s / 3, width / 2 + s / 3, height / 2 + s / 3]
        fill = COLOURS[colour]
        if shape == "square":
            draw.rectangle(box, fill=fill)
        elif shape == "triangle":
            draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) / 2, box[1])], fill=fill)
        elif shape == "ring":
            draw.ellipse(box, outline=fill, width=max(4, s // 12))
        else:
            draw.ellipse(box, fill=fill)
    noise = rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8), "RGB")


def jpeg(img: Image.Image, quality: int = 90, **kwargs) -> bytes:
    out = io.BytesIO()
    img.save(out, "JPEG", quality=quality, **kwargs)
    return out.getvalue()


def png(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


def background_field(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Smooth colour field with detail at three scales (float32, HxWx3, 0..255)."""

    def field(cells: int) -> np.ndarray:
        base = rng.uniform(0, 255, size=(cells, cells, 3)).astype(np.uint8)
        return np.asarray(Image.fromarray(base, "RGB").resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)

    return 0.65 * field(4) + 0.25 * field(12) + 0.10 * field(40)


def synthetic_photo(
    rng: np.random.Generator, width: int, height: int, background: np.ndarray | None = None
) -> Image.Image:
    """A photo-like RGB image: multi-scale colour background, 3-9 solid shapes,
    slight blur and sensor-like noise (sigma 4). Pass `background` to make a
    "sibling": same scene, different objects."""
    if background is None:
        background = background_field(rng, width, height)
    img = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 10))):
        x0, y0 = rng.uniform(-0.1, 0.9) * width, rng.uniform(-0.1, 0.9) * height
        w, h = rng.uniform(0.05, 0.45) * width, rng.uniform(0.05, 0.45) * height
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = int(rng.integers(0, 3))
        if kind == 0:
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=colour)
        elif kind == 1:
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=colour)
        else:
            draw.polygon([(x0 + rng.uniform(0, w), y0 + rng.uniform(0, h)) for _ in range(int(rng.integers(3, 7)))], fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(radius=max(0.8, width / 600)))
    noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, 4, size=(height, width, 1)).astype(np.float32)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def jpeg_bytes(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def crop_fraction(rng: np.random.Generator, img: Image.Image, low: float = 0.02, high: float = 0.05) -> Image.Image:
    """Cut `low`..`high` of each dimension, split randomly between the two sides."""
    width, height = img.size
    fx, fy = rng.uniform(low, high, size=2)
    left, top = int(width * fx * rng.uniform()), int(height * fy * rng.uniform())
    return img.crop((left, top, left + width - int(width * fx), top + height - int(height * fy)))


def resized(img: Image.Image, factor: float) -> Image.Image:
    return img.resize((max(1, int(img.size[0] * factor)), max(1, int(img.size[1] * factor))), Image.Resampling.BICUBIC)


def colour_field_jpegs(count: int, width: int, height: int | None = None, seed: int = 0) -> list[bytes]:
    """JPEGs (quality 90) of smooth random colour fields, `width` x `height` (default
    square): cheap to make, realistic to decode."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((width, height or width), Image.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def staged_records(directory, images, captions=None, *, fmt: str = "JPEG"):
    """Stage `images` (PIL images, encoded as `fmt`, or already encoded bytes) the
    way the curate pipeline does: their bytes concatenated into one file
    `DIR/staged.bin`, one SampleRecord per image whose `image_ref` points at its
    byte range. Keys are `k000`, `k001`, ..."""

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "staged.bin"
    records, offset = [], 0
    extension = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt]
    with open(path, "wb") as f:
        for i, image in enumerate(images):
            if isinstance(image, bytes):
                data = image
                image = Image.open(io.BytesIO(data))  # reads the header only: the size
            else:
                buffer = io.BytesIO()
                image.save(buffer, format=fmt)
                data = buffer.getvalue()
            f.write(data)
            caption = captions[i] if captions is not None else f"a picture number {i}"
            records.append(
                SampleRecord(
                    key=f"k{i:03d}",
                    url=f"http://example.test/{i}.{extension}",
                    caption_original=caption,
                    width=image.width,
                    height=image.height,
                    original_width=image.width,
                    original_height=image.height,
                    image_format=extension,
                    image_bytes=len(data),
                    provenance=Provenance(source_file="input.parquet", source_row=i),
                    image_ref=ImageRef(path=str(path), offset=offset, length=len(data)),
                )
            )
            offset += len(data)
    return records


def make_images(count: int, *, size: int = 64, seed: int = 0):
    """`count` distinct RGB PIL images (smooth colour gradients plus shapes)."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        y, x = np.mgrid[0:size, 0:size] / size
        base = rng.uniform(0, 255, 3)
        slope = rng.uniform(-120, 120, (2, 3))
        pixels = base + x[..., None] * slope[0] + y[..., None] * slope[1]
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        x0, y0 = rng.integers(0, size // 2, 2)
        draw.ellipse([x0, y0, x0 + size // 3, y0 + size // 4], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        images.append(image)
    return images

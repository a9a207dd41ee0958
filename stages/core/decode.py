"""The one image decoder: decode, resolution floor, normalisation and optional
resize (`decode_image`, the decode stage's core), and `decode_rgb` for model
inputs. Plain Python, no Beam; `stages/resolution.py` is the Beam adapter.

Kept: images that decode completely, whose shorter side is at least
`min_side` px (default 512; 0 disables) and whose longer/shorter ratio is at
most `max_aspect_ratio` (default 3), measured after EXIF rotation.

Dropped, each with its reason: `empty_body` (zero bytes), `not_an_image` (HTML
or anything PIL cannot identify), `truncated_image` (the data ends early),
`animated_image` (more than one frame: a GIF/WebP/APNG animation is not a
training image), `decompression_bomb` (more than `max_pixels`, checked from the
header before decoding), `unsupported_mode`, `too_small`, `aspect_ratio`,
`resize_failed`.

Handled rather than dropped: EXIF orientation (pixels rotated upright), CMYK and
palette images (converted to RGB), 16-bit images (scaled to 8 bits), alpha
(composited on white, as img2dataset does). An image that needs none of this
and no resize is stored byte for byte in its original format (jpg/png/webp).

Resizing uses img2dataset's `Resizer` and its modes (`keep_ratio`,
`keep_ratio_largest`, `center_crop`, `border`). Its calls are serialised per
process because it redirects the process's stdout/stderr around each image,
which is not safe from several threads at once.

The same step hashes the downloaded bytes (SHA-256, for exact dedup) and the
picture (64-bit pHash, for near dedup) while they are in memory.
"""

from __future__ import annotations

import dataclasses
import io
import os
import threading
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from schemas import DecodeConfig, RejectReason
from stages.core.verdict import Drop
from stages.core.phash import compute_phash, digest_image

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

_KEEP_AS_IS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_EXIF_ORIENTATION = 0x0112
_RESIZER_LOCK = threading.Lock()


@dataclasses.dataclass(slots=True)
class Decoded:
    """What the decode step learnt about an image: the bytes to store, their format
    and size, the size before any resize (after EXIF rotation), and the pHash."""

    data: bytes
    fmt: str
    width: int
    height: int
    original_width: int
    original_height: int
    phash: str


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "I;16N"):
        arr = np.asarray(img)
        scale = 65535.0 if arr.max(initial=0) > 255 or img.mode.startswith("I;16") else 255.0
        img = Image.fromarray(np.clip(arr.astype(np.float64) / scale * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def _encode(img: Image.Image, fmt: str, quality: int) -> bytes:
    out = io.BytesIO()
    if fmt == "jpg":
        img.save(out, "JPEG", quality=quality)
    elif fmt == "webp":
        img.save(out, "WEBP", quality=quality)
    else:
        img.save(out, "PNG")
    return out.getvalue()


def _resizer(config: DecodeConfig):
    from img2dataset.resizer import Resizer

    return Resizer(
        image_size=config.image_size,
        resize_mode=config.resize_mode,
        resize_only_if_bigger=config.resize_only_if_bigger,
        encode_format=config.encode_format,
        encode_quality=config.encode_quality if config.encode_format != "png" else 9,
    )


def decode_image(data: bytes, config: DecodeConfig, resizer=None) -> Decoded | Drop:
    """Check and normalise one downloaded image. Pure function; `resizer` is an
    img2dataset Resizer when `config.resize_mode != "no"`."""
    if not data:
        return Drop(RejectReason.EMPTY_BODY)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        head = data[:64].lstrip().lower()
        kind = "HTML" if head.startswith((b"<!doctype", b"<html", b"<")) else "unknown data"
        return Drop(RejectReason.NOT_AN_IMAGE, f"{kind}, {len(data)} bytes")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        return Drop(RejectReason.DECOMPRESSION_BOMB, str(err)[:200])
    except Exception as err:  # PIL raises many types for corrupt headers
        return Drop(RejectReason.NOT_AN_IMAGE, f"{type(err).__name__}: {err}"[:200])

    width, height = img.size
    if width * height > config.max_pixels:
        return Drop(RejectReason.DECOMPRESSION_BOMB, f"{width}x{height} > {config.max_pixels} pixels")
    if getattr(img, "n_frames", 1) > 1:
        return Drop(RejectReason.ANIMATED_IMAGE, f"{img.n_frames} frames")
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:
        orientation = 1
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    if config.min_side and min(width, height) < config.min_side:
        return Drop(RejectReason.TOO_SMALL, f"{width}x{height} < {config.min_side}px")
    if max(width, height) / max(1, min(width, height)) > config.max_aspect_ratio:
        return Drop(RejectReason.ASPECT_RATIO, f"{width}x{height} > {config.max_aspect_ratio}:1")

    fmt = _KEEP_AS_IS.get(img.format or "")
    needs_normalising = fmt is None or orientation != 1 or img.mode not in ("RGB", "L")
    try:
        # A JPEG kept as it is needs no full-size pixels: the reduced (draft)
        # decode that computes its pHash still reads the whole entropy-coded
        # stream, so it catches truncation as a full decode would, in a
        # quarter of the time. Everything else is decoded in full.
        if fmt == "jpg" and not needs_normalising and config.resize_mode == "no":
            phash = digest_image(data).phash
            return Decoded(data, fmt, width, height, width, height, phash)
        img.load()
        phash = compute_phash(data)
    except (OSError, SyntaxError, ValueError) as err:
        message = str(err)
        truncated = "truncat" in message.lower() or "broken" in message.lower()
        return Drop(RejectReason.TRUNCATED_IMAGE if truncated else RejectReason.NOT_AN_IMAGE, message[:200])
    try:
        if needs_normalising:
            img = _to_rgb(ImageOps.exif_transpose(img))
    except Exception as err:
        return Drop(RejectReason.UNSUPPORTED_MODE, f"{img.mode}: {err}"[:200])

    if config.resize_mode == "no":
        if not needs_normalising:
            return Decoded(data, fmt, width, height, width, height, phash)
        encoded = _encode(img, config.encode_format, config.encode_quality)
        return Decoded(encoded, config.encode_format, img.width, img.height, width, height, phash)

    # img2dataset's Resizer decodes with OpenCV, which ignores EXIF and can't
    # encode 16-bit or CMYK: hand it a normalised lossless copy when needed.
    source = _encode(img, "png", 95) if needs_normalising else data
    with _RESIZER_LOCK:
        out, new_w, new_h, _, _, err = resizer(io.BytesIO(source))
    if err is not None or out is None:
        return Drop(RejectReason.RESIZE_FAILED, str(err)[:200])
    return Decoded(out, config.encode_format, new_w, new_h, width, height, phash)


def decode_rgb(data: bytes):
    """Bytes -> EXIF-transposed RGB PIL image, fully loaded: how every model
    input (scoring, recaptioning, the LoRA pre-flight) reads an image that
    has already passed `decode_image`."""
    with Image.open(io.BytesIO(data)) as image:
        image = ImageOps.exif_transpose(image)
        return image.convert("RGB")  # convert() loads the pixels and returns a new image

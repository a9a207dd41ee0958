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

Resizing follows img2dataset's `Resizer` and its modes (`keep_ratio`,
`keep_ratio_largest`, `center_crop`, `border`) with the same albumentations
transforms, interpolation (OpenCV area down, Lanczos-4 up) and OpenCV encoder,
so the stored pixels and bytes are the ones img2dataset writes (see `Resizer`).
It works on pixels already decoded here instead of calling img2dataset's class,
which decodes the bytes a second time and redirects the process's stdout/stderr
around each image (not safe from several threads, so it had to run under one
lock per process).

Each image is decoded as few times as the checks allow: a JPEG kept as it is
needs only the reduced (draft) decode that computes its pHash; a JPEG that is
resized adds one full decode (OpenCV, as img2dataset); every other image is
decoded once in full and hashed from those pixels.

The same step hashes the downloaded bytes (SHA-256, for exact dedup) and the
picture (64-bit pHash, for near dedup) while they are in memory.
"""

from __future__ import annotations

import dataclasses
import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from schemas import DecodeConfig, RejectReason
from stages.core.verdict import Drop
from stages.core.phash import DRAFT_FORMATS, digest_image, phash_of_image

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

_KEEP_AS_IS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_EXIF_ORIENTATION = 0x0112


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


class Resizer:
    """img2dataset's resize modes on decoded pixels (OpenCV's HxW or HxWxC
    uint8 array, BGR) -> (encoded bytes, width, height).

    The same steps as `img2dataset.resizer.Resizer.__call__` with
    `resize_only_if_bigger`, `skip_reencode=False` and no blurring: keep_ratio
    and center_crop scale the shorter side to `image_size` (albumentations'
    `SmallestMaxSize`; center_crop then `CenterCrop`s a square), border and
    keep_ratio_largest scale the longer side (`LongestMaxSize`; border then pads
    with white to a square), OpenCV's area interpolation when shrinking and
    Lanczos-4 when enlarging (only with `resize_only_if_bigger=False`); the
    result is always re-encoded with `cv2.imencode` (JPEG/WebP at
    `encode_quality`, PNG at compression 9). Thread-safe: holds no state
    but the transforms, and OpenCV runs each call on the calling thread.
    """

    def __init__(self, config: DecodeConfig):
        import albumentations as A  # noqa: N812 - the library's own alias
        import cv2

        self.config = config
        size = config.image_size
        shorter = config.resize_mode in ("keep_ratio", "center_crop")
        scale = A.SmallestMaxSize if shorter else A.LongestMaxSize
        self._shrink = scale(max_size=size, interpolation=cv2.INTER_AREA, p=1.0)
        self._enlarge = scale(max_size=size, interpolation=cv2.INTER_LANCZOS4, p=1.0)
        self._shorter = shorter
        self._then = None
        if config.resize_mode == "center_crop":
            self._then = A.CenterCrop(height=size, width=size)
        elif config.resize_mode == "border":
            self._then = A.PadIfNeeded(
                min_height=size, min_width=size, border_mode=cv2.BORDER_CONSTANT, value=[255, 255, 255], p=1.0
            )
        quality_flag = {"jpg": cv2.IMWRITE_JPEG_QUALITY, "png": cv2.IMWRITE_PNG_COMPRESSION, "webp": cv2.IMWRITE_WEBP_QUALITY}
        quality = config.encode_quality if config.encode_format != "png" else 9
        self._encode_params = [int(quality_flag[config.encode_format]), quality]
        self._extension = f".{config.encode_format}"

    def __call__(self, pixels: np.ndarray) -> tuple[bytes, int, int]:
        import cv2

        cv2.setNumThreads(1)  # as img2dataset: one image per thread, no OpenCV pool
        height, width = pixels.shape[:2]
        side = min(width, height) if self._shorter else max(width, height)
        shrink = side > self.config.image_size
        if shrink or not self.config.resize_only_if_bigger:
            pixels = (self._shrink if shrink else self._enlarge)(image=pixels)["image"]
            if self._then is not None:
                pixels = self._then(image=pixels)["image"]
        ok, encoded = cv2.imencode(self._extension, pixels, params=self._encode_params)
        if not ok:
            raise ValueError(f"OpenCV could not encode a {pixels.shape} image as {self._extension}")
        height, width = pixels.shape[:2]
        return encoded.tobytes(), width, height


def _resizer(config: DecodeConfig) -> Resizer:
    return Resizer(config)


def _bgr_pixels(img: Image.Image) -> np.ndarray:
    """A normalised (RGB or L) PIL image as OpenCV pixels (BGR or grey)."""
    import cv2

    pixels = np.asarray(img)
    return cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR) if pixels.ndim == 3 else pixels


def decode_image(data: bytes, config: DecodeConfig, resizer=None) -> Decoded | Drop:
    """Check and normalise one downloaded image. Pure function; `resizer` is a
    `Resizer(config)` built once by the caller when `config.resize_mode !=
    "no"` (one is built per call otherwise)."""
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
    resizing = config.resize_mode != "no"
    pixels = None
    try:
        if fmt == "jpg" and not needs_normalising:
            # A plain JPEG needs no full-size PIL pixels: the reduced (draft)
            # decode that computes its pHash still reads the whole entropy-coded
            # stream, so it catches truncation as a full decode would, in a
            # quarter of the time. Resizing adds one full decode, by OpenCV as
            # img2dataset does (the same libjpeg-turbo pixels as PIL's).
            phash = digest_image(data).phash
            if not resizing:
                return Decoded(data, fmt, width, height, width, height, phash)
            pixels = _decode_cv2(data)
            if pixels is None:
                return Drop(RejectReason.NOT_AN_IMAGE, "OpenCV could not decode the JPEG")
        else:
            img.load()
            # JPEGs hash from their draft decode, as compute_phash does everywhere
            # (the dedup and decontamination hashes must be the same function).
            phash = digest_image(data).phash if img.format in DRAFT_FORMATS else phash_of_image(img, orientation)
    except (OSError, SyntaxError, ValueError) as err:
        message = str(err)
        truncated = "truncat" in message.lower() or "broken" in message.lower()
        return Drop(RejectReason.TRUNCATED_IMAGE if truncated else RejectReason.NOT_AN_IMAGE, message[:200])
    if pixels is None:
        try:
            if needs_normalising:
                img = _to_rgb(ImageOps.exif_transpose(img))
        except Exception as err:
            return Drop(RejectReason.UNSUPPORTED_MODE, f"{img.mode}: {err}"[:200])
        if not resizing:
            if not needs_normalising:
                return Decoded(data, fmt, width, height, width, height, phash)
            encoded = _encode(img, config.encode_format, config.encode_quality)
            return Decoded(encoded, config.encode_format, img.width, img.height, width, height, phash)
        pixels = _bgr_pixels(img)

    if resizer is None:
        resizer = Resizer(config)
    try:
        out, new_w, new_h = resizer(pixels)
    except Exception as err:  # OpenCV and albumentations raise their own types
        return Drop(RejectReason.RESIZE_FAILED, f"{type(err).__name__}: {err}"[:200])
    return Decoded(out, config.encode_format, new_w, new_h, width, height, phash)


def _decode_cv2(data: bytes) -> np.ndarray | None:
    """Full decode as img2dataset's Resizer does it (pixels as stored, EXIF ignored)."""
    import cv2

    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


def decode_rgb(data: bytes):
    """Bytes -> EXIF-transposed RGB PIL image, fully loaded: how every model
    input (scoring, recaptioning, the LoRA pre-flight) reads an image that
    has already passed `decode_image`."""
    with Image.open(io.BytesIO(data)) as image:
        image = ImageOps.exif_transpose(image)
        return image.convert("RGB")  # convert() loads the pixels and returns a new image

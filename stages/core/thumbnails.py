"""Small JPEG thumbnails for the HTML report (`pipelines/report.py`).

Plain Python over Pillow: no Beam. A thumbnail fits in `max_side` x `max_side`
pixels (aspect ratio kept, EXIF rotation applied) and in `max_bytes` bytes:
the JPEG quality steps down from `quality` until it fits, so every thumbnail
has a hard size cap and the report's size bound holds whatever the images are.
"""

from __future__ import annotations

import base64
import io

from PIL import Image, ImageOps

MAX_SIDE = 112
MAX_BYTES = 6 * 1024
QUALITY = 75
_MIN_QUALITY = 20


class ThumbnailError(ValueError):
    """The bytes are not an image Pillow can decode, or no quality fits the cap."""


def thumbnail(data: bytes, max_side: int = MAX_SIDE, max_bytes: int = MAX_BYTES, quality: int = QUALITY) -> bytes:
    """JPEG bytes of `data` scaled to fit `max_side`, at most `max_bytes` long.

    Raises ThumbnailError when the image cannot be decoded or still exceeds
    `max_bytes` at the lowest quality (only possible with a tiny cap)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.seek(0)
            img = ImageOps.exif_transpose(img)
            img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
            if img.mode != "RGB":
                rgba = img.convert("RGBA")
                img = Image.new("RGB", rgba.size, (255, 255, 255))
                img.paste(rgba, mask=rgba.getchannel("A"))
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ThumbnailError(f"cannot decode image ({len(data)} bytes): {err}") from err
    for q in range(quality, _MIN_QUALITY - 1, -10):
        out = io.BytesIO()
        img.save(out, "JPEG", quality=q, optimize=True)
        if out.tell() <= max_bytes:
            return out.getvalue()
    raise ThumbnailError(f"thumbnail exceeds {max_bytes} bytes even at JPEG quality {_MIN_QUALITY}")


def data_uri(jpeg: bytes) -> str:
    """An inline `data:` URI for an <img src>."""
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")

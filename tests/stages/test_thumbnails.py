"""stages/core/thumbnails.py: size and byte caps hold for any image; bad bytes are a clear error."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from stages.core import thumbnails


def _encode(img: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt)
    return out.getvalue()


@pytest.mark.parametrize("size,mode,fmt", [((640, 320), "RGB", "JPEG"), ((90, 400), "RGBA", "PNG"), ((50, 40), "L", "PNG")])
def test_thumbnail_fits_the_box_and_the_byte_cap(size, mode, fmt):
    rng = np.random.default_rng(0)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8).squeeze()
    data = thumbnails.thumbnail(_encode(Image.fromarray(pixels, mode), fmt), max_side=64, max_bytes=4096)
    assert len(data) <= 4096
    with Image.open(io.BytesIO(data)) as thumb:
        assert thumb.format == "JPEG" and thumb.mode == "RGB"
        assert max(thumb.size) == min(64, max(size))
        # Aspect ratio kept (to a pixel of rounding).
        assert abs(thumb.size[0] / thumb.size[1] - size[0] / size[1]) < 0.05 * size[0] / size[1] + 0.05


def test_cap_too_small_and_bad_bytes_are_clear_errors():
    noise = np.random.default_rng(1).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    with pytest.raises(thumbnails.ThumbnailError, match="exceeds 100 bytes"):
        thumbnails.thumbnail(_encode(Image.fromarray(noise), "PNG"), max_bytes=100)
    with pytest.raises(thumbnails.ThumbnailError, match="cannot decode"):
        thumbnails.thumbnail(b"not an image")
    assert thumbnails.data_uri(b"\xff\xd8").startswith("data:image/jpeg;base64,")

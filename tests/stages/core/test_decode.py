import io

import numpy as np
import pytest
from PIL import Image

from pipelines.testing import webcorpus
from schemas import DecodeConfig, RejectReason
from stages.core.decode import _resizer, decode_image, decode_rgb
from stages.core.verdict import Drop

CONFIG = DecodeConfig()


def decode(data, config=CONFIG):
    return decode_image(data, config, _resizer(config) if config.resize_mode != "no" else None)


def test_plain_jpeg_is_stored_byte_for_byte():
    data = webcorpus.jpeg(webcorpus.render(1, (640, 520)))
    result = decode(data)
    assert not isinstance(result, Drop)
    assert result.data is data and result.fmt == "jpg" and (result.width, result.height) == (640, 520)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", RejectReason.EMPTY_BODY),
        (b"<!DOCTYPE html><html></html>", RejectReason.NOT_AN_IMAGE),
        (webcorpus.jpeg(webcorpus.render(2, (400, 600))), RejectReason.TOO_SMALL),
        (webcorpus.jpeg(webcorpus.render(3, (1800, 520))), RejectReason.ASPECT_RATIO),
        (webcorpus._bomb_png(), RejectReason.DECOMPRESSION_BOMB),
        (webcorpus._animated_gif(4), RejectReason.ANIMATED_IMAGE),
    ],
)
def test_rejections(data, reason):
    result = decode(data)
    assert isinstance(result, Drop) and result.reason == reason, result


@pytest.mark.parametrize("encode", [webcorpus.jpeg, webcorpus.png], ids=["jpeg-draft-path", "png-full-decode"])
def test_truncated_images(encode):
    data = encode(webcorpus.render(5, (700, 700)))
    result = decode(data[: len(data) * 2 // 3])
    assert isinstance(result, Drop) and result.reason == RejectReason.TRUNCATED_IMAGE


def test_phash_is_the_dedup_stages_phash():
    from stages.core.phash import compute_phash

    for data in (webcorpus.jpeg(webcorpus.render(11, (700, 600))), webcorpus._rgba_png(12), webcorpus._exif_rotated(13)):
        assert decode(data).phash == compute_phash(data)


def test_exif_rotation_is_applied_before_the_size_checks():
    result = decode(webcorpus._exif_rotated(6))  # stored 800x600, orientation 6
    assert (result.original_width, result.original_height) == (600, 800)
    stored = Image.open(io.BytesIO(result.data))
    assert stored.size == (600, 800) and stored.getexif().get(0x0112, 1) == 1
    # The same pixels stored 600 wide would fail a 700px floor only once rotated.
    assert decode(webcorpus._exif_rotated(6), DecodeConfig(min_side=700)).reason == RejectReason.TOO_SMALL


def test_cmyk_16bit_and_alpha_become_rgb():
    cmyk = webcorpus.jpeg(webcorpus.render(7, (600, 600)).convert("CMYK"))
    for data in (cmyk, webcorpus._sixteen_bit_png(8), webcorpus._rgba_png(9)):
        result = decode(data)
        assert not isinstance(result, Drop), result
        img = Image.open(io.BytesIO(result.data))
        assert img.mode == "RGB" and result.fmt == "jpg"
    # 16-bit values are scaled, not clipped to white.
    grey = np.asarray(Image.open(io.BytesIO(decode(webcorpus._sixteen_bit_png(8)).data)).convert("L"))
    assert 30 < grey.mean() < 225
    # Transparent pixels are composited on white.
    alpha = np.asarray(Image.open(io.BytesIO(decode(webcorpus._rgba_png(9)).data)))
    assert alpha[100, 100].min() > 240 and alpha[400, 400].min() < 240


@pytest.mark.parametrize("mode, expected", [("keep_ratio", (512, 640)), ("center_crop", (512, 512)), ("border", (512, 512))])
def test_img2dataset_resize_modes(mode, expected):
    config = DecodeConfig(resize_mode=mode, image_size=512)
    result = decode(webcorpus.jpeg(webcorpus.render(10, (800, 1000))), config)
    assert (result.width, result.height) == expected
    assert (result.original_width, result.original_height) == (800, 1000)
    assert Image.open(io.BytesIO(result.data)).size == expected


def _jpeg(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **kwargs)
    return buffer.getvalue()


def test_decode_rgb_applies_exif_rotation_and_converts_to_rgb():
    wide = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = wide.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    decoded = decode_rgb(_jpeg(wide, exif=exif))
    assert decoded.size == (20, 40) and decoded.mode == "RGB"

    rgba = Image.new("RGBA", (8, 8), (0, 255, 0, 128))
    buffer = io.BytesIO()
    rgba.save(buffer, format="PNG")
    assert decode_rgb(buffer.getvalue()).mode == "RGB"
    palette = Image.new("P", (8, 8))
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG")
    assert decode_rgb(buffer.getvalue()).mode == "RGB"


@pytest.mark.parametrize("mode", ["keep_ratio", "keep_ratio_largest", "center_crop", "border"])
@pytest.mark.parametrize("size", [(800, 1000), (300, 200)], ids=["shrunk", "kept-small"])
@pytest.mark.parametrize("kind", ["jpeg", "grey-jpeg", "png"])
def test_resize_writes_the_bytes_img2dataset_writes(mode, size, kind):
    """The decode stage's Resizer works on pixels it already decoded, but stores
    exactly what img2dataset's own Resizer stores for the same settings."""
    from img2dataset.resizer import Resizer as Img2datasetResizer

    picture = webcorpus.render(21, size)
    data = {"jpeg": webcorpus.jpeg(picture), "grey-jpeg": webcorpus.jpeg(picture.convert("L")), "png": webcorpus.png(picture)}[kind]
    config = DecodeConfig(resize_mode=mode, image_size=512, min_side=0)
    theirs, width, height, *_, err = Img2datasetResizer(
        image_size=512, resize_mode=mode, resize_only_if_bigger=True, encode_format="jpg", encode_quality=95
    )(io.BytesIO(data))
    assert err is None
    ours = decode(data, config)
    assert not isinstance(ours, Drop), ours
    assert (ours.width, ours.height) == (width, height)
    assert ours.data == theirs


def test_resize_of_a_truncated_jpeg_is_rejected_as_truncated():
    data = webcorpus.jpeg(webcorpus.render(22, (900, 700)))
    result = decode(data[: len(data) // 2], DecodeConfig(resize_mode="keep_ratio"))
    assert isinstance(result, Drop) and result.reason == RejectReason.TRUNCATED_IMAGE

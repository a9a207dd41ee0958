"""stages.core.phash: fast pHash against imagehash on a full decode; SHA-256."""

from __future__ import annotations

import io

import imagehash
import numpy as np
import pytest
from PIL import Image, ImageOps

from pipelines.testing.images import crop_fraction, jpeg_bytes, resized, synthetic_photo
from schemas import DedupConfig
from stages.core.phash import _phash_of_pixels, compute_phash, digest_image, hamming, phash_to_int, sha256_hex


def full_decode_phash(data: bytes) -> imagehash.ImageHash:
    """The reference: imagehash.phash on a full decode, EXIF-oriented."""
    return imagehash.phash(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))


def bits_apart(fast: str, reference: imagehash.ImageHash) -> int:
    return imagehash.hex_to_hash(fast) - reference


@pytest.fixture(scope="module")
def photos():
    rng = np.random.default_rng(7)
    sizes = [(48, 40), (200, 150), (513, 700), (800, 600), (1280, 720), (1100, 1500), (2048, 1536)]
    return [(size, synthetic_photo(rng, *size)) for size in sizes]


def test_compute_phash_within_two_bits_of_full_decode(photos):
    apart = []
    for size, photo in photos:
        for quality in (70, 92):
            data = jpeg_bytes(photo, quality)
            distance = bits_apart(compute_phash(data), full_decode_phash(data))
            assert distance <= 2, (size, quality, distance)
            apart.append(distance)
    # Block-integrated LANCZOS weights make most hashes bit-identical (plain
    # resize of the draft image differs in about half of them).
    assert apart.count(0) >= len(apart) * 0.7, apart


def test_compute_phash_is_imagehash_exactly_without_draft(photos):
    photo = photos[3][1]
    png = io.BytesIO()
    photo.save(png, "PNG")
    assert compute_phash(png.getvalue()) == str(imagehash.phash(photo))
    tiny = jpeg_bytes(photos[0][1], 90)  # 48x40: too small to scale down
    assert compute_phash(tiny) == str(full_decode_phash(tiny))


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_compute_phash_applies_exif_orientation(photos, orientation):
    photo = photos[4][1]  # 1280x720
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    photo.save(buf, "JPEG", quality=90, exif=exif.tobytes())
    data = buf.getvalue()
    digest = digest_image(data)
    assert bits_apart(digest.phash, full_decode_phash(data)) <= 2
    assert bits_apart(digest.phash, imagehash.phash(photo)) > 10  # the unrotated image hashes differently
    assert (digest.width, digest.height) == ((720, 1280) if orientation in (6, 8) else (1280, 720))
    assert digest.format == "JPEG"


def test_same_duplicate_decisions_as_full_decode(photos):
    rng = np.random.default_rng(3)
    threshold = DedupConfig().hamming_threshold
    images = []
    for _, photo in photos[2:]:
        images += [
            jpeg_bytes(photo, 90),
            jpeg_bytes(photo, 40),
            jpeg_bytes(resized(photo, 0.5), 85),
            jpeg_bytes(crop_fraction(rng, photo), 85),
        ]
    fast = [compute_phash(d) for d in images]
    full = [str(full_decode_phash(d)) for d in images]
    groups = [i // 4 for i in range(len(images))]
    for a in range(len(images)):
        for b in range(a + 1, len(images)):
            same_fast = hamming(fast[a], fast[b]) <= threshold
            assert same_fast == (hamming(full[a], full[b]) <= threshold), (a, b)
            if groups[a] != groups[b]:
                assert not same_fast, (a, b)  # unrelated photos are far apart
            elif b % 4 in (1, 2):
                assert same_fast, (a, b)  # re-encoded and resized copies are found


def test_hash_of_pixels_is_imagehash_phash():
    rng = np.random.default_rng(2)
    arrays = [rng.integers(0, 256, (32, 32)) for _ in range(20)]
    arrays += [rng.integers(0, 2, (32, 32)) * 255 for _ in range(5)]
    # Degenerate images, where many DCT coefficients tie with the median.
    arrays += [np.full((32, 32), 128), np.tile(np.arange(32) * 8, (32, 1)), np.eye(32) * 255]
    arrays += [np.indices((32, 32)).sum(axis=0) % 2 * 255, np.pad(np.full((16, 16), 200), 8)]
    for pixels in arrays:
        expected = str(imagehash.phash(Image.fromarray(pixels.astype(np.uint8), "L")))
        assert _phash_of_pixels(pixels.astype(np.float64)) == expected


def test_compute_phash_raises_on_undecodable_bytes(photos):
    with pytest.raises(Exception):
        compute_phash(b"not an image at all")
    data = jpeg_bytes(photos[3][1], 90)
    with pytest.raises(OSError):
        compute_phash(data[: len(data) // 2])


def test_sha256_and_hex_parsing():
    assert sha256_hex(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert phash_to_int("ffffffffffffffff") == 2**64 - 1
    assert hamming("0000000000000000", "000000000000000f") == 4
    for bad in ("abc", "0x12345678901234", "zzzzzzzzzzzzzzzz", "00 11 22 33 4455"):
        with pytest.raises(ValueError):
            phash_to_int(bad)


def test_opencv_reduced_decode_gives_pil_draft_pixels(photos, monkeypatch):
    """compute_phash decodes the reduced luma with OpenCV when it can; the hash
    must be the one PIL's draft decode gives, on every size and for grey and
    CMYK JPEGs (which fall back to PIL), and truncation still raises."""
    import stages.core.phash as phash

    used = []
    real = phash._reduced_luma
    monkeypatch.setattr(phash, "_reduced_luma", lambda *args: used.append(real(*args)) or used[-1])
    images = [jpeg_bytes(photo, q) for q in (60, 92) for _, photo in photos]
    images += [jpeg_bytes(photos[4][1].convert("L"), 85), jpeg_bytes(photos[4][1].convert("CMYK"), 85)]
    fast = [compute_phash(data) for data in images]
    assert any(luma is not None for luma in used) and used[-1] is None  # OpenCV used; CMYK fell back
    monkeypatch.setattr(phash, "_reduced_luma", lambda *args: None)
    assert fast == [compute_phash(data) for data in images]
    monkeypatch.setattr(phash, "_reduced_luma", real)
    for cut in (0.5, 0.9, 0.99):
        with pytest.raises(OSError):
            compute_phash(images[5][: int(len(images[5]) * cut)])

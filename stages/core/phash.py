"""Perceptual and exact image hashes: SHA-256 of the bytes and the 64-bit DCT
pHash (`imagehash.phash` semantics), computed fast. Plain Python, no Beam: the
decode stage, the dedup stage, the LoRA pre-flight and the benchmarks share it.

pHash computed fast
-------------------
`compute_phash` decodes JPEGs with PIL's draft mode (libjpeg's scaled IDCT: 1/2,
1/4 or 1/8 size, luma only), which gives the 8x8 (or 4x4, 2x2) block means of
the full image. Instead of resizing that small image with LANCZOS (which blurs
twice and flips ~1 bit in 2), it applies the *full-resolution* LANCZOS weights
that `imagehash.phash`'s `resize((32, 32), LANCZOS)` would use, summed over each
block, with the same horizontal-then-vertical 8-bit rounding; the 32x32 result
then goes through `imagehash.phash` itself (DCT, median). EXIF orientation is
applied as `ImageOps.exif_transpose` does, so the hash describes the image as
it will be stored. Other formats (and JPEGs too small to scale) are decoded in
full and hashed by `imagehash.phash` unchanged.

The reduced decode itself goes through OpenCV (`cv2.imdecode` with the same
libjpeg-turbo scale and greyscale output: identical pixels, one call instead of
PIL's chunked feeding) when it can, and falls back to PIL's draft decode for
CMYK JPEGs and for any stream OpenCV will not decode, so PIL still decides what
is truncated or corrupt. The decode is over 90 % of the hash's time: see
`benchmarks/dedup_bench.py` for the ratio against `imagehash.phash`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
from collections.abc import Iterable

import imagehash
import numpy as np
import scipy.fftpack
from PIL import Image

PHASH_BITS = 64
PHASH_HEX_DIGITS = PHASH_BITS // 4
_HASH_SIZE = 8  # imagehash.phash default hash_size
_HASH_SIDE = _HASH_SIZE * 4  # imagehash.phash resizes to 32x32 (highfreq_factor 4)

# EXIF Orientation -> transposition, the same table as PIL.ImageOps.exif_transpose.
_EXIF_ORIENTATION = 0x0112
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = {5, 6, 7, 8}
DRAFT_FORMATS = frozenset({"JPEG", "MPO"})  # MPO: multi-picture JPEG from cameras


# --------------------------------------------------------------------------- hashing


def sha256_hex(data: bytes) -> str:
    """SHA-256 of the bytes as 64 lowercase hex digits (the exact-dedup key)."""
    return hashlib.sha256(data).hexdigest()


@dataclasses.dataclass(frozen=True)
class ImageDigest:
    """What one draft decode tells about an image.

    `width`/`height` are the full decoded size after EXIF orientation (what
    `SampleRecord.original_width/height` hold), not the reduced draft size.
    """

    phash: str
    width: int
    height: int
    format: str | None


def digest_image(data: bytes) -> ImageDigest:
    """Decode `data` at reduced size and return its pHash and full size.

    The whole entropy-coded stream is still decoded, so truncated or corrupt
    images raise as a full decode would (PIL's `OSError`,
    `UnidentifiedImageError`, `DecompressionBombError`); callers that validate
    images can use this instead of a full decode when they do not resize.
    """
    with Image.open(io.BytesIO(data)) as img:
        image_format = img.format
        full_width, full_height = img.size
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
        transpose = _ORIENTATION_TRANSPOSE.get(orientation)
        scale = 1
        if image_format in DRAFT_FORMATS and min(full_width, full_height) >= 2 * _HASH_SIDE:
            # Ask for >= 32 px per side: libjpeg picks the largest of 1/2, 1/4, 1/8.
            drafted = img.draft("L", (_HASH_SIDE, _HASH_SIDE))
            if drafted is not None:
                scale = round(full_width / drafted[1][2])
        if scale == 1:
            img.load()
            phash = phash_of_image(img, orientation)
        else:
            luma = _reduced_luma(data, img, scale)
            if luma is None:
                luma = img if img.mode == "L" else img.convert("L")  # CMYK JPEGs keep their mode
                luma = np.asarray(luma, dtype=np.float64)  # (h/scale, w/scale), block means
            phash = _phash_from_block_means(luma, full_width, full_height, scale, transpose, orientation)
    if orientation in _SWAPS_AXES:
        full_width, full_height = full_height, full_width
    return ImageDigest(phash=phash, width=full_width, height=full_height, format=image_format)


def _reduced_luma(data: bytes, drafted: Image.Image, scale: int) -> np.ndarray | None:
    """The same reduced luma PIL's draft decode gives, decoded by OpenCV.

    Both hand the stream to libjpeg-turbo with the same scale (1/2, 1/4, 1/8)
    and greyscale output, so the pixels are identical (tests check it), but
    OpenCV decodes from memory in one call where PIL feeds the decoder in
    Python-sized chunks: about a fifth less time per hash. OpenCV returns
    nothing for a truncated or corrupt stream; then (and for CMYK JPEGs, whose
    grey conversion differs, or an unexpected size) this returns None and the
    caller decodes with PIL, whose error or result decides as before.
    """
    if drafted.mode != "L":
        return None
    try:
        import cv2
    except ImportError:  # pragma: no cover - OpenCV comes with img2dataset
        return None
    flags = _CV2_REDUCED_GREY.get(scale)
    if flags is None:
        return None
    luma = cv2.imdecode(np.frombuffer(data, np.uint8), flags | cv2.IMREAD_IGNORE_ORIENTATION)
    if luma is None or luma.shape != (drafted.size[1], drafted.size[0]):
        return None
    return luma.astype(np.float64)


def _cv2_reduced_grey() -> dict[int, int]:
    try:
        import cv2
    except ImportError:  # pragma: no cover
        return {}
    return {2: cv2.IMREAD_REDUCED_GRAYSCALE_2, 4: cv2.IMREAD_REDUCED_GRAYSCALE_4, 8: cv2.IMREAD_REDUCED_GRAYSCALE_8}


_CV2_REDUCED_GREY = _cv2_reduced_grey()


def phash_of_image(img: Image.Image, orientation: int = 1) -> str:
    """`imagehash.phash` of a decoded PIL image after EXIF `orientation` (what
    `compute_phash` returns for every image it does not draft-decode: non-JPEG
    formats and JPEGs under 64 px a side), for callers that hold the pixels."""
    transpose = _ORIENTATION_TRANSPOSE.get(orientation)
    oriented = img.transpose(transpose) if transpose is not None else img
    return str(imagehash.phash(oriented, hash_size=_HASH_SIZE))


def compute_phash(data: bytes) -> str:
    """64-bit DCT pHash of encoded image bytes, 16 hex digits (`imagehash.phash`,
    hash_size 8, of the EXIF-oriented image), computed from a reduced decode.

    Matches `imagehash.phash(ImageOps.exif_transpose(Image.open(...)))` bit for
    bit on most JPEGs and within 2 bits on the rest (see the module docstring
    and `benchmarks/dedup_bench.py`). Pure function; raises on undecodable
    bytes like `digest_image`.
    """
    return digest_image(data).phash


def _lanczos(x: np.ndarray) -> np.ndarray:
    """PIL's LANCZOS kernel sinc(x) * sinc(x / 3) on |x| < 3, in float32 (one
    SIMD sine: sin(pi x) = s (3 - 4 s^2) with s = sin(pi x / 3)); float32 is
    finer than the 22-bit fixed point PIL applies the weights in."""
    x = np.asarray(x, dtype=np.float32)
    s2 = np.sin(np.float32(np.pi / 3.0) * x)
    s2 *= s2
    px2 = np.float32(np.pi * np.pi) * x * x
    with np.errstate(divide="ignore", invalid="ignore"):
        value = np.float32(3.0) * s2 * (np.float32(3.0) - np.float32(4.0) * s2) / px2
    value[px2 == 0] = 1.0
    value[px2 >= np.float32(9.0 * np.pi * np.pi)] = 0.0  # |x| >= 3
    return value


@functools.lru_cache(maxsize=1024)
def _resize_weights(in_size: int, block: int) -> np.ndarray:
    """Weights of PIL's LANCZOS resize from `in_size` to 32 pixels (one axis),
    summed over runs of `block` input pixels: shape (32, ceil(in_size / block)).

    Follows PIL's `precompute_coeffs` for a downscale: support 3 * scale, centre
    (j + 0.5) * scale, window [int(centre - support + 0.5), int(centre + support
    + 0.5)), weights normalised per output pixel.
    """
    scale = in_size / _HASH_SIDE
    filter_scale = max(scale, 1.0)
    support = 3.0 * filter_scale
    centers = (np.arange(_HASH_SIDE) + 0.5) * scale
    lo = np.maximum((centers - support + 0.5).astype(np.int64), 0)  # int() truncates toward 0, as in C
    hi = np.minimum((centers + support + 0.5).astype(np.int64), in_size)
    x = lo[:, None] + np.arange(int((hi - lo).max()))[None, :]  # (32, window) input pixels
    weights = _lanczos((x - centers[:, None] + 0.5) / filter_scale)  # float32 (32, window)
    weights *= x < hi[:, None]
    blocks = -(-in_size // block)
    cells = np.arange(_HASH_SIDE)[:, None] * blocks + np.minimum(x // block, blocks - 1)  # zero weight past the edge
    summed = np.bincount(cells.ravel(), weights=weights.ravel(), minlength=_HASH_SIDE * blocks)
    summed = summed.reshape(_HASH_SIDE, blocks)
    summed /= summed.sum(axis=1, keepdims=True)  # normalised per output pixel, in float64
    summed.setflags(write=False)
    return summed


# OpenBLAS runs a GEMM of up to 65536 * 4 multiply-adds on one thread; a larger
# one starts its thread pool, which on a busy worker costs more than the product.
_SINGLE_THREAD_GEMM = 65536 * 4


def _gemm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b, split into products small enough to stay single-threaded."""
    m, k = a.shape
    n = b.shape[1]
    if m * n * k <= _SINGLE_THREAD_GEMM:
        return a @ b
    if m >= n:
        step = max(1, _SINGLE_THREAD_GEMM // (k * n))
        return np.concatenate([a[i : i + step] @ b for i in range(0, m, step)], axis=0)
    step = max(1, _SINGLE_THREAD_GEMM // (m * k))
    return np.concatenate([a @ b[:, j : j + step] for j in range(0, n, step)], axis=1)


def _phash_of_pixels(pixels: np.ndarray) -> str:
    """The end of `imagehash.phash` on a 32x32 8-bit image (given as its pixel
    values): the same scipy DCT, low 8x8 frequencies, median, hex string."""
    dct = scipy.fftpack.dct(scipy.fftpack.dct(pixels, axis=0), axis=1)
    low = dct[:_HASH_SIZE, :_HASH_SIZE]
    middle = _HASH_SIZE * _HASH_SIZE // 2
    ordered = np.sort(low, axis=None)
    median = (ordered[middle - 1] + ordered[middle]) / 2  # np.median's arithmetic, without its overhead
    # str(imagehash.ImageHash(bits)): the row-major bits as big-endian hex.
    return np.packbits(low > median).tobytes().hex()


def _phash_from_block_means(
    luma: np.ndarray,
    full_width: int,
    full_height: int,
    block: int,
    transpose: Image.Transpose | None,
    orientation: int,
) -> str:
    rows, cols = luma.shape
    wx_t = _resize_weights(full_width, block)[:, :cols].T  # (w/block, 32)
    wy = _resize_weights(full_height, block)[:, :rows]  # (32, h/block)
    # PIL resizes horizontally first, rounding to 8 bits in between; after a
    # 90-degree EXIF rotation the stored image's vertical axis is the horizontal one.
    if orientation in _SWAPS_AXES:
        tmp = np.clip(np.rint(_gemm(wy, luma)), 0, 255)  # (32, w/block)
        small = np.clip(np.rint(_gemm(tmp, wx_t)), 0, 255)  # (32, 32)
    else:
        tmp = np.clip(np.rint(_gemm(luma, wx_t)), 0, 255)  # (h/block, 32)
        small = np.clip(np.rint(_gemm(wy, tmp)), 0, 255)  # (32, 32)
    if transpose is not None:
        small = np.asarray(Image.fromarray(small.astype(np.uint8), "L").transpose(transpose), dtype=np.float64)
    return _phash_of_pixels(small)


def phash_to_int(phash: str) -> int:
    """Parse a 16-hex-digit pHash (as `str(imagehash.ImageHash)` writes it)."""
    try:
        raw = bytes.fromhex(phash) if len(phash) == PHASH_HEX_DIGITS else b""
    except ValueError:
        raw = b""
    if len(raw) != PHASH_BITS // 8:
        raise ValueError(f"pHash {phash!r} is not {PHASH_HEX_DIGITS} hex digits")
    return int.from_bytes(raw, "big")


def phashes_to_array(phashes: Iterable[str]) -> np.ndarray:
    """Hex pHashes -> uint64 array (vectorised: one bytes.fromhex per hash)."""
    raw = b"".join(bytes.fromhex(p) for p in phashes)
    if len(raw) % 8:
        raise ValueError("a pHash is not 16 hex digits")
    return np.frombuffer(raw, dtype=">u8").astype(np.uint64)


def hamming(a: str, b: str) -> int:
    """Hamming distance between two hex pHashes."""
    return (phash_to_int(a) ^ phash_to_int(b)).bit_count()

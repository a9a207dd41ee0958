"""A generated little web: images, captions and every way a row can go wrong.

Used by `make demo`, the end-to-end tests and the benchmarks. `build_corpus`
registers the images on a `LocalWeb` and returns the URL-list rows together
with what the curate pipeline must do with each one (kept, or rejected at
which stage for which reason, naming which survivor), so tests can check the
outputs exactly.
"""

from __future__ import annotations

import dataclasses
import io
import random

import numpy as np
from PIL import Image, ImageDraw

from pipelines.testing.images import COLOURS, SHAPES, jpeg, png, render
from pipelines.testing.localweb import LocalWeb



@dataclasses.dataclass
class Expected:
    """What the pipeline must do with one row."""

    status: str  # "kept" or "rejected"
    stage: str | None = None
    reason: str | None = None
    duplicate_of: str | None = None


@dataclasses.dataclass
class Corpus:
    rows: list[dict]
    expected: dict[str, Expected]  # by row position as a key string: see key_of
    slow_paths: list[str]

    def key_of(self, row_index: int) -> str:
        return f"{0:05d}{row_index:09d}"


def _animated_gif(seed: int) -> bytes:
    frames = [render(seed + i, (600, 600)).convert("P") for i in range(3)]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return out.getvalue()


def _bomb_png() -> bytes:
    out = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(out, "PNG")
    return out.getvalue()


def _exif_rotated(seed: int) -> bytes:
    img = render(seed, (800, 600))  # stored landscape, shown portrait (orientation 6)
    exif = Image.Exif()
    exif[0x0112] = 6
    return jpeg(img, exif=exif.tobytes())


def _sixteen_bit_png(seed: int) -> bytes:
    grey = np.asarray(render(seed, (640, 640)).convert("L"), dtype=np.uint16) * 257
    out = io.BytesIO()
    Image.fromarray(grey, "I;16").save(out, "PNG")
    return out.getvalue()


def _rgba_png(seed: int) -> bytes:
    img = render(seed, (640, 560)).convert("RGBA")
    alpha = Image.new("L", img.size, 255)
    ImageDraw.Draw(alpha).ellipse([0, 0, 200, 200], fill=0)
    img.putalpha(alpha)
    return png(img)


def build_corpus(web: LocalWeb, n_plain: int = 40, seed: int = 0, timeout_delay_s: float = 3.0) -> Corpus:
    """Register a corpus on `web` and return its rows (url, caption, width,
    height) and the expected outcome of each. `n_plain` ordinary good images
    come first, then one of every special case."""
    rows: list[dict] = []
    expected: dict[str, Expected] = {}
    slow: list[str] = []
    rng = random.Random(seed)

    def key(i: int) -> str:
        return f"{0:05d}{i:09d}"

    def add(path: str | None, caption: str, outcome: Expected, *, url: str | None = None, width=None, height=None):
        rows.append({"url": url if url is not None else f"{web.base_url}{path}", "caption": caption, "width": width, "height": height})
        expected[key(len(rows) - 1)] = outcome
        return key(len(rows) - 1)

    kept = Expected("kept")

    def rejected(stage, reason, dup=None):
        return Expected("rejected", stage, reason, dup)

    # Ordinary images, captions naming what is drawn (the trainer learns from them).
    plain_keys = []
    for i in range(n_plain):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        size = (rng.randrange(512, 900), rng.randrange(512, 900))
        path = f"/img/plain{i}.jpg"
        web.add(path, jpeg(render(seed * 100_003 + i, size, colour, shape)))
        plain_keys.append(add(path, f"a {colour} {shape} on a patterned background", kept))

    base = seed * 100_003 + 50_000
    # Duplicates of three originals, each original registered first so it has the smaller key.
    orig = render(base + 1, (800, 640), "red", "circle")
    orig_bytes = jpeg(orig)
    web.add("/dup/original.jpg", orig_bytes)
    orig_key = add("/dup/original.jpg", "a red circle, the original photo", kept)
    web.add("/dup/exact-copy.jpg", orig_bytes)
    add("/dup/exact-copy.jpg", "the same red circle photo hosted elsewhere", rejected("dedup", "exact_duplicate", orig_key))
    web.add("/dup/reencoded.jpg", jpeg(orig, quality=55))
    add("/dup/reencoded.jpg", "a red circle, re-encoded at low quality", rejected("dedup", "near_duplicate", orig_key))
    web.add("/dup/resized.jpg", jpeg(orig.resize((640, 512), Image.LANCZOS)))
    add("/dup/resized.jpg", "a red circle, a smaller copy", rejected("dedup", "near_duplicate", orig_key))
    web.add("/dup/cropped.jpg", jpeg(orig.crop((12, 10, 788, 630))))
    add("/dup/cropped.jpg", "a red circle, slightly cropped", rejected("dedup", "near_duplicate", orig_key))
    # A smaller original whose near duplicate is larger: the larger one survives.
    small = render(base + 2, (640, 600), "blue", "square")
    web.add("/dup/small-original.jpg", jpeg(small))
    small_key = len(rows)
    web.add("/dup/upscaled.jpg", jpeg(small.resize((800, 750), Image.LANCZOS)))
    add("/dup/small-original.jpg", "a blue square, first posted small", rejected("dedup", "near_duplicate", key(small_key + 1)))
    add("/dup/upscaled.jpg", "a blue square, a bigger copy", kept)

    # Resolution and aspect.
    web.add("/small.jpg", jpeg(render(base + 3, (400, 300))))
    add("/small.jpg", "a tiny thumbnail of a green ring", rejected("decode", "too_small"))
    web.add("/wide.jpg", jpeg(render(base + 4, (2000, 520))))
    add("/wide.jpg", "a very wide panorama banner", rejected("decode", "aspect_ratio"))
    add("/declared-small.jpg", "declared too small to be worth a fetch", rejected("url", "declared_too_small"), width=200, height=150)

    # Broken or refused responses.
    add("/missing.jpg", "a photo that is no longer there", rejected("crawl", "http_error"))
    web.add("/slow.jpg", jpeg(render(base + 5, (600, 600))), delay_s=timeout_delay_s)
    slow.append("/slow.jpg")
    add("/slow.jpg", "a photo on a very slow server", rejected("crawl", "timeout"))
    web.add("/page.jpg", b"<!DOCTYPE html><html><body>Not found</body></html>", content_type="image/jpeg")
    add("/page.jpg", "an html page served as a jpeg", rejected("decode", "not_an_image"))
    web.add("/empty.jpg", b"")
    add("/empty.jpg", "an empty response body", rejected("decode", "empty_body"))
    truncated = jpeg(render(base + 6, (700, 700)))
    web.add("/truncated.jpg", truncated[: len(truncated) // 2])
    add("/truncated.jpg", "a download cut off half way", rejected("decode", "truncated_image"))
    web.add("/animated.gif", _animated_gif(base + 7), content_type="image/gif")
    add("/animated.gif", "an animated gif of moving shapes", rejected("decode", "animated_image"))
    web.add("/bomb.png", _bomb_png(), content_type="image/png")
    add("/bomb.png", "a decompression bomb png file", rejected("decode", "decompression_bomb"))
    for directive in ("noai", "noimageai", "img2dataset: noindex"):
        path = f"/optout-{directive.split()[-1]}.jpg"
        web.add(path, jpeg(render(base + 8 + len(path), (600, 600))), headers={"X-Robots-Tag": directive})
        add(path, f"an artist's work marked {directive}", rejected("crawl", "opt_out"))
    web.add("/other-bot.jpg", jpeg(render(base + 20, (620, 600))), headers={"X-Robots-Tag": "otherbot: noai"})
    add("/other-bot.jpg", "an opt-out aimed at another crawler", kept)

    # Formats that need care and are kept.
    cmyk = render(base + 21, (600, 640)).convert("CMYK")
    web.add("/cmyk.jpg", jpeg(cmyk))
    add("/cmyk.jpg", "a print-ready cmyk photograph", kept)
    web.add("/sixteen.png", _sixteen_bit_png(base + 22), content_type="image/png")
    add("/sixteen.png", "a sixteen bit greyscale scan", kept)
    web.add("/alpha.png", _rgba_png(base + 23), content_type="image/png")
    add("/alpha.png", "a cut-out logo with transparency", kept)
    web.add("/rotated.jpg", _exif_rotated(base + 24))
    add("/rotated.jpg", "a phone photo taken upright", kept)
    web.add("/real.jpg", jpeg(render(base + 25, (700, 600), "orange", "triangle")))
    web.add_redirect("/moved.jpg", "/real.jpg")
    add("/moved.jpg", "an orange triangle behind a redirect", kept)

    # Caption hygiene: rejected before any fetch.
    for caption, reason in (
        ("", "empty_caption"),
        ("IMG_4782.jpg", "filename_caption"),
        ("DSC0001", "filename_caption"),
        ("beautiful pic", "boilerplate_caption"),
        ("a", "short_caption"),
    ):
        name = f"/never-fetched-{len(rows)}.jpg"
        web.add(name, jpeg(render(base + 30 + len(rows), (600, 600))))
        add(name, caption, rejected("caption", reason))

    # URL hygiene.
    add(None, "a row with no url at all", rejected("read", "missing_url"), url="")
    add(None, "a url that is not one", rejected("url", "malformed_url"), url="http://")
    add(None, "a file transfer link", rejected("url", "unsupported_scheme"), url="ftp://example.com/a.jpg")
    add(None, "the first plain image listed twice", rejected("url", "duplicate_url", plain_keys[0]), url=rows[0]["url"])
    return Corpus(rows=rows, expected=expected, slow_paths=slow)

"""Caption hygiene on the alt text, before any fetch is spent on the row (the
plain-Python checks; `stages/caption.py` is the Beam adapter).

Dropped, each with its own reason (checked in this order):
- `empty_caption`: nothing but whitespace.
- `filename_caption`: a file name or camera counter instead of words
  (`img_4782.jpg`, `DSC0001`, `IMG-20190101-WA0003`, `photo 12.png`).
- `boilerplate_caption`: one of `CaptionConfig.boilerplate` ('image', 'photo',
  'beautiful pic', ...), compared lower-cased with punctuation removed.
- `short_caption`: under `min_chars` characters or `min_words` words (0 disables).
Set `caption.enabled: false` to keep every caption (e.g. when every sample will
be recaptioned anyway).
"""

from __future__ import annotations

import functools
import re

from schemas import CaptionConfig, RejectReason
from stages.core.verdict import Drop

_IMAGE_EXT = r"(?:jpe?g|png|gif|webp|bmp|tiff?|heic|avif)"
_FILENAME = re.compile(
    rf"""^(?:
        [\w\-.() ]+\.{_IMAGE_EXT}                                    # anything.jpg
      | (?:img|dsc[nf]?|pict?|imag|photo|image|screenshot|sam|gopr|mvimg|pxl|wp|p)[\s_-]*\d[\d_\s-]*(?:wa\d+)?  # camera counters
      | [a-z]{{0,4}}[_-]?\d{{4,}}(?:[_-]\d+)*                         # IMG-20190101-...
    )$""",
    re.IGNORECASE | re.VERBOSE,
)
_PUNCT = re.compile(r"[^\w\s]+")
_SPACES = re.compile(r"\s+")


@functools.lru_cache(maxsize=8)
def _bare_set(phrases: tuple[str, ...]) -> frozenset[str]:
    return frozenset(_bare(p) for p in phrases)


def _bare(text: str) -> str:
    return _SPACES.sub(" ", _PUNCT.sub(" ", text.lower())).strip()


def normalize_caption(text: str) -> str:
    return _SPACES.sub(" ", text).strip()


def check_caption(text: str, config: CaptionConfig) -> Drop | None:
    caption = normalize_caption(text)
    if not caption:
        return Drop(RejectReason.EMPTY_CAPTION)
    if _FILENAME.match(caption):
        return Drop(RejectReason.FILENAME_CAPTION, caption[:80])
    if _bare(caption) in _bare_set(tuple(config.boilerplate)):
        return Drop(RejectReason.BOILERPLATE_CAPTION, caption[:80])
    if len(caption) < config.min_chars or len(caption.split()) < config.min_words:
        return Drop(
            RejectReason.SHORT_CAPTION,
            f"{len(caption)} chars, {len(caption.split())} words (min {config.min_chars} chars, {config.min_words} words)",
        )
    return None

"""`beam run extract`: web pages in, image-text pairs out. Config, the pair row,
the rejection row and the report. No I/O here.

The pair row is what `beam run curate` reads: `url` and `caption` (its default
`read.url_col` / `read.caption_col`), `width` / `height` (set `read.width_col:
width`, `read.height_col: height` to use them), plus where each pair came from.
"""

from __future__ import annotations

import enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

EXTRACT_SCHEMA_VERSION = "1.0"


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ExtractReason(str, enum.Enum):
    """Why a WARC record, a page or an image produced no pair. Codes are stable."""

    # a record or page
    BAD_RECORD = "bad_record"
    NOT_HTML = "not_html"
    DECODE_ERROR = "decode_error"
    PAGE_OPT_OUT = "page_opt_out"
    # an image on a page
    DATA_URI = "data_uri"
    BAD_URL = "bad_url"
    TRACKING_PIXEL = "tracking_pixel"
    NO_TEXT = "no_text"
    # the global steps
    DUPLICATE_PAIR = "duplicate_pair"
    CAPTION_CAP = "caption_cap"


PAGE_REASONS = (ExtractReason.BAD_RECORD, ExtractReason.NOT_HTML, ExtractReason.DECODE_ERROR, ExtractReason.PAGE_OPT_OUT)
IMAGE_REASONS = (ExtractReason.DATA_URI, ExtractReason.BAD_URL, ExtractReason.TRACKING_PIXEL, ExtractReason.NO_TEXT)
DEDUP_REASONS = (ExtractReason.DUPLICATE_PAIR, ExtractReason.CAPTION_CAP)


class RecordsConfig(_Config):
    """Which WARC records are pages, and how their bytes become text."""

    html_content_types: list[str] = Field(
        ["text/html", "application/xhtml+xml"],
        description="Media types (HTTP Content-Type, else WARC-Identified-Payload-Type) read as HTML; "
        "others are `not_html`. A response with neither header is read as HTML if its body starts like HTML.",
    )
    max_page_bytes: int = Field(
        5 * 1024 * 1024, gt=0, description="Only this many bytes of a payload are parsed (Common Crawl truncates at 1 MiB)."
    )
    fallback_encoding: str = Field(
        "utf-8", description="Tried after the declared charsets (HTTP header, BOM, <meta charset>) fail to decode strictly."
    )
    max_replacement_fraction: float = Field(
        0.01,
        ge=0,
        le=1,
        description="If no charset decodes strictly, the first candidate is used with replacement characters "
        "when at most this fraction of the characters are replaced; otherwise charset-normalizer's detection "
        "decides, and a page it cannot place is a `decode_error`.",
    )


class ImagesConfig(_Config):
    """Which <img> tags become pairs, and how the caption is chosen."""

    parser: Literal["selectolax", "lxml"] = Field(
        "selectolax", description="HTML parser: selectolax (Lexbor) or lxml; both give the same pairs, selectolax was faster on average "
        "in benchmarks/extract_bench.py (see the README)."
    )
    caption_order: list[Literal["alt", "figcaption", "title"]] = Field(
        ["alt", "figcaption", "title"],
        description="The caption is the first non-empty of these texts; the others are kept in their own columns.",
    )
    lazy_src_attributes: list[str] = Field(
        ["data-src", "data-lazy-src", "data-original", "data-lazy", "data-url"],
        description="Attributes lazy loaders put the real URL in; used before `src` when present.",
    )
    lazy_srcset_attributes: list[str] = Field(["data-srcset", "data-lazy-srcset"], description="Lazy-loading srcsets.")
    tracking_pixel_max_side: int = Field(
        1, ge=0, description="An image declaring width or height at most this (1 catches 1x1 and 0x0) is a tracking pixel; 0 disables."
    )
    tracking_url_patterns: list[str] = Field(
        [
            r"/(pixel|spacer|blank|clear|transparent|1x1|trans)\.(gif|png)\b",
            r"[?&/]utm\.gif\b",
            r"/__utm\.gif",
            r"//(www\.)?facebook\.com/tr[/?]",
            r"//[^/]*doubleclick\.net/",
            r"//[^/]*google-analytics\.com/",
            r"//bat\.bing\.com/",
            r"//[^/]*quantserve\.com/pixel",
            r"//[^/]*scorecardresearch\.com/p\b",
            r"/b/ss/",
        ],
        description="Regular expressions (searched, case-insensitive) on the resolved image URL that mark tracking pixels.",
    )
    max_caption_chars: int = Field(2000, gt=0, description="Longer texts are cut to this many characters.")


class OptOutConfig(_Config):
    """Page-level opt-outs: `<meta name="robots">` and the `X-Robots-Tag` response header."""

    directives: list[str] = Field(
        ["noai", "noimageai", "noindex", "noimageindex"],
        description="Any of these drops the page's images (`page_opt_out`); an empty list disables the check.",
    )
    user_agent_token: str | None = Field(
        "img2dataset",
        description="An `X-Robots-Tag: AGENT: directives` header or `<meta name=AGENT>` applies when AGENT is this "
        "token (as in the curate crawler); `robots` and unscoped headers always apply.",
    )


class DedupConfig(_Config):
    """Global steps, both by Beam grouping (no worker holds more than one key's values)."""

    exact: bool = Field(True, description="Keep one row per (image URL, caption) pair: the first by (file, offset, position).")
    max_captions_per_url: int = Field(
        5, ge=0, description="Keep at most this many distinct captions per image URL (the first by file, offset, position); 0 disables."
    )


class OutputConfig(_Config):
    num_files: int = Field(0, ge=0, description="Number of pair parquet files; 0 lets the runner choose.")


class ExtractConfig(_Config):
    """`beam run extract`: WARC/WAT files or HTML folders -> image-text pair parquet files."""

    records: RecordsConfig = RecordsConfig()
    images: ImagesConfig = ImagesConfig()
    opt_out: OptOutConfig = OptOutConfig()
    dedup: DedupConfig = DedupConfig()
    output: OutputConfig = OutputConfig()


class ImagePair(BaseModel):
    """One image-text pair: a row of `pairs-*.parquet`."""

    model_config = ConfigDict(frozen=True)

    url: str = Field(description="Absolute image URL (largest srcset/<picture> candidate, lazy-loading attributes first).")
    caption: str = Field(description="The first non-empty of `images.caption_order` (default alt, figcaption, title).")
    caption_source: Literal["alt", "figcaption", "title"]
    width: int | None = Field(None, description="Declared `width` attribute in pixels, if any.")
    height: int | None = Field(None, description="Declared `height` attribute in pixels, if any.")
    alt: str | None = None
    title: str | None = None
    figcaption: str | None = Field(None, description="Text of the <figcaption> of the enclosing <figure>.")
    page_url: str
    language: str | None = Field(None, description="`<html lang>` of the page, as written.")
    source_file: str = Field(description="WARC/WAT file or page list the page came from.")
    source_offset: int = Field(ge=0, description="Byte offset of the WARC record in the (compressed) file; for a page list, its line number.")
    position: int = Field(ge=0, description="0-based position of the image among the images found on its page.")
    file_ordinal: int = Field(ge=0, description="Ordinal of `source_file` in the run's sorted input list.")
    image_index: int = Field(ge=0, description="0-based index of this image among all images found in `source_file`.")

    def sort_key(self) -> tuple:
        """Which of two rows is "first" (dedup keeps the first): input order."""
        return (self.file_ordinal, self.image_index)


class ExtractRejection(BaseModel):
    """A record, page or image that produced no pair (`rejects.parquet`)."""

    schema_version: Literal["1.0"] = EXTRACT_SCHEMA_VERSION
    reason: ExtractReason
    detail: str = ""
    source_file: str
    source_offset: int | None = None
    page_url: str | None = None
    image_url: str | None = None


class ExtractReport(BaseModel):
    """`DIR/report.json`. Identities checked before it is written:
    `records == other_records + pages + page rejects`,
    `images == candidates + image rejects`, `candidates == pairs + dedup rejects`."""

    schema_version: Literal["1.0"] = EXTRACT_SCHEMA_VERSION
    input_files: int
    records: int = Field(description="WARC records read (for page lists: pages listed).")
    other_records: dict[str, int] = Field(description="Records that are not pages, by WARC type (request, revisit, ...).")
    pages: int = Field(description="Pages parsed.")
    images: int = Field(description="<img> (and WAT IMG link) occurrences on parsed pages.")
    candidates: int = Field(description="Images that passed the per-image checks, before the global dedup steps.")
    pairs: int = Field(description="Rows written.")
    rejects: dict[str, int] = Field(description="Count per `ExtractReason` code.")
    accounting_ok: bool

"""Records that flow between curation stages and land in the outputs.

One `SampleRecord` carries a sample from its input row to its shard: every stage
adds to it (sizes, hashes, scores, captions) and nothing is kept in loose dicts.
A row that leaves the pipeline early becomes exactly one `Rejection`.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = "1.0"


class Stage(str, enum.Enum):
    """Where a row left the pipeline; also the funnel's row order."""

    READ = "read"
    URL = "url"
    CAPTION = "caption"
    CRAWL = "crawl"
    DECODE = "decode"
    DEDUP = "dedup"
    SELECT = "select"
    RECAPTION = "recaption"
    SHARDS = "shards"


class RejectReason(str, enum.Enum):
    """Every reason a row can be dropped for. Codes are stable: reports and
    downstream filters key on them."""

    # read
    MISSING_URL = "missing_url"
    UNPARSEABLE_ROW = "unparseable_row"
    URL_TOO_LONG = "url_too_long"
    CAPTION_TOO_LONG = "caption_too_long"
    CONTROL_CHARACTERS = "control_characters"
    INVALID_DECLARED_SIZE = "invalid_declared_size"
    # url hygiene
    MALFORMED_URL = "malformed_url"
    UNSUPPORTED_SCHEME = "unsupported_scheme"
    DUPLICATE_URL = "duplicate_url"
    DECLARED_TOO_SMALL = "declared_too_small"
    DECLARED_ASPECT_RATIO = "declared_aspect_ratio"
    # caption hygiene
    EMPTY_CAPTION = "empty_caption"
    FILENAME_CAPTION = "filename_caption"
    SHORT_CAPTION = "short_caption"
    BOILERPLATE_CAPTION = "boilerplate_caption"
    # crawl
    PRIVATE_ADDRESS = "private_address"
    DNS_FAILURE = "dns_failure"
    HTTP_ERROR = "http_error"
    TIMEOUT = "timeout"
    CONNECTION_ERROR = "connection_error"
    TOO_LARGE = "too_large"
    OPT_OUT = "opt_out"
    TOO_MANY_REDIRECTS = "too_many_redirects"
    HOST_UNREACHABLE = "host_unreachable"
    ROBOTS_DISALLOWED = "robots_disallowed"
    TDM_RESERVED = "tdm_reserved"
    # decode and resolution
    EMPTY_BODY = "empty_body"
    NOT_AN_IMAGE = "not_an_image"
    TRUNCATED_IMAGE = "truncated_image"
    ANIMATED_IMAGE = "animated_image"
    DECOMPRESSION_BOMB = "decompression_bomb"
    UNSUPPORTED_MODE = "unsupported_mode"
    TOO_SMALL = "too_small"
    ASPECT_RATIO = "aspect_ratio"
    RESIZE_FAILED = "resize_failed"
    # dedup
    EXACT_DUPLICATE = "exact_duplicate"
    NEAR_DUPLICATE = "near_duplicate"
    SEMANTIC_DUPLICATE = "semantic_duplicate"
    EVAL_OVERLAP = "eval_overlap"
    # selection (scores are annotations; only this stage drops on them)
    LOW_CLIP_SIMILARITY = "low_clip_similarity"
    UNSAFE = "unsafe"
    WATERMARK = "watermark"
    LOW_AESTHETIC = "low_aesthetic"
    # shards
    STAGING_LOST = "staging_lost"
    # any stage: an unexpected exception while processing the row (a bug, or an
    # input no check anticipated); the detail holds the exception type and message
    INTERNAL_ERROR = "internal_error"


class RecaptionStatus(str, enum.Enum):
    """Outcome of recaptioning one sample (`stages/recaption.py`). Every value
    but `ok` is a fallback: `caption_synthetic` stays None and the alt text
    remains the caption. Codes are stable: metrics are `recaption/fallback_<code>`."""

    OK = "ok"
    EMPTY = "empty"
    PROMPT_ECHO = "prompt_echo"
    TOO_SHORT = "too_short"
    LOOPING = "looping"
    TRUNCATED = "truncated"
    UNREADABLE_IMAGE = "unreadable_image"


class ImageRef(BaseModel):
    """Where a sample's image bytes were staged after decoding.

    Bytes never ride through a shuffle: the decode stage appends them to a
    staging file and later stages (scorers, the shard writer) read the byte range
    back. Internal to a run; cleared before the record is written to a shard.
    """

    model_config = ConfigDict(frozen=True)

    path: str
    offset: int = Field(ge=0)
    length: int = Field(gt=0)


class Provenance(BaseModel):
    source_file: str = Field(description="Input file the row was read from.")
    source_row: int = Field(ge=0, description="0-based row number in that file.")
    final_url: str | None = Field(None, description="URL after redirects.")
    http_status: int | None = None
    content_type: str | None = None
    fetched_at: datetime | None = None
    pipeline_version: str | None = None


class SampleRecord(BaseModel):
    """One sample, from input row to shard. Fields are filled in as stages run;
    `None` means the stage that fills it did not run (or is disabled)."""

    schema_version: Literal["1.0"] = SCHEMA_VERSION
    key: str = Field(description="Stable sample key: input file ordinal + row number.")
    url: str
    caption_original: str = Field(description="Alt text as read from the input.")
    caption_synthetic: str | None = Field(None, description="Caption from the recaption model.")
    caption: str | None = Field(None, description="The caption written to KEY.txt.")
    recaption_status: RecaptionStatus | None = Field(
        None, description="Why `caption_synthetic` is set (`ok`) or not (a fallback reason); None: not recaptioned."
    )

    declared_width: int | None = None
    declared_height: int | None = None
    original_width: int | None = Field(None, description="Decoded width, after EXIF rotation.")
    original_height: int | None = Field(None, description="Decoded height, after EXIF rotation.")
    width: int | None = Field(None, description="Width of the stored image.")
    height: int | None = Field(None, description="Height of the stored image.")
    image_format: str | None = Field(None, description="Extension of the stored image: jpg, png, webp.")
    image_bytes: int | None = Field(None, description="Size of the stored image in bytes.")
    image_sha256: str | None = Field(None, description="SHA-256 of the downloaded bytes (exact dedup).")
    phash: str | None = Field(None, description="64-bit DCT perceptual hash, 16 hex digits.")

    clip_similarity: float | None = None
    nsfw_score: float | None = Field(None, description="Unsafe probability from the NudeNet detector.")
    punsafe: float | None = Field(None, description="Unsafe probability from the CLIP NSFW head.")
    pwatermark: float | None = None
    aesthetic_score: float | None = None

    status: Literal["pending", "kept"] = "pending"
    shard: str | None = Field(None, description="Shard file the sample was written to.")
    provenance: Provenance
    image_ref: ImageRef | None = None

    @property
    def pixels(self) -> int:
        return (self.original_width or 0) * (self.original_height or 0)


class Rejection(BaseModel):
    """One row per input row that did not reach a shard."""

    schema_version: Literal["1.0"] = SCHEMA_VERSION
    key: str
    url: str
    stage: Stage
    reason: RejectReason
    detail: str = ""
    duplicate_of: str | None = Field(None, description="Key of the kept sample a duplicate lost to.")
    score: float | None = Field(None, description="The score a selection threshold rejected.")
    source_file: str | None = None
    source_row: int | None = None


class ShardManifest(BaseModel):
    """Written beside every shard as `NNNNNN.json`."""

    schema_version: Literal["1.0"] = SCHEMA_VERSION
    shard: str
    num_samples: int = Field(ge=0)
    keys: list[str]
    tar_bytes: int = Field(ge=0)
    sha256: str
    created_at: datetime
    config_sha256: str = Field(description="SHA-256 of the resolved config.json of the run.")
    config: dict = Field(description="The resolved pipeline config that produced the shard.")


class InputFileError(BaseModel):
    """An input file that failed part-way: its first `rows_read` rows were read
    and are accounted for; the rest of the file is not in the run."""

    path: str
    rows_read: int = Field(ge=0)
    error: str


class OptOutRow(BaseModel):
    """Rows a site's opt-out removed (robots.txt, TDMRep, X-Robots-Tag), and from how many hosts."""

    reason: RejectReason
    rows: int
    hosts: int


class FunnelRow(BaseModel):
    stage: Stage
    reason: RejectReason
    count: int


class Report(BaseModel):
    """`DIR/report.json`: the funnel. The accounting identity
    `input_rows == kept + rejected` is checked before it is written."""

    schema_version: Literal["1.0"] = SCHEMA_VERSION
    input_rows: int
    kept: int
    rejected: int
    shards: int
    funnel: list[FunnelRow]
    accounting_ok: bool
    input_errors: list[InputFileError] = Field(
        default_factory=list,
        description="Input files that failed part-way; their rows after the failure are not in `input_rows`.",
    )
    opt_outs: list[OptOutRow] = Field(
        default_factory=list, description="Rows each kind of opt-out removed, and the number of hosts they came from."
    )

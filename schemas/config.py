"""One config model per curation stage, and the run config that holds them.

The resolved `CurateConfig` is written to `DIR/config.json` and into every
shard manifest, so an output always says what made it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.scoring import RecaptionConfig, ScoringConfig, SelectConfig


class _StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ReadConfig(_StageConfig):
    """Input files: parquet, csv, tsv, jsonl, each optionally gzipped."""

    format: Literal["auto", "parquet", "csv", "tsv", "jsonl"] = Field(
        "auto", description="`auto` infers it from the extension (before any .gz)."
    )
    url_col: str = "url"
    caption_col: str = "caption"
    width_col: str | None = Field(None, description="Declared width column (LAION: WIDTH); None to ignore.")
    height_col: str | None = Field(None, description="Declared height column (LAION: HEIGHT); None to ignore.")
    max_url_chars: int = Field(4096, gt=0, description="Longer URLs are rejected as `url_too_long`.")
    max_caption_chars: int = Field(
        4096, gt=0, description="Longer captions are rejected as `caption_too_long` (alt text that long is page text, not a caption)."
    )
    max_declared_side: int = Field(
        1_000_000, gt=0, description="A declared width/height above this (or infinite/NaN) is rejected as `invalid_declared_size`."
    )


class UrlConfig(_StageConfig):
    """URL hygiene. The declared-size check uses the resolution stage's floor."""

    allowed_schemes: list[str] = ["http", "https"]
    dedup_urls: bool = Field(True, description="Drop exact duplicate URLs across the whole input.")


class CaptionConfig(_StageConfig):
    """Caption hygiene on the alt text, before any fetch is spent on the row."""

    enabled: bool = True
    min_chars: int = Field(5, description="Shorter captions are rejected as `short_caption`; 0 disables.")
    min_words: int = Field(2, description="Fewer words are rejected as `short_caption`; 0 disables.")
    boilerplate: list[str] = Field(
        default=[
            "image", "photo", "picture", "pic", "img", "untitled", "beautiful pic", "beautiful picture",
            "stock photo", "click here", "no description", "image description", "thumbnail", "default",
            "placeholder", "photo of the day", "free image", "download", "click to enlarge",
        ],
        description="Captions equal to one of these (case and punctuation ignored) are rejected.",
    )


class HostBudget(_StageConfig):
    """A per-host budget for hosts matching `pattern` (fnmatch on the host name, e.g. `*.cdn.example.com`)."""

    pattern: str
    max_per_host: int | None = Field(None, ge=1, description="Concurrent connections; None keeps the default.")
    max_host_rate: float | None = Field(None, gt=0, description="Requests per second; None keeps the default.")


class CrawlConfig(_StageConfig):
    """Fetching, as img2dataset does it, plus the address checks it lacks."""

    timeout_s: float = Field(10.0, gt=0, description="Per-request connect and read timeout.")
    retries: int = Field(0, ge=0, description="Extra attempts after a timeout or connection error.")
    user_agent_token: str | None = Field(
        "img2dataset", description="Token added to the User-Agent and matched in X-Robots-Tag."
    )
    disallowed_header_directives: list[str] = ["noai", "noimageai", "noindex", "noimageindex"]
    max_body_bytes: int = Field(32 * 1024 * 1024, gt=0, description="Larger bodies are rejected as `too_large`.")
    max_redirects: int = Field(5, ge=0)
    threads: int = Field(32, ge=1, description="Concurrent fetches per worker process.")
    max_per_host: int = Field(
        8,
        ge=1,
        description="Concurrent connections to one host across the whole job (all workers together); "
        "per-pattern values in `host_budgets`.",
    )
    max_host_rate: float = Field(
        10.0,
        gt=0,
        description="Requests per second to one host across the whole job (robots.txt included); per-pattern "
        "values in `host_budgets`. 10/s with 8 connections is polite to a small site and costs a CDN nothing.",
    )
    host_budgets: list[HostBudget] = Field(
        default_factory=list,
        description="Per-host-pattern budgets (first match wins), e.g. a partner CDN that allows more.",
    )
    host_down_after: int = Field(
        5,
        ge=1,
        description="Consecutive connection failures (refused, DNS, timeout) after which a host is declared down "
        "and its remaining rows are rejected as `host_unreachable` without a request.",
    )
    max_retry_after_s: float = Field(
        300.0,
        ge=0,
        description="Longest `Retry-After` (429/503) honoured; a host asking for longer is declared down.",
    )
    hot_host_rows: int = Field(
        2000,
        ge=1,
        description="A host with more rows than this is split over sub-keys (at most `max_per_host`) that "
        "share its budget, so one big host is crawled by several workers at once.",
    )
    host_groups: int = Field(
        1024,
        ge=1,
        description="Small hosts are hashed into this many crawl keys (each crawled by one worker at a time, "
        "all its hosts at once): at most this many workers crawl the long tail together, so keep it a few times "
        "the number of workers.",
    )
    dns_cache_ttl_s: float = Field(300.0, ge=0, description="Upper bound on how long a DNS answer is reused.")
    robots_txt: bool = Field(True, description="Fetch robots.txt once per host and honour it (RFC 9309).")
    robots_user_agents: list[str] = Field(
        default_factory=lambda: [
            "GPTBot", "CCBot", "Google-Extended", "anthropic-ai", "ClaudeBot", "Applebot-Extended",
            "Bytespider", "cohere-ai", "PerplexityBot", "Meta-ExternalAgent", "Diffbot", "omgili",
        ],
        description="AI-crawler tokens whose robots.txt rules are honoured besides `user_agent_token` (a "
        "disallow for any of them rejects the row); empty to honour only our own token and `*`.",
    )
    max_robots_bytes: int = Field(512 * 1024, gt=0, description="robots.txt is read up to this size (RFC 9309: at least 500 KiB).")
    tdmrep: bool = Field(
        True, description="Honour W3C TDMRep: the `tdm-reservation: 1` header and `/.well-known/tdmrep.json`."
    )
    allow_private_network: bool = Field(
        False,
        description="Allow loopback, private, link-local and reserved addresses. Off by default: "
        "a crawler that follows untrusted URLs must not reach internal services.",
    )


class DecodeConfig(_StageConfig):
    """Decoding, resolution floor and optional resize (img2dataset's modes)."""

    min_side: int = Field(512, ge=0, description="Images whose shorter side is below this are rejected; 0 disables.")
    max_aspect_ratio: float = Field(3.0, ge=1.0, description="Images whose longer/shorter side ratio is above this are rejected.")
    max_pixels: int = Field(
        89_478_485, gt=0, description="Decompression-bomb guard (PIL's default); larger images are rejected."
    )
    resize_mode: Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"] = "no"
    image_size: int = Field(512, gt=0, description="Target size for resize modes other than `no`.")
    resize_only_if_bigger: bool = True
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = Field(95, ge=1, le=100)
    threads: int = Field(
        0,
        ge=0,
        description="Images decoded, checked, hashed and resized at once per worker process, on threads apart from "
        "the crawl's fetching threads (which are then free for the next request as soon as a body is in); "
        "0: one per CPU available to the process.",
    )


class SemanticDedupConfig(_StageConfig):
    """Semantic deduplication by CLIP image embeddings (SemDeDup, Abbas et al.
    2023); needs `scoring.clip`. Runs after scoring, before selection; see
    `stages/semantic_dedup.py` for the rule and the cost."""

    threshold: float = Field(
        0.95,
        gt=0.0,
        le=1.0,
        description="Pairs whose embeddings' cosine similarity is >= this are duplicates; their connected "
        "components keep one survivor (highest clip_similarity, then most pixels, then smallest key).",
    )
    clusters: int = Field(
        1000, ge=1, description="k of the k-means; pairs are compared inside clusters (see `boundary`)."
    )
    boundary: float = Field(
        0.05,
        ge=0.0,
        le=2.0,
        description="An embedding is also compared in every other cluster whose bisector with its nearest "
        "centroid lies within this Euclidean distance of it, so a pair split by a cluster boundary is found unless "
        "more than 2 * boundary of its difference vector lies along the line between the two centroids. "
        ">= sqrt(2 * (1 - threshold)) / 2 (0.158 at 0.95) compares every pair above the threshold (while no "
        "embedding reaches `max_boundary_clusters`); 0 compares inside clusters only (plain SemDeDup). See "
        "stages/core/semantic.py.",
    )
    max_boundary_clusters: int = Field(
        16,
        ge=0,
        description="Most clusters an embedding joins besides its nearest (the nearest bisectors first); one with "
        "more is counted in `boundary_capped`.",
    )
    sample_size: int = Field(
        100_000, ge=1, description="Embeddings drawn at random (on one worker) to fit the k-means centroids."
    )
    iterations: int = Field(10, ge=1, description="k-means (Lloyd) iterations at most.")
    seed: int = 0
    centroids: str | None = Field(
        None,
        description="A centroids .npy of an earlier run (its DIR/semantic/centroids.npy) to reuse instead of "
        "fitting; the run's own centroids are always written to DIR/semantic/centroids.npy.",
    )
    max_cluster_size: int = Field(
        20_000,
        ge=4,
        description="Most embeddings one worker holds when comparing: a larger cluster is cut by key hash into "
        "blocks of a quarter of this on average and compared block pair by block pair (a pair holds half the "
        "bound on average; the spread of hash blocks keeps it under the bound).",
    )
    batch_rows: int = Field(1024, ge=1, description="Rows per matrix product in the pairwise step.")


class DedupConfig(_StageConfig):
    """Exact (SHA-256) and near (64-bit pHash) deduplication across the dataset."""

    exact: bool = True
    near: bool = True
    hamming_threshold: int = Field(
        6,
        ge=0,
        le=16,
        description="Pairs whose pHash Hamming distance is <= this are near duplicates (0: identical pHashes "
        "only). 6 is measured in benchmarks/dedup_bench.py: it finds every re-encoded and resized copy and ~80 % "
        "of 2-5 % crops with no false pair among 900 photo-like images, and leaves < 0.01 chance matches per "
        "image among 1e9 uniformly random hashes (8 finds ~92 % of crops but ~0.3 chance matches per image). "
        "Cost grows with it: t + 1 bands of 64 / (t + 1) bits.",
    )
    partitions_per_band: int = Field(
        256, ge=1, description="LSH partitions per band; raise for billions of images to bound memory per key."
    )
    max_survivor_rounds: int = Field(
        6,
        ge=1,
        description="Pointer-jumping rounds that resolve chains of near duplicates to their survivor: "
        "R rounds resolve chains of up to 2**R - 1 links (63 by default); longer chains are rejected without a survivor.",
    )
    batch_size: int = Field(
        20_000,
        ge=1,
        description="Elements batched on a worker before each shuffle (local pre-aggregation): "
        "fewer, larger shuffle elements.",
    )
    key_partitions: int = Field(
        1024,
        ge=1,
        description="Partitions of the sha256, pointer and record-key spaces for the exact-dedup, "
        "survivor and join shuffles; each holds about N / key_partitions entries in memory.",
    )
    semantic: SemanticDedupConfig | None = Field(
        None, description="Semantic dedup by CLIP embeddings (needs scoring.clip); None (the default) skips it."
    )
    eval_sets: list[str] = Field(
        [],
        description="Evaluation sets to decontaminate against: folders of images, WebDataset .tar files or "
        "parquet files with an image bytes column; `name=path` names a set (default: the path's base name). "
        "Samples within eval_hamming_threshold (pHash) or, with scoring.clip, at or above eval_cosine_threshold "
        "of an evaluation image are rejected `eval_overlap`.",
    )
    eval_hamming_threshold: int = Field(6, ge=0, le=16, description="pHash Hamming distance counted as overlap.")
    eval_cosine_threshold: float | None = Field(
        0.95, gt=0.0, le=1.0, description="CLIP cosine counted as overlap (with scoring.clip); None: pHash only."
    )
    eval_broadcast_max: int = Field(
        100_000,
        ge=0,
        description="Evaluation items sent to every worker as a side input (~1 KiB each with a 512-d "
        "embedding, 8 bytes without); a larger set is matched by a join instead.",
    )


class EmbeddingsConfig(_StageConfig):
    """CLIP embeddings written beside the shards when `scoring.clip` runs, in
    the layout autofaiss and clip-retrieval's `index` step read:
    `DIR/embeddings/img_emb_NNNN.npy` (float16, L2-normalised) with
    `DIR/embeddings/metadata_NNNN.parquet` in the same row order (the only
    .npy files in that folder, so `autofaiss build_index --embeddings
    DIR/embeddings` reads exactly them)."""

    enabled: bool = Field(True, description="Write the image embeddings (when CLIP scoring runs).")
    text: bool = Field(False, description="Also write the caption embeddings, same rows, as DIR/embeddings/text_emb/text_emb_NNNN.npy.")
    partitions: int = Field(
        64, ge=1, description="Embedding files at most (by key hash); each writer holds about N / partitions rows."
    )


class ShardsConfig(_StageConfig):
    samples_per_shard: int = Field(1000, ge=1)
    writers: int = Field(
        4, ge=1, description="Parallel shard writers; at most this many shards are short of samples_per_shard."
    )
    caption_source: Literal["original", "synthetic"] = Field(
        "synthetic", description="Caption written to KEY.txt; synthetic falls back to original when absent."
    )


class CheckpointConfig(_StageConfig):
    """Committed work units (`stages/units.py`): how often finished rows are
    committed, so that `--resume` after a kill fetches none of them again."""

    enabled: bool = Field(True, description="Commit finished rows under DIR/_parts/; off: a killed run starts over.")
    rows: int = Field(1000, ge=1, description="Rows per committed part (one small JSON-lines file each).")
    seconds: float = Field(60.0, gt=0, description="A part is also committed once it is this old, so slow hosts lose little.")


class CurateConfig(_StageConfig):
    """The whole `beam run curate` config (YAML file or defaults)."""

    read: ReadConfig = ReadConfig()
    url: UrlConfig = UrlConfig()
    caption: CaptionConfig = CaptionConfig()
    crawl: CrawlConfig = CrawlConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    decode: DecodeConfig = DecodeConfig()
    dedup: DedupConfig = DedupConfig()
    shards: ShardsConfig = ShardsConfig()
    embeddings: EmbeddingsConfig = EmbeddingsConfig()
    scoring: ScoringConfig = Field(
        default_factory=ScoringConfig,
        description="Model scorers (CLIP, safety, aesthetic); all off until configured. See schemas/scoring.py.",
    )
    select: SelectConfig = Field(
        default_factory=SelectConfig, description="Score thresholds; the only step that drops on scores."
    )
    max_error_rate: float = Field(
        0.01,
        ge=0,
        le=1,
        description="Rows that raise an unexpected error become `internal_error` rejects; above this fraction of a "
        "stage's rows the run stops (systematic errors are a bug, not bad input) and exits with status 4.",
    )
    recaption: RecaptionConfig | None = Field(
        None,
        description="Synthetic captions for the selected samples from a LLaVA-style model (needs `model`); "
        "None (the default) skips recaptioning and KEY.txt gets the alt text. See schemas/scoring.py.",
    )

    @model_validator(mode="after")
    def _resolve_auto_thresholds(self) -> CurateConfig:
        # Thresholds left at `auto` take their defaults only where their score is
        # computed, so a run without that scorer doesn't fail on a default.
        self.select = self.select.resolve_auto(self.scoring)
        return self

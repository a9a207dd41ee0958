"""Pydantic models for everything that crosses a stage boundary. No I/O here."""

from schemas.config import (
    CaptionConfig,
    CrawlConfig,
    CurateConfig,
    DecodeConfig,
    DedupConfig,
    ReadConfig,
    ShardsConfig,
    UrlConfig,
)
from schemas.records import (
    SCHEMA_VERSION,
    FunnelRow,
    ImageRef,
    Provenance,
    RecaptionStatus,
    RejectReason,
    Rejection,
    Report,
    SampleRecord,
    ShardManifest,
    Stage,
)

from schemas.trainer import LatentCacheManifest, TrainConfig  # noqa: E402  (after the records it may use)

# Models whose JSON Schemas are checked in under schemas/json/ (name -> model).
JSON_SCHEMA_MODELS = {
    "sample_record": SampleRecord,
    "rejection": Rejection,
    "shard_manifest": ShardManifest,
    "report": Report,
    "curate_config": CurateConfig,
    "train_config": TrainConfig,
    "latent_cache_manifest": LatentCacheManifest,
}

__all__ = [
    "JSON_SCHEMA_MODELS",
    "SCHEMA_VERSION",
    "CaptionConfig",
    "CrawlConfig",
    "CurateConfig",
    "DecodeConfig",
    "DedupConfig",
    "FunnelRow",
    "ImageRef",
    "Provenance",
    "ReadConfig",
    "RecaptionStatus",
    "RejectReason",
    "Rejection",
    "Report",
    "SampleRecord",
    "ShardManifest",
    "ShardsConfig",
    "Stage",
    "UrlConfig",
]

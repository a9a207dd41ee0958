"""Pydantic models for everything that crosses a stage boundary. No I/O here."""

from schemas.config import (
    CaptionConfig,
    CheckpointConfig,
    CrawlConfig,
    HostBudget,
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
    OptOutRow,
    ImageRef,
    InputFileError,
    Provenance,
    RecaptionStatus,
    RejectReason,
    Rejection,
    Report,
    SampleRecord,
    ShardManifest,
    Stage,
)

from schemas.extract import ExtractConfig, ExtractRejection, ExtractReport, ImagePair  # noqa: E402
from schemas.lora import LoraDataReport, LoraTrainConfig  # noqa: E402
from schemas.trainer import LatentCacheManifest, TrainConfig  # noqa: E402

# Models whose JSON Schemas are checked in under schemas/json/ (name -> model).
JSON_SCHEMA_MODELS = {
    "sample_record": SampleRecord,
    "rejection": Rejection,
    "shard_manifest": ShardManifest,
    "report": Report,
    "curate_config": CurateConfig,
    "train_config": TrainConfig,
    "latent_cache_manifest": LatentCacheManifest,
    "lora_train_config": LoraTrainConfig,
    "lora_data_report": LoraDataReport,
    "extract_config": ExtractConfig,
    "image_pair": ImagePair,
    "extract_rejection": ExtractRejection,
    "extract_report": ExtractReport,
}

__all__ = [
    "JSON_SCHEMA_MODELS",
    "SCHEMA_VERSION",
    "CaptionConfig",
    "CheckpointConfig",
    "CrawlConfig",
    "HostBudget",
    "CurateConfig",
    "DecodeConfig",
    "DedupConfig",
    "FunnelRow",
    "OptOutRow",
    "ImageRef",
    "InputFileError",
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

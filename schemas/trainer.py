"""Config and state models for the `trainer` (latent diffusion from the curated shards).

`TrainConfig` is the whole config of `trainer cache`, `trainer fit` and `trainer bench`
(a YAML file, validated here). The resolved config is written to `RUN_DIR/config.json`
and into every checkpoint; the latent cache writes a `LatentCacheManifest` that says
what made it, and `fit` refuses a cache whose `CacheSpec` differs from the one its
own config and components would produce. No I/O here.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

TRAINER_SCHEMA_VERSION = "1.0"

PresetName = Literal["tiny", "S", "B", "L", "XL"]
TensorDtype = Literal["float32", "bfloat16", "float16"]


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ComponentsConfig(_Config):
    """The frozen VAE and text encoder, by local path or hub id (`from_pretrained`).

    A diffusers pipeline repo (e.g. `stabilityai/stable-diffusion-2-1-base`) is named
    with the same id for all three and the subfolders `vae`, `text_encoder`, `tokenizer`;
    `trainer --components DIR_OR_ID` sets exactly that.
    """

    vae: str | None = Field(None, description="diffusers AutoencoderKL: path or hub id (required to cache or fit).")
    vae_subfolder: str | None = None
    text_encoder: str | None = Field(
        None, description="transformers CLIPTextModel(WithProjection) or T5EncoderModel: path or hub id (required to cache or fit)."
    )
    text_encoder_subfolder: str | None = None
    tokenizer: str | None = Field(None, description="Tokenizer path or hub id; None: same as text_encoder.")
    tokenizer_subfolder: str | None = None
    max_text_length: int = Field(
        77, ge=1, description="Captions are padded/truncated to this many tokens (CLIP: 77)."
    )
    revision: str | None = Field(None, description="Hub revision for all three; None: default branch.")


class ModelConfig(_Config):
    """The denoiser (`trainer.model.DiffusionTransformer`): a preset plus overrides."""

    preset: PresetName = Field(
        "B", description="DiT sizes: S 384x12, B 768x12, L 1024x24, XL 1152x28 (hidden x depth); tiny is for tests."
    )
    patch_size: int = Field(2, ge=1, description="Latent pixels per token side (DiT-*/2).")
    hidden_size: int | None = Field(None, ge=8, description="Override the preset's width.")
    depth: int | None = Field(None, ge=1, description="Override the preset's number of blocks.")
    num_heads: int | None = Field(None, ge=1, description="Override the preset's attention heads.")
    mlp_ratio: float = Field(4.0, gt=0)
    qk_norm: bool = Field(True, description="RMSNorm on queries and keys (stabilises bf16 attention logits).")
    attention: Literal["auto", "sdpa", "flash_attn"] = Field(
        "auto",
        description="auto: the `flash_attn` package on CUDA in bf16/fp16 when installed, else "
        "torch scaled_dot_product_attention (which picks flash/cuDNN/efficient kernels itself).",
    )
    compile: bool = Field(False, description="torch.compile the denoiser (CUDA runs; slow to warm up).")
    micro_conditioning: bool | None = Field(
        None,
        description="SDXL's size and crop conditioning (original size, crop top-left, target size added to the "
        "timestep conditioning). None: on when data.buckets is on, off otherwise.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute each block's activations in the backward pass: less memory, ~30% more compute."
    )


class DataConfig(_Config):
    """Where training samples come from: raw curated shards or a latent cache (preferred)."""

    shards: str | None = Field(
        None,
        description="Brace spec of curated WebDataset shards, e.g. 'out/shards/{000000..000099}.tar'. "
        "With `cache` also set, only used to check that the cache is not stale.",
    )
    cache: str | None = Field(None, description="Latent cache directory written by `trainer cache`.")
    resolution: int = Field(
        256,
        ge=8,
        description="Training size in pixels: the square side (resize shorter side, center crop), or with `buckets` "
        "the side of the square whose pixel count every bucket has about.",
    )
    buckets: bool = Field(
        False,
        description="Aspect-ratio buckets (SDXL): each image goes to the bucket of about resolution^2 pixels whose "
        "aspect ratio is closest to its own, resized to cover it and cropped the minimum; batches hold one bucket. "
        "False: square centre crops.",
    )
    max_aspect: float = Field(3.0, ge=1.0, description="Widest bucket's long side / short side (the curation keeps up to 3).")
    bucket_step: int | None = Field(
        None, ge=1, description="Bucket sides are multiples of this (pixels); None: the VAE factor x the patch size (the "
        "finest whole token grid). Must be a multiple of that; SDXL used 64.",
    )
    batch_size: int = Field(32, ge=1, description="Micro-batch per device (images).")
    num_workers: int = Field(4, ge=0, description="Data-loader worker processes per device.")
    prefetch_factor: int = Field(4, ge=1, description="Batches each worker keeps ready.")
    shuffle_span: int = Field(
        4, ge=1, description="Shards whose samples a worker shuffles together (shard order is shuffled every epoch)."
    )
    bucket_batch_sizes: bool = Field(
        True,
        description="With buckets: batch size per bucket = batch_size x square tokens / bucket tokens (rounded down, "
        "at least 1), so every batch holds about as many tokens as a square one. False: batch_size everywhere.",
    )
    synthetic_caption_prob: float = Field(
        0.95,
        ge=0.0,
        le=1.0,
        description="Chance of training on the synthetic caption when a sample has one (DALL-E 3 used 0.95); "
        "0 trains on original captions only, 1 on synthetic ones wherever present.",
    )


class StageConfig(_Config):
    """One resolution stage: train `steps` optimizer steps at `resolution` from that
    resolution's latent cache, starting from the weights, optimizer and EMA the previous
    stage ended with (SDXL, PixArt: 256 px, then 512 px, then 1024 px)."""

    resolution: int = Field(ge=8, description="Pixels (the square side, or the buckets' pixel count with data.buckets).")
    steps: int = Field(ge=1, description="Optimizer steps in this stage.")
    batch_size: int | None = Field(None, ge=1, description="Micro-batch per device; None: data.batch_size.")
    lr: float | None = Field(None, gt=0, description="Peak learning rate; None: optim.lr. Each stage warms up and decays anew.")
    cache: str | None = Field(None, description="Latent cache at this resolution; None: data.cache (one stage only).")


class CacheConfig(_Config):
    """`trainer cache`: how latents and text embeddings are stored."""

    dtype: TensorDtype = Field("bfloat16", description="Storage dtype of latents and text embeddings.")
    compute_dtype: TensorDtype = Field("float32", description="dtype the VAE and text encoder run in while caching.")
    batch_size: int = Field(32, ge=1, description="Images encoded per VAE call.")
    samples_per_file: int = Field(512, ge=1, description="Samples per cache file; files are what ranks and workers split.")
    captions: Literal["original", "synthetic", "both"] = Field(
        "both", description="Which captions to encode. `both` lets training mix them (data.synthetic_caption_prob)."
    )
    num_workers: int = Field(2, ge=0, description="Decode workers.")


class ObjectiveConfig(_Config):
    """Rectified flow (Liu et al. 2022; SD3, Esser et al. 2024): x_t = (1-t) x0 + t noise, target noise - x0."""

    logit_normal_mean: float = Field(0.0, description="t = sigmoid(N(mean, std)) (SD3's lognorm(0, 1)).")
    logit_normal_std: float = Field(1.0, gt=0)
    caption_dropout: float = Field(
        0.1, ge=0.0, lt=1.0, description="Chance a caption is replaced by the empty caption, for classifier-free guidance."
    )
    loss_buckets: int = Field(10, ge=1, description="Equal-width timestep buckets the loss is also logged by.")


class OptimConfig(_Config):
    """AdamW with linear warmup and cosine decay (DiT: lr 1e-4, no weight decay)."""

    lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0)
    eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(1000, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="Cosine decays to lr * this at max_steps.")
    grad_clip: float = Field(1.0, ge=0.0, description="Max global gradient norm; 0 disables clipping.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    ema_decay: float = Field(0.9999, ge=0.0, lt=1.0)
    ema_warmup: bool = Field(
        True, description="Use min(ema_decay, (1 + step) / (10 + step)) so short runs still average (diffusers' EMAModel)."
    )


class ValidationConfig(_Config):
    """Preview grids, drawn with the same pipeline class the export uses."""

    prompts: list[str] = Field(
        default_factory=list, description="Empty: the first captions of the training data (up to 4)."
    )
    every_steps: int = Field(1000, ge=0, description="0 disables periodic grids (the final export still gets one).")
    steps: int = Field(30, ge=1, description="Euler steps.")
    guidance: float = Field(4.0, ge=1.0, description="Classifier-free guidance scale; 1 disables.")
    seed: int = 0
    images_per_prompt: int = Field(2, ge=1)


class CheckpointConfig(_Config):
    every_steps: int = Field(1000, ge=1)
    keep_last: int = Field(3, ge=1, description="Older checkpoints are deleted.")


class LoggingConfig(_Config):
    every_steps: int = Field(50, ge=1, description="Loss is read back from the device only this often.")
    tracker: Literal["tensorboard", "none"] = "tensorboard"


class TrainConfig(_Config):
    """The whole trainer config (`trainer/configs/*.yaml`)."""

    seed: int = 0
    max_steps: int = Field(400_000, ge=1, description="Optimizer steps.")
    mixed_precision: Literal["no", "bf16"] = Field("bf16", description="Autocast dtype (weights stay fp32).")
    components: ComponentsConfig = ComponentsConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    cache: CacheConfig = CacheConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    optim: OptimConfig = OptimConfig()
    validation: ValidationConfig = ValidationConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    stages: list[StageConfig] = Field(
        default_factory=list,
        description="Resolution stages, run in order; max_steps is their total. Empty: one stage from data.resolution, "
        "data.batch_size, optim.lr, data.cache and max_steps.",
    )

    @model_validator(mode="after")
    def _stages_add_up(self) -> TrainConfig:
        if self.stages:
            total = sum(stage.steps for stage in self.stages)
            if "max_steps" not in self.model_fields_set:
                self.max_steps = total
            elif self.max_steps != total:
                raise ValueError(f"max_steps is {self.max_steps} but the stages' steps add up to {total}; make them agree (or leave max_steps out)")
        return self

    def resolved_stages(self) -> list[StageConfig]:
        """The stages with every field filled in (one stage when `stages` is empty)."""
        stages = self.stages or [StageConfig(resolution=self.data.resolution, steps=self.max_steps)]
        single = len(stages) == 1
        return [
            s.model_copy(update={
                "batch_size": s.batch_size or self.data.batch_size,
                "lr": s.lr or self.optim.lr,
                "cache": s.cache or (self.data.cache if single else None),
            })
            for s in stages
        ]

    def uses_micro_conditioning(self) -> bool:
        return self.data.buckets if self.model.micro_conditioning is None else self.model.micro_conditioning


# ---- what a latent cache records -------------------------------------------------------------


class ComponentIdentity(_Config):
    """Names a frozen model: where it was loaded from and a hash of its config and weights."""

    source: str
    subfolder: str | None = None
    class_name: str
    fingerprint: str = Field(description="SHA-256 over the model class, config and every parameter's bytes.")


class CacheSpec(_Config):
    """Everything that changes what is in a latent cache. `fit` recomputes it from its own
    config and components and refuses a cache whose spec differs."""

    vae: ComponentIdentity
    vae_scaling_factor: float
    vae_shift_factor: float
    latent_channels: int
    text_encoder: ComponentIdentity
    max_text_length: int
    text_dim: int
    pooled_dim: int
    resolution: int
    buckets: list[tuple[int, int]] | None = Field(
        None, description="The aspect buckets (width, height) in pixels; None: square centre crops at `resolution`."
    )
    crop: Literal["center"] = "center"
    latent_mode: Literal["mean"] = Field("mean", description="The VAE posterior's mean is stored (no sampling).")
    dtype: TensorDtype
    captions: Literal["original", "synthetic", "both"]


class SourceShard(_Config):
    path: str
    size_bytes: int
    sha256: str
    num_samples: int
    lost: int = Field(0, description="Samples of the shard that could not be read (truncated, unreadable or vanished shard).")
    problem: str | None = Field(None, description="What was wrong with the shard, when something was.")


class CacheFile(_Config):
    file: str = Field(description="Name of a safetensors file inside the cache directory.")
    source: str = Field(description="Shard the samples came from.")
    num_samples: int = Field(ge=1)
    bucket: tuple[int, int] | None = Field(None, description="The (width, height) bucket of every sample in the file; None: square.")


class CachePart(_Config):
    """`CACHE_DIR/parts/SHARD_STEM.json`: one finished source shard; a rerun of `trainer cache`
    skips shards that have one."""

    source: SourceShard
    files: list[CacheFile]
    skipped: int = 0
    preview_captions: list[str] = Field(default_factory=list)


class LatentCacheManifest(_Config):
    """`CACHE_DIR/manifest.json`."""

    schema_version: Literal["1.0"] = TRAINER_SCHEMA_VERSION
    created_at: datetime
    spec: CacheSpec
    sources: list[SourceShard]
    files: list[CacheFile]
    num_samples: int
    skipped: int = Field(0, description="Samples that could not be decoded (named in the log).")
    preview_captions: list[str] = Field(default_factory=list, description="A few captions, for default previews.")
    null_text_file: str = "null_text.safetensors"
    bucket_counts: dict[str, int] = Field(default_factory=dict, description="Samples per bucket ('WxH'), in aspect order.")


# ---- what a checkpoint records ----------------------------------------------------------------


class DataPosition(_Config):
    """Where a rank's data stream stands: the stream is a pure function of the seed, the
    file list and this layout, so `micro_batches` consumed is enough to resume exactly."""

    micro_batches: int = Field(0, ge=0)
    world_size: int = Field(1, ge=1)
    num_workers: int = Field(0, ge=0)
    batch_size: int = Field(1, ge=1)
    files: int = Field(0, ge=0, description="Number of shard or cache files the stream reads.")
    stage: int = Field(0, ge=0, description="Resolution stage the micro-batches were consumed in (index into stages).")


class CheckpointState(_Config):
    """`checkpoints/step-NNNNNNNN/state.json`: the non-tensor half of a checkpoint."""

    schema_version: Literal["1.0"] = TRAINER_SCHEMA_VERSION
    step: int = Field(ge=0, description="Optimizer steps done.")
    samples_seen: int = Field(ge=0, description="Images seen, all ranks.")
    data: DataPosition
    scheduler: dict = Field(description="torch LR scheduler state_dict.")
    optimizer_param_groups: list[dict]
    optimizer_scalars: dict = Field(default_factory=dict, description="Non-tensor per-parameter optimizer state.")
    config: dict = Field(description="The resolved TrainConfig that wrote the checkpoint.")
    created_at: datetime


class RankRngState(_Config):
    """`rng-rankN.json`: Python's and NumPy's global generators of one rank (torch's are in
    `rng-rankN.safetensors`)."""

    python: list = Field(description="random.getstate(), tuples as lists.")
    numpy: dict = Field(description="np.random.get_state() as a dict.")

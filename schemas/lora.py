"""Config and report models for `trainer lora` (LoRA fine-tuning on 15-200 images).

`LoraTrainConfig` is the whole config of one LoRA run (a YAML file and/or command-line
flags, validated here); the resolved config is written to `RUN_DIR/config.json` and into
every checkpoint. `LoraDataReport` says what the command found in the image folder, what
it set aside and why, and how the images were captioned, bucketed and split
(`RUN_DIR/data_report.json`); `LoraRunSummary` is what the run produced
(`RUN_DIR/summary.json`). No I/O here.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.records import RecaptionStatus
from schemas.scoring import RecaptionConfig

LORA_SCHEMA_VERSION = "1.0"


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoraAdapterConfig(_Config):
    """The adapter: peft LoRA (Hu et al. 2021) on the denoiser's linear projections."""

    rank: int = Field(16, ge=1, description="LoRA rank r (the inner width of each update B @ A).")
    alpha: float | None = Field(
        None, gt=0, description="LoRA alpha; the update is scaled by alpha / rank. None: alpha = rank (scale 1)."
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA branch input (peft's lora_dropout).")
    targets: Literal["attention", "attention_mlp"] = Field(
        "attention",
        description="attention: to_q, to_k, to_v, to_out of every self- and cross-attention; "
        "attention_mlp: also the feed-forward fc1, fc2.",
    )

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)


class LoraDataConfig(_Config):
    """How the image folder becomes training data. Every image that is not used is named
    in the data report with its reason; nothing is dropped silently."""

    resolution: int | None = Field(
        None,
        ge=8,
        description="Bucket area is resolution^2 pixels. None: the base model's native size "
        "(transformer.config.sample_size x the VAE factor).",
    )
    min_side: int | None = Field(
        None,
        ge=0,
        description="Images whose shorter side is below this many pixels are set aside as `too_small` "
        "(the curation decode check). None: half the resolution; 0 disables.",
    )
    max_aspect_ratio: float = Field(
        4.0, ge=1.0, description="Images whose longer/shorter side ratio is above this are set aside as `aspect_ratio`."
    )
    max_pixels: int = Field(89_478_485, gt=0, description="Decompression-bomb guard (PIL's default).")
    exact_duplicates: bool = Field(True, description="Set aside byte-identical copies (SHA-256), keeping the first by rank.")
    near_duplicates: bool = Field(True, description="Set aside near duplicates (64-bit pHash), keeping the best by rank.")
    hamming_threshold: int | None = Field(
        None,
        ge=0,
        le=16,
        description="pHash Hamming distance at or below which two images are near duplicates. "
        "None: the curation pipeline's `DedupConfig.hamming_threshold`.",
    )
    bucket_max_aspect: float = Field(
        2.0,
        ge=1.0,
        description="Aspect-ratio buckets span up to this ratio; wider images go to the widest bucket "
        "(more is cropped), none is dropped.",
    )
    caption_extension: str = Field(".txt", description="Captions are IMAGE_STEM + this, beside the image.")
    prepend_trigger: bool = Field(
        True, description="Prefix the trigger word to captions that do not already contain it."
    )
    recaption: RecaptionConfig | None = Field(
        None,
        description="Caption images that have no caption file with this vision-language model (the recaption "
        "stage's model); None: such images get the trigger word as their caption, with a warning.",
    )


class LoraOptimConfig(_Config):
    """AdamW on the LoRA weights only (the base model is frozen)."""

    steps: int = Field(1000, ge=1, description="Optimizer steps.")
    batch_size: int = Field(4, ge=1, description="Images per step; a bucket's last batch is filled by repeating its images.")
    lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0.0)
    eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(50, ge=0, description="Linear warmup from 0.")
    schedule: Literal["constant", "cosine"] = Field("constant", description="After warmup: constant, or cosine to 0.")
    grad_clip: float = Field(1.0, ge=0.0, description="Max gradient norm; 0 disables clipping.")
    caption_dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Chance a caption is replaced by the empty one. 0 by default: training the empty caption on the "
        "new images would move the unconditional branch of guidance (and so every prompt) towards them; prior "
        "preservation keeps it at the base model's.",
    )
    logit_normal_mean: float = Field(0.0, description="Timesteps t = sigmoid(N(mean, std)), as the base trainer draws them.")
    logit_normal_std: float = Field(1.0, gt=0)


class LoraPriorConfig(_Config):
    """Prior preservation by distillation (the aim of DreamBooth's prior-preservation loss,
    Ruiz et al. 2022, without generating class images): each step also noises the batch's
    latents and asks the adapted model, given a prompt *without* the trigger word, to
    predict what the frozen base model predicts for the same input:

        loss = flow loss (captions with the trigger) + weight * ||v_lora(x_t, t, prior) - v_base(x_t, t, prior)||^2

    so prompts without the trigger keep producing what the base model produced. Off when
    there is no trigger word (nothing then separates the concept from the rest)."""

    weight: float = Field(1.0, ge=0.0, description="Weight of the prior term; 0 disables.")
    images: int = Field(
        32,
        ge=0,
        description="Noisy inputs of the prior term come from this many latents the base model generates for the "
        "prior prompts before training (DreamBooth's class images, kept as latents), so the term covers what the "
        "base draws for such prompts. 0: noise the training images' latents instead (no generation).",
    )
    sample_steps: int = Field(20, ge=1, description="Euler steps for generating the prior latents.")
    prompts: list[str] = Field(
        default_factory=list,
        description="Prompts for the prior term (e.g. 'a photo of a dog'), drawn at random per sample. Empty: each "
        "image's caption with the trigger word removed.",
    )


class LoraHoldoutConfig(_Config):
    """Held-out images and the overfitting check.

    A few images are kept out of training; every `every_steps` steps their loss is
    measured at fixed timesteps (the midpoints of `timestep_buckets` equal buckets of
    [0, 1]) with fixed noise, so the number only moves when the weights do. The same is
    measured on a few training images (the "train probe"). Overfitting is flagged when the
    held-out loss has stayed above (1 + tolerance) x its best for `patience` evaluations in
    a row while the train probe kept falling below its value at that best step.
    """

    images: int = Field(
        2,
        ge=0,
        description="Images held out (at most one in five of the usable images; fewer with a warning). 0 disables "
        "the held-out loss and the overfitting check.",
    )
    every_steps: int = Field(50, ge=1, description="Steps between held-out evaluations (also run at step 0 and at the end).")
    timestep_buckets: int = Field(5, ge=1, description="Held-out loss is logged per equal-width timestep bucket.")
    noise_draws: int = Field(4, ge=1, description="Fixed noise draws per image and timestep.")
    probe_train_images: int = Field(4, ge=1, description="Training images in the train probe.")
    tolerance: float = Field(0.05, ge=0.0, description="Relative rise over the best held-out loss that counts as rising.")
    patience: int = Field(3, ge=1, description="Consecutive rising evaluations before overfitting is flagged.")
    on_overfit: Literal["warn", "stop"] = Field(
        "warn",
        description="warn: log it, keep training, and also save the best held-out adapter in RUN_DIR/best/; "
        "stop: stop and export the adapter of the best held-out evaluation.",
    )


class LoraPreviewConfig(_Config):
    """Preview grids rendered from the adapter as exported (saved to safetensors, loaded back
    into the base pipeline the way users load it)."""

    prompts: list[str] = Field(
        default_factory=list,
        description="Empty: the first training caption and the trigger word alone (or two captions without a trigger).",
    )
    every_steps: int = Field(250, ge=0, description="0: only the final grid.")
    steps: int = Field(30, ge=1, description="Euler steps.")
    guidance: float = Field(4.0, ge=1.0, description="Classifier-free guidance; 1 disables.")
    seed: int = 0
    images_per_prompt: int = Field(2, ge=1)


class LoraOutputConfig(_Config):
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float16", description="dtype of the saved adapter tensors.")
    comfyui: bool = Field(
        False,
        description="Also write `lora_comfyui.safetensors` with kohya/ComfyUI key names "
        "(lora_unet_<module>.lora_down/.lora_up/.alpha).",
    )


class LoraCheckpointConfig(_Config):
    every_steps: int = Field(250, ge=1)
    keep_last: int = Field(2, ge=1, description="Older checkpoints are deleted.")


class LoraTrainConfig(_Config):
    """The whole `trainer lora` config."""

    seed: int = 0
    trigger: str | None = Field(
        None, description="Word bound to the subject or style; prefixed to captions and used for previews."
    )
    mixed_precision: Literal["auto", "no", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on CUDA, fp32 on CPU. LoRA weights stay fp32."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute each transformer block in the backward pass.")
    log_every_steps: int = Field(10, ge=1, description="Training loss is read back from the device this often.")
    adapter: LoraAdapterConfig = LoraAdapterConfig()
    data: LoraDataConfig = LoraDataConfig()
    optim: LoraOptimConfig = LoraOptimConfig()
    prior: LoraPriorConfig = LoraPriorConfig()
    holdout: LoraHoldoutConfig = LoraHoldoutConfig()
    preview: LoraPreviewConfig = LoraPreviewConfig()
    output: LoraOutputConfig = LoraOutputConfig()
    checkpoint: LoraCheckpointConfig = LoraCheckpointConfig()

    @model_validator(mode="after")
    def _aligned_intervals(self) -> LoraTrainConfig:
        # A resumed run restarts its loss window at the checkpoint; logging on the same grid
        # keeps its metrics identical to an uninterrupted run's.
        if self.checkpoint.every_steps % self.log_every_steps:
            raise ValueError(
                f"checkpoint.every_steps ({self.checkpoint.every_steps}) must be a multiple of "
                f"log_every_steps ({self.log_every_steps})"
            )
        if self.trigger is not None and not self.trigger.strip():
            raise ValueError("trigger must be a word, not blank")
        return self


# ---- what the data step reports ----------------------------------------------------------------


class CaptionSource(str, enum.Enum):
    """Where an image's training caption came from."""

    TXT = "txt"  # the IMAGE_STEM.txt file beside it
    RECAPTION = "recaption"  # the recaption model
    TRIGGER = "trigger"  # nothing usable: the trigger word alone


class LoraImage(_Config):
    """One image that is used: for training, or held out to measure overfitting."""

    file: str = Field(description="File name inside the image folder.")
    sha256: str
    phash: str
    width: int = Field(description="Pixels, after EXIF rotation.")
    height: int
    bucket_width: int
    bucket_height: int
    caption: str
    caption_source: CaptionSource
    recaption_status: RecaptionStatus | None = Field(None, description="Set when the recaption model was asked.")
    generated_caption: str | None = Field(
        None, description="What the recaption model wrote, used or not (the status says which); a resumed run reuses it."
    )
    note: str | None = Field(None, description="Why the caption is not the .txt file's text, when it is not.")
    role: Literal["train", "holdout"]


class LoraSetAside(_Config):
    """An image file that is not used, and why (a curation `RejectReason` value)."""

    file: str
    reason: str
    detail: str = ""
    duplicate_of: str | None = Field(None, description="For duplicates: the file kept in its place.")


class LoraBucket(_Config):
    """One aspect-ratio bucket in use. Each epoch every training image of the bucket is seen
    once; the bucket's last batch is filled up by repeating `padding_per_epoch` of them."""

    width: int
    height: int
    train_images: int
    holdout_images: int
    padding_per_epoch: int


class LoraDataReport(_Config):
    """`RUN_DIR/data_report.json`: everything the command found in the image folder."""

    schema_version: Literal["1.0"] = LORA_SCHEMA_VERSION
    directory: str
    resolution: int
    batch_size: int
    files_found: int = Field(description="Every file in the folder, captions included.")
    images: list[LoraImage]
    set_aside: list[LoraSetAside]
    ignored: list[str] = Field(default_factory=list, description="Files not read as images (captions without an image, other text files, folders).")
    buckets: list[LoraBucket]
    warnings: list[str] = Field(default_factory=list)

    @property
    def train(self) -> list[LoraImage]:
        return [image for image in self.images if image.role == "train"]

    @property
    def holdout(self) -> list[LoraImage]:
        return [image for image in self.images if image.role == "holdout"]


# ---- what a run produced -----------------------------------------------------------------------


class LoraRunSummary(_Config):
    """`RUN_DIR/summary.json`."""

    schema_version: Literal["1.0"] = LORA_SCHEMA_VERSION
    created_at: datetime
    base: str = Field(description="The base pipeline folder the adapter was trained on.")
    base_transformer_fingerprint: str = Field(description="SHA-256 of the base denoiser's class, config and weights.")
    trigger: str | None
    rank: int
    alpha: float
    targets: list[str]
    steps_planned: int
    steps_done: int
    stopped_early: bool = Field(description="on_overfit=stop ended the run before steps_planned.")
    overfit_step: int | None = Field(None, description="Evaluation step at which overfitting was flagged.")
    best_heldout_step: int | None = None
    best_heldout_loss: float | None = None
    final_heldout_loss: float | None = None
    final_train_loss: float | None = None
    exported_step: int = Field(description="The step whose adapter weights were exported.")
    adapter_file: str
    comfyui_file: str | None = None
    best_adapter_file: str | None = Field(None, description="With on_overfit=warn and overfitting flagged: the best held-out adapter.")

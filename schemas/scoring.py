"""Configs of the model stages (scorers) and of the selection step.

Scorers only annotate: they write `clip_similarity`, `punsafe`, `pwatermark`,
`aesthetic_score` and `nsfw_score` on the record. `SelectConfig` holds every
threshold; it is the only place a score can drop a sample, so changing a
threshold never means re-running a model (`beam run select` re-applies it to a
finished output).

Every scorer is off until configured: `scoring.clip`, `scoring.safety` and
`scoring.aesthetic` default to `None`. Writing `clip: {}` turns CLIP on with
its defaults (`ViT-B-32` / `laion2b_s34b_b79k`, as LAION-5B).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Classes of the NudeNet 3.x detector (its 320n.onnx) counted as unsafe:
# exposed genitalia, breasts, buttocks and anus. Covered body parts, faces,
# feet, bellies, armpits and exposed male chests are not.
DEFAULT_UNSAFE_CLASSES = [
    "FEMALE_GENITALIA_EXPOSED",
    "MALE_GENITALIA_EXPOSED",
    "FEMALE_BREAST_EXPOSED",
    "BUTTOCKS_EXPOSED",
    "ANUS_EXPOSED",
]


class _ScoringModel(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class BatchingConfig(_ScoringModel):
    """How `RunInference` batches examples for one model (`beam.BatchElements`)."""

    min_batch_size: int = Field(1, ge=1, description="Smallest batch BatchElements forms (it adapts in between).")
    max_batch_size: int = Field(64, ge=1, description="Largest batch sent to the model in one call.")

    @model_validator(mode="after")
    def _ordered(self):
        if self.min_batch_size > self.max_batch_size:
            raise ValueError(f"min_batch_size {self.min_batch_size} > max_batch_size {self.max_batch_size}")
        return self


class EmbeddingHeadConfig(_ScoringModel):
    """A small model applied to the CLIP image embedding (no second image pass).

    The checkpoint is a chain of linear layers: a `.safetensors` file, or a
    `.pt`/`.pth` state dict loaded with `torch.load(weights_only=True)`, with
    tensors `layers.<i>.weight`/`layers.<i>.bias` applied in order of `i`
    (LAION's improved aesthetic MLP layout), or a single `weight`/`bias` pair
    (LAION's linear aesthetic heads, e.g. `sa_0_4_vit_b_32_linear.pth`).
    """

    path: str = Field(description="Local checkpoint file of the head.")
    activation: Literal["none", "relu", "gelu"] = Field(
        "none", description="Applied between linear layers (LAION's aesthetic MLP has none)."
    )
    output: Literal["identity", "sigmoid", "softmax_last"] = Field(
        description="How the last layer's output becomes the score: `identity` (a single raw value, e.g. an "
        "aesthetic rating 1..10), `sigmoid` of a single logit, or `softmax_last`: the probability of the last "
        "class of a multi-class logit vector (e.g. [safe, unsafe])."
    )
    normalize_input: bool = Field(True, description="L2-normalise the embedding first (LAION's heads expect it).")


class ClipConfig(_ScoringModel):
    """open_clip model that gives `clip_similarity` and the image embedding the heads use.

    `clip_similarity` is the cosine similarity of the L2-normalised image and
    alt-text embeddings (no logit scale), as LAION's `similarity` column;
    LAION-5B kept English pairs with >= 0.28 under ViT-B/32.
    """

    model: str = Field("ViT-B-32", description="open_clip architecture name (`open_clip.list_models()`).")
    pretrained: str = Field(
        "laion2b_s34b_b79k",
        description="open_clip pretrained tag (downloaded by the workers from the model hub) or a local checkpoint "
        "file, exactly as `open_clip.create_model_and_transforms(model, pretrained=...)` takes it.",
    )
    model_config_path: str | None = Field(
        None,
        description="Extra open_clip model config JSON (or folder of them) registered with "
        "`open_clip.add_model_config` before `model` is looked up; for architectures not shipped with open_clip.",
    )
    batching: BatchingConfig = BatchingConfig()


class NudeNetConfig(_ScoringModel):
    """NudeNet 3.x detector (YOLOv8 ONNX) run with onnxruntime: gives `nsfw_score`.

    `nsfw_score` is the highest confidence of any unsafe class over all the
    detector's candidate boxes (before NudeNet's 0.2 floor and NMS), 0..1.
    """

    model_path: str | None = Field(None, description="ONNX file; None uses the 320n.onnx shipped in the nudenet package.")
    input_size: int = Field(320, ge=32, description="Square model input side in pixels (320 for 320n.onnx).")
    unsafe_classes: list[str] = Field(default_factory=lambda: list(DEFAULT_UNSAFE_CLASSES))
    batching: BatchingConfig = BatchingConfig(max_batch_size=32)


class SafetyConfig(_ScoringModel):
    """Safety scorers: NudeNet (`nsfw_score`), and CLIP-embedding heads for
    `punsafe` (a LAION-style CLIP NSFW classifier) and `pwatermark`."""

    nudenet: NudeNetConfig | None = Field(default_factory=NudeNetConfig, description="None turns NudeNet off.")
    nsfw_head: EmbeddingHeadConfig | None = Field(None, description="Head giving `punsafe`; needs `scoring.clip`.")
    watermark_head: EmbeddingHeadConfig | None = Field(None, description="Head giving `pwatermark`; needs `scoring.clip`.")


class AestheticConfig(_ScoringModel):
    """Aesthetic predictor on the CLIP image embedding (LAION aesthetic
    predictor: a linear or MLP head, score about 1..10): gives `aesthetic_score`."""

    head: EmbeddingHeadConfig


class ModelWorkerConfig(_ScoringModel):
    """Where and how a model stage runs; shared by the scoring and recaption
    configs (and what `stages.inference` reads from either)."""

    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="`auto` uses CUDA when the worker has it; `cuda` fails on workers without it."
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Torch models' compute dtype under autocast; `auto`: bf16 on CUDA, fp32 on CPU."
    )
    accelerator: str | None = Field(
        None,
        description="Beam resource hint for the stage's model steps, e.g. `type:nvidia-l4;count:1;install-nvidia-driver` "
        "(Dataflow syntax). None: no hint.",
    )
    min_ram: str | None = Field(None, description="Beam resource hint, e.g. `16GB`. None: no hint.")
    share_model_across_processes: bool = Field(
        False,
        description="Load one copy of each model per machine and share it between SDK worker processes "
        "(Beam's multi_process_shared); saves GPU memory when a machine runs several worker processes.",
    )
    model_copies: int | None = Field(
        None, ge=1, description="With share_model_across_processes: copies per machine (default 1)."
    )
    cpu_threads: int | None = Field(
        None,
        ge=1,
        description="Threads each model uses on CPU (torch.set_num_threads, onnxruntime intra_op_num_threads). "
        "None: the libraries' default, all cores; on CPU workers running several SDK processes per machine, "
        "set cores / processes to avoid oversubscription.",
    )


class ScoringConfig(ModelWorkerConfig):
    """The model stages and where they run. All off by default."""

    clip: ClipConfig | None = Field(None, description="None: no `clip_similarity`, and no CLIP heads can run.")
    safety: SafetyConfig | None = Field(None, description="None: no `nsfw_score`, `punsafe`, `pwatermark`.")
    aesthetic: AestheticConfig | None = Field(None, description="None: no `aesthetic_score`.")


    @model_validator(mode="after")
    def _heads_need_clip(self):
        needs_clip = []
        if self.safety is not None and self.safety.nsfw_head is not None:
            needs_clip.append("safety.nsfw_head")
        if self.safety is not None and self.safety.watermark_head is not None:
            needs_clip.append("safety.watermark_head")
        if self.aesthetic is not None:
            needs_clip.append("aesthetic.head")
        if needs_clip and self.clip is None:
            raise ValueError(f"{', '.join(needs_clip)}: heads score the CLIP image embedding; configure `scoring.clip` too")
        return self

    @property
    def enabled(self) -> bool:
        return self.clip is not None or self.safety is not None


Probability = Annotated[float, Field(ge=0.0, le=1.0)]

# What `auto` thresholds become when their score is computed (issue defaults:
# LAION-5B's CLIP ViT-B/32 similarity floor, unsafe probability under 0.5).
AUTO_THRESHOLDS = {"min_clip_similarity": 0.28, "max_nsfw_score": 0.5, "max_punsafe": 0.5}


class SelectConfig(_ScoringModel):
    """Thresholds of the selection step; `None` disables a check.

    A sample is kept when every enabled check passes; a dropped sample gets one
    rejection whose reason is the first failing check in this order: unsafe
    (`max_nsfw_score`, then `max_punsafe`), watermark, CLIP similarity,
    aesthetic. Its `detail` lists every failing check. A threshold whose score
    was never computed is a configuration error, not a silent pass.
    Reference values: LAION-5B `min_clip_similarity` 0.28 (ViT-B/32);
    Stable Diffusion 2 trained on `max_punsafe` 0.1; LAION-Aesthetics uses
    `min_aesthetic_score` 5 or 6 and `max_pwatermark` 0.5.
    """

    min_clip_similarity: Annotated[float, Field(ge=-1.0, le=1.0)] | Literal["auto"] | None = Field(
        "auto",
        description="Keep clip_similarity >= this. `auto`: 0.28 (LAION-5B, ViT-B/32) when scoring.clip is configured, else off.",
    )
    max_nsfw_score: Probability | Literal["auto"] | None = Field(
        "auto", description="Keep nsfw_score <= this. `auto`: 0.5 when NudeNet is configured, else off."
    )
    max_punsafe: Probability | Literal["auto"] | None = Field(
        "auto", description="Keep punsafe <= this. `auto`: 0.5 when the CLIP NSFW head is configured, else off."
    )
    max_pwatermark: float | None = Field(None, ge=0.0, le=1.0, description="Keep pwatermark <= this.")
    min_aesthetic_score: float | None = Field(None, description="Keep aesthetic_score >= this.")
    keep_unselected: bool = Field(
        False,
        description="Also write the samples selection drops (bytes and scores) to `DIR/unselected/shards/`, so that "
        "`beam run select` can later loosen thresholds. Off: select can only tighten them.",
    )

    def thresholds(self) -> dict[str, float]:
        """The enabled thresholds, by config field name."""
        names = ["min_clip_similarity", "max_nsfw_score", "max_punsafe", "max_pwatermark", "min_aesthetic_score"]
        return {name: value for name in names if isinstance(value := getattr(self, name), (int, float))}

    def resolve_auto(self, scoring: ScoringConfig) -> SelectConfig:
        """Replace `auto` thresholds by their defaults where the score is computed, else turn them off."""
        safety = scoring.safety
        computed = {
            "min_clip_similarity": scoring.clip is not None,
            "max_nsfw_score": safety is not None and safety.nudenet is not None,
            "max_punsafe": safety is not None and safety.nsfw_head is not None,
        }
        updates = {
            name: (AUTO_THRESHOLDS[name] if computed[name] else None)
            for name in AUTO_THRESHOLDS
            if getattr(self, name) == "auto"
        }
        return self.model_copy(update=updates) if updates else self


class RecaptionConfig(ModelWorkerConfig):
    """Recaptioning of the selected samples with a LLaVA-style vision-language
    model (`stages/recaption.py`), loaded with `AutoProcessor` and
    `AutoModelForImageTextToText`; greedy decoding.

    Off until configured (`recaption: None` in the run config): captions stay the
    alt text. The quality gate keeps the alt text as the caption and records why
    in `SampleRecord.recaption_status` when the generated caption is empty,
    echoes the prompt, is shorter than `min_words`, loops, or was cut off by
    `max_new_tokens`; each check has a value that disables it.
    """

    model: str = Field(
        min_length=1,
        description="Checkpoint directory written by save_pretrained (config.json, *.safetensors weights, and the "
        "processor: image processor + tokenizer) or a Hugging Face Hub id such as `llava-hf/llava-1.5-7b-hf`. "
        "Every worker must be able to read it.",
    )
    prompt: str = Field("Describe this image in one sentence.", min_length=1, description="The instruction.")
    use_chat_template: bool = Field(True, description="Format the prompt with the processor's chat template if it has one.")
    prompt_template: str = Field(
        "USER: <image>\n{prompt} ASSISTANT:",
        description="Used when there is no chat template (or use_chat_template is false): `{prompt}` is replaced by "
        "`prompt`; it must contain the model's image token. The default is LLaVA-1.5's format.",
    )
    max_new_tokens: int = Field(64, ge=1, le=2048, description="Generation budget per caption, in tokens.")
    batching: BatchingConfig = BatchingConfig(max_batch_size=8)
    min_ram: str | None = Field("16GB", description="Beam resource hint for the recaption steps. None: no hint.")
    min_words: int = Field(3, ge=0, description="Captions with fewer words fall back as `too_short`; 0 disables.")
    max_repeats: int = Field(
        3,
        ge=0,
        description="A word n-gram (n <= 8) or a run of 3+ characters repeated this many times back to back falls "
        "back as `looping`; 0 disables (1 is not allowed).",
    )
    max_prompt_overlap: float | None = Field(
        0.8,
        gt=0.0,
        le=1.0,
        description="Falls back as `prompt_echo` when the caption contains the prompt or at least this fraction of "
        "its words are prompt words. None disables the check.",
    )
    reject_truncated: bool = Field(
        True, description="Fall back as `truncated` when generation hit max_new_tokens before end-of-sequence."
    )

    @model_validator(mode="after")
    def _check(self):
        if "{prompt}" not in self.prompt_template:
            raise ValueError(f"prompt_template {self.prompt_template!r} lacks the `{{prompt}}` placeholder")
        if self.max_repeats == 1:
            raise ValueError("max_repeats must be 0 (off) or >= 2: one occurrence is not a repeat")
        return self

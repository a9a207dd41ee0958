"""`trainer lora`: teach a trained base model one subject or style from 15-200 images.

    trainer lora --images DIR --base MODEL --output RUN_DIR [--trigger WORD] [--rank R --steps N --lr LR ...]

MODEL is a diffusers-format pipeline folder as `trainer fit` exports it (`RUN_DIR/export`,
or the run folder itself). The command:

1. reads DIR with `trainer.lora_data.prepare_dataset` (the curation stages' decode and
   dedup checks, captions, aspect-ratio buckets, held-out split) and prints what it found
   before any training; the full report goes to `RUN_DIR/data_report.json`;
2. encodes every image once with the base pipeline's VAE (at its bucket size) and every
   caption with its text encoder (`trainer.pipeline.encode_prompt`, what sampling uses);
3. injects peft LoRA layers (rank, alpha, dropout) into the denoiser's attention
   projections `to_q`, `to_k`, `to_v`, `to_out` (optionally the MLP's `fc1`, `fc2`) and
   trains only them, in fp32 under bf16 autocast on CUDA, on the base trainer's
   rectified-flow loss (`trainer.train.training_loss`) plus a prior-preservation term:
   for prompts without the trigger word the adapted model is pulled towards what a frozen
   copy of the base predicts (`prior_loss`, `LoraPriorConfig`), so they keep drawing
   what the base drew;
4. every `holdout.every_steps` measures the held-out loss by timestep bucket and a train
   probe at fixed timesteps and noise (`HeldOutLoss`) and flags overfitting, held-out
   loss rising while training loss falls (`OverfitMonitor`): warn, or stop and export
   the best step;
5. every `preview.every_steps` saves the adapter exactly as it is exported, loads it into
   the frozen base pipeline with `load_lora` (what `trainer sample --lora` does) and draws
   fixed prompts and seeds (`Previews`), so a preview is what users will get;
6. checkpoints with the base trainer's `save_checkpoint` (safetensors, atomic, RNG and
   generator states, data position = batches consumed), so `--resume` continues exactly;
7. exports `RUN_DIR/pytorch_lora_weights.safetensors` in diffusers' LoRA format (keys
   `transformer.<module>.lora_A/B.weight`, the peft `LoraConfig` in the safetensors
   metadata, written by `save_lora_weights`), optionally `lora_comfyui.safetensors` with
   kohya/ComfyUI key names, and `summary.json`, `curve.png`, `README.md`.

Loading: `pipe.load_lora_weights(RUN_DIR)` on the exported pipeline (its class mixes in
`lora_loader_mixin()`, the denoiser `PeftAdapterMixin`). `load_lora` takes that route when
the pipeline has it and otherwise does the same steps with diffusers' and peft's
functions on `pipe.transformer` (pipelines exported before the mixins were added).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import math
import os
import shutil
import signal
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from schemas.lora import LoraAdapterConfig, LoraDataReport, LoraHoldoutConfig, LoraPreviewConfig, LoraRunSummary, LoraTrainConfig
from schemas.scoring import RecaptionConfig
from schemas.trainer import DataPosition

if TYPE_CHECKING:
    import torch
    from PIL import Image
    from torch import nn

logger = logging.getLogger(__name__)

# torch, diffusers and peft are imported where they are used: `trainer --help` and the
# option builders below must not pay for them (diffusers' LoRA loaders alone take seconds).
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE: what load_lora_weights(DIR) picks
COMFYUI_FILE = "lora_comfyui.safetensors"
TRANSFORMER_PREFIX = "transformer."
TRAIN_ADAPTER = "default"
ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out")
MLP_TARGETS = ("fc1", "fc2")
METRICS = "metrics.jsonl"
DATA_REPORT = "data_report.json"
SUMMARY = "summary.json"
BEST = "best"


# ---- adapters: create, save, load -------------------------------------------------------------


def lora_loader_mixin():
    """The diffusers LoRA loader that writes our files and that the exported pipeline class
    mixes in. diffusers has no generic "transformer only" loader; Sana's is the plain one
    (no key conversion, `_lora_loadable_modules = ["transformer"]`)."""
    from diffusers.loaders.lora_pipeline import SanaLoraLoaderMixin

    return SanaLoraLoaderMixin


def target_modules(adapter: LoraAdapterConfig) -> list[str]:
    """Module names (peft suffix match) the adapter wraps."""
    return list(ATTENTION_TARGETS + (MLP_TARGETS if adapter.targets == "attention_mlp" else ()))


def peft_lora_config(adapter: LoraAdapterConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=adapter.rank,
        lora_alpha=adapter.lora_alpha,
        lora_dropout=adapter.dropout,
        target_modules=target_modules(adapter),
        init_lora_weights=True,  # A Kaiming-uniform, B zero: the adapter starts as a no-op
    )


def add_adapter(transformer: nn.Module, adapter: LoraAdapterConfig, adapter_name: str = TRAIN_ADAPTER) -> None:
    """Inject trainable LoRA layers into `transformer` in place; every other weight is frozen."""
    from peft import inject_adapter_in_model

    transformer.requires_grad_(False)
    inject_adapter_in_model(peft_lora_config(adapter), transformer, adapter_name=adapter_name)
    trainable = [name for name, p in transformer.named_parameters() if p.requires_grad]
    if not trainable or any(".lora_" not in name for name in trainable):
        raise RuntimeError(f"LoRA injection left unexpected trainable parameters: {trainable[:5]}")


def adapter_state_dict(transformer: nn.Module, adapter_name: str = TRAIN_ADAPTER) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's names without the adapter name
    (`blocks.0.attn1.to_q.lora_A.weight`), detached."""
    from peft import get_peft_model_state_dict

    return {k: v.detach() for k, v in get_peft_model_state_dict(transformer, adapter_name=adapter_name).items()}


def comfyui_state_dict(transformer: nn.Module, state_dict: dict[str, torch.Tensor], adapter_name: str = TRAIN_ADAPTER) -> dict[str, torch.Tensor]:
    """The same adapter with kohya/ComfyUI key names: `lora_unet_<module path, dots as
    underscores>.lora_down.weight` (A), `.lora_up.weight` (B) and `.alpha`, where ComfyUI
    applies W + strength * alpha / rank * up @ down (rank = lora_down rows). The alpha is the
    peft layer's own scaling x rank, so the scale is exact whatever the config."""
    import torch

    out: dict[str, torch.Tensor] = {}
    for key, down in state_dict.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module_path = key[: -len(".lora_A.weight")]
        up = state_dict[f"{module_path}.lora_B.weight"]
        layer = transformer.get_submodule(module_path)
        rank = down.shape[0]
        name = "lora_unet_" + module_path.replace(".", "_")
        out[f"{name}.lora_down.weight"] = down
        out[f"{name}.lora_up.weight"] = up
        out[f"{name}.alpha"] = torch.tensor(float(layer.scaling[adapter_name]) * rank, dtype=torch.float32)
    return out


def save_adapter(
    directory: str | Path,
    transformer: nn.Module,
    *,
    adapter_name: str = TRAIN_ADAPTER,
    dtype: str = "float16",
    comfyui: bool = False,
    comfyui_metadata: dict[str, str] | None = None,
) -> Path:
    """Write the adapter of `transformer` to `directory/pytorch_lora_weights.safetensors` in
    diffusers' LoRA format (with the loader mixin's `save_lora_weights`, the peft config in
    the metadata) and, with `comfyui`, `directory/lora_comfyui.safetensors`; tensors in
    `dtype` ("float32", "float16", "bfloat16"). Returns the diffusers file."""
    import torch
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.to("cpu", getattr(torch, dtype)).contiguous() for k, v in adapter_state_dict(transformer, adapter_name).items()}
    config = transformer.peft_config[adapter_name].to_dict()
    lora_loader_mixin().save_lora_weights(
        str(directory), transformer_lora_layers=state, transformer_lora_adapter_metadata=config, weight_name=LORA_FILE
    )
    if comfyui:
        comfy = {k: v.contiguous() for k, v in comfyui_state_dict(transformer, state, adapter_name).items()}
        save_file(comfy, str(directory / COMFYUI_FILE), metadata={"format": "pt", **(comfyui_metadata or {})})
    return directory / LORA_FILE


def _adapter_location(source: str | Path) -> tuple[str, str]:
    path = Path(source)
    if path.is_file():
        return str(path.parent), path.name
    if (path / LORA_FILE).is_file():
        return str(path), LORA_FILE
    raise FileNotFoundError(f"{path} is neither a LoRA .safetensors file nor a folder holding {LORA_FILE} (a `trainer lora` run)")


def load_lora(pipe, sources: str | Path | Sequence[str | Path], scales: float | Sequence[float] = 1.0, adapter_names: Sequence[str] | None = None) -> list[str]:
    """Load LoRA adapters (run folders or files in diffusers' LoRA format) into
    `pipe.transformer` and activate them with the given scales (0.8 = 80% strength).

    With a pipeline that has `load_lora_weights` (a diffusers LoRA loader mixin) this is
    exactly `pipe.load_lora_weights(...)` then `pipe.set_adapters(names, scales)`. Without
    it, the same steps with the library functions that method calls: read with the
    mixin's `lora_state_dict`, rebuild the peft `LoraConfig` from the file's metadata,
    `inject_adapter_in_model` + `set_peft_model_state_dict`, `set_weights_and_activate_adapters`.
    Returns the adapter names."""
    sources = [sources] if isinstance(sources, (str, Path)) else list(sources)
    scales = [float(scales)] * len(sources) if isinstance(scales, (int, float)) else [float(s) for s in scales]
    if len(scales) != len(sources):
        raise ValueError(f"{len(sources)} adapters but {len(scales)} scales")
    names = list(adapter_names) if adapter_names else [f"lora{i}" for i in range(len(sources))]
    with warnings.catch_warnings():
        # peft warns whenever a model already has an adapter; stacking them is what was asked for.
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        for source, name in zip(sources, names):
            folder, weight_name = _adapter_location(source)
            if callable(getattr(pipe, "load_lora_weights", None)):
                pipe.load_lora_weights(folder, weight_name=weight_name, adapter_name=name)
            else:
                _inject_from_file(pipe.transformer, folder, weight_name, name)
    if callable(getattr(pipe, "set_adapters", None)):
        pipe.set_adapters(names, adapter_weights=scales)
    else:
        from diffusers.utils.peft_utils import set_weights_and_activate_adapters

        set_weights_and_activate_adapters(pipe.transformer, names, scales)
    return names


def _inject_from_file(transformer: nn.Module, folder: str, weight_name: str, adapter_name: str) -> None:
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    state, metadata = lora_loader_mixin().lora_state_dict(folder, weight_name=weight_name, return_lora_metadata=True)
    state = {k[len(TRANSFORMER_PREFIX) :]: v for k, v in state.items() if k.startswith(TRANSFORMER_PREFIX)}
    if not state:
        raise ValueError(f"{folder}/{weight_name} holds no `transformer.` LoRA weights")
    if not metadata:
        raise ValueError(f"{folder}/{weight_name} has no LoRA config in its metadata; it was not written by `trainer lora`")
    config = {k[len(TRANSFORMER_PREFIX) :]: v for k, v in metadata.items() if k.startswith(TRANSFORMER_PREFIX)}
    if adapter_name in getattr(transformer, "peft_config", {}):
        raise ValueError(f"adapter name {adapter_name!r} is already loaded")
    inject_adapter_in_model(LoraConfig(**config), transformer, adapter_name=adapter_name)
    result = set_peft_model_state_dict(transformer, state, adapter_name)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if ".lora_" in k]
    if unexpected:
        raise ValueError(f"{folder}/{weight_name}: {len(unexpected)} weights match no module of this model (first: {unexpected[0]})")


def unload_lora(pipe, adapter_names: str | Sequence[str]) -> None:
    """Remove adapters loaded by `load_lora` (the base weights were never changed)."""
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    if callable(getattr(pipe, "delete_adapters", None)):
        pipe.delete_adapters(names)
        return
    from diffusers.utils.peft_utils import delete_adapter_layers

    transformer = pipe.transformer
    for name in names:
        delete_adapter_layers(transformer, name)
        getattr(transformer, "peft_config", {}).pop(name, None)
    if hasattr(transformer, "peft_config") and not transformer.peft_config:
        del transformer.peft_config


def sample_with_lora(
    base: str | Path,
    loras: str | Path | Sequence[str | Path],
    prompts: list[str],
    *,
    scales: float | Sequence[float] = 1.0,
    images_per_prompt: int = 4,
    steps: int = 30,
    guidance: float = 4.0,
    seed: int = 0,
    device: str = "cpu",
) -> Image.Image:
    """`trainer sample --run BASE --lora RUN_DIR --lora-scale S`: load the exported base
    pipeline, load the adapters with `load_lora`, draw `sample_grid`."""
    from trainer.export import export_dir, load_exported_pipeline, sample_grid

    pipe = load_exported_pipeline(export_dir(base), device=device)
    load_lora(pipe, loras, scales)
    return sample_grid(pipe, prompts, images_per_prompt=images_per_prompt, steps=steps, guidance=guidance, seed=seed)


# ---- training pieces --------------------------------------------------------------------------


def enable_gradient_checkpointing(transformer: nn.Module) -> None:
    """Recompute each transformer block in the backward pass (activation memory ~ one block).

    Uses the model's diffusers `enable_gradient_checkpointing` when it declares support;
    otherwise wraps each block's forward in `torch.utils.checkpoint` (non-reentrant) on
    the instance, which leaves module names, and so LoRA keys, unchanged."""
    if getattr(transformer, "_supports_gradient_checkpointing", False):
        transformer.enable_gradient_checkpointing()
        return
    blocks = getattr(transformer, "blocks", None)
    if not blocks:
        raise ValueError(f"{type(transformer).__name__} has no `blocks` to checkpoint")
    for block in blocks:
        block.forward = functools.partial(_checkpointed, block.forward)


def _checkpointed(forward, *args, **kwargs):
    import torch

    if torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def adapter_weights(model: nn.Module) -> nn.Module:
    """A module holding the trainable LoRA tensors of a peft-injected model (the same
    Parameter objects, names with dots as colons), so the base trainer's checkpoint code
    saves and restores just these."""
    import torch

    holder = torch.nn.Module()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            holder.register_parameter(name.replace(".", ":"), parameter)
    return holder


def copy_weights(target: nn.Module, source: nn.Module) -> None:
    """Copy every parameter of `source` into `target` (same names, same order)."""
    import torch

    with torch.no_grad():
        for mine, theirs in zip(target.parameters(), source.parameters(), strict=True):
            mine.copy_(theirs)


class OverfitMonitor:
    """The overfitting trap: held-out loss rising while training loss falls.

    `update` takes each evaluation in step order. The best held-out loss and the train
    probe at that step are remembered; an evaluation "rises" when its held-out loss is
    above best x (1 + tolerance) while the train probe is below its value at the best step.
    `patience` rising evaluations in a row flag overfitting (`flagged_step`).
    """

    def __init__(self, tolerance: float, patience: int):
        self.tolerance = tolerance
        self.patience = patience
        self.best_step: int | None = None
        self.best_loss = math.inf
        self.probe_at_best = math.inf
        self.rising = 0
        self.flagged_step: int | None = None

    def update(self, step: int, heldout: float, probe: float) -> bool:
        """Record one evaluation; True when it is the new best held-out loss."""
        if heldout < self.best_loss:
            self.best_step, self.best_loss, self.probe_at_best = step, heldout, probe
            self.rising = 0
            return True
        if heldout > self.best_loss * (1 + self.tolerance) and probe < self.probe_at_best:
            self.rising += 1
        else:
            self.rising = 0
        if self.rising >= self.patience and self.flagged_step is None:
            self.flagged_step = step
        return False


@dataclass
class PriorSet:
    """Inputs of the prior-preservation term.

    latents (K, C, h, w) generated by the base model for `prompt_rows`, or None to use the
    training batch's latents; text (P, L, D) and pooled (P, P') embed the prior prompts;
    prompt_rows (K,) or, without generated latents, (N,) the prompt of each training image
    (None: draw a prompt at random)."""

    latents: torch.Tensor | None
    text: torch.Tensor
    pooled: torch.Tensor
    prompt_rows: torch.Tensor | None

    def batch(self, images: list[int], batch_latents: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Latents (B', C, h, w), text and pooled embeddings for one step's prior term."""
        import torch

        size = len(images)
        device = self.text.device
        if self.latents is not None:
            rows = torch.randint(self.latents.shape[0], (size,), generator=generator, device=device)
            return self.latents[rows], self.text[self.prompt_rows[rows]], self.pooled[self.prompt_rows[rows]]
        if self.prompt_rows is not None:
            prompts = self.prompt_rows[torch.tensor(images, device=device)]
        else:
            prompts = torch.randint(self.text.shape[0], (size,), generator=generator, device=device)
        return batch_latents, self.text[prompts], self.pooled[prompts]


def make_prior_set(config: LoraTrainConfig, report: LoraDataReport, base_pipe, components, device: torch.device) -> PriorSet | None:
    """Embed the prior prompts and, with `prior.images`, generate the base model's latents
    for them (seeded, so a resumed run regenerates the same ones). None when off."""
    import torch

    from trainer.lora_data import without_word
    from trainer.pipeline import encode_prompt

    p = config.prior
    if p.weight == 0:
        return None
    if not config.trigger:
        logger.info("prior preservation is off: it needs a trigger word to leave out of the prompts")
        return None
    if p.prompts:
        prompts, image_rows = list(p.prompts), None
    else:
        stripped = [without_word(image.caption, config.trigger) for image in report.images]
        prompts = list(dict.fromkeys(stripped))
        image_rows = torch.tensor([prompts.index(c) for c in stripped], device=device)
    with torch.no_grad():
        text, pooled = encode_prompt(base_pipe.tokenizer, base_pipe.text_encoder, prompts, components.max_text_length)
    text, pooled = text.float().to(device), pooled.float().to(device)
    if p.images == 0:
        return PriorSet(None, text, pooled, image_rows)
    rows = torch.arange(p.images) % len(prompts)
    generator = torch.Generator("cpu").manual_seed(config.seed + 31_337)
    chunks = []
    for start in range(0, p.images, 16):
        chunk = rows[start : start + 16]
        out = base_pipe(
            [prompts[i] for i in chunk.tolist()], num_inference_steps=p.sample_steps, guidance_scale=config.preview.guidance,
            generator=generator, output_type="latent",
        ).images  # (b, C, h, w) in the VAE's latent space
        chunks.append((out.float() - components.shift_factor) * components.scaling_factor)  # scaled, as training latents are
    logger.info("prior preservation: %d base-model latents for %d prompt(s) without %r", p.images, len(prompts), config.trigger)
    return PriorSet(torch.cat(chunks).to(device), text, pooled, rows.to(device))


def prior_loss(student, teacher, flow, latents: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor, generator: torch.Generator, accelerator) -> torch.Tensor:
    """Prior preservation by distillation: MSE between the adapted model's and the frozen
    base model's velocity for the same noisy latents (fresh t and noise from `generator`)
    and prompts without the trigger word. latents (B, C, h, w); text (B, L, D); pooled (B, P)."""
    import torch

    t = flow.sample_timesteps(latents.shape[0], generator, latents.device)  # (B,)
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    x_t = flow.interpolate(latents, noise, t)  # (B, C, h, w)
    with torch.no_grad(), accelerator.autocast():
        target = teacher(x_t, t, text, pooled).float()
    return (student(x_t, t, text, pooled).float() - target).pow(2).mean()


class HeldOutLoss:
    """The held-out loss, by timestep bucket, and the same measure on a few training images
    (the train probe), at fixed timesteps (bucket midpoints) with fixed noise, so the numbers
    move only when the weights do.

    Args:
        latents, text, pooled: every image's latent (C, h, w), caption tokens (L, D) and pooled (P).
        holdout, train: indices of held-out and training images.
    """

    def __init__(self, latents: list[torch.Tensor], text: torch.Tensor, pooled: torch.Tensor, holdout: list[int], train: list[int], config: LoraHoldoutConfig, seed: int):
        import torch

        self.buckets = config.timestep_buckets
        self.draws = config.noise_draws
        pick = torch.Generator("cpu").manual_seed(seed)
        probe_train = [train[j] for j in torch.randperm(len(train), generator=pick)[: config.probe_train_images].tolist()]
        self.heldout = [self._inputs(latents[i], text[i], pooled[i], seed + 7919 * (n + 1)) for n, i in enumerate(holdout)]
        self.train_probe = [self._inputs(latents[i], text[i], pooled[i], seed + 104729 * (n + 1)) for n, i in enumerate(probe_train)]

    @property
    def enabled(self) -> bool:
        return bool(self.heldout)

    def _inputs(self, latent, text, pooled, seed):
        import torch

        generator = torch.Generator("cpu").manual_seed(seed)
        t = ((torch.arange(self.buckets, dtype=torch.float32) + 0.5) / self.buckets).repeat_interleave(self.draws)  # (K,)
        k = t.shape[0]
        noise = torch.randn((k, *latent.shape), generator=generator).to(latent.device)  # (K, C, h, w)
        x0 = latent[None].expand(k, -1, -1, -1)  # (K, C, h, w)
        return x0, noise, t.to(latent.device), text[None].expand(k, -1, -1), pooled[None].expand(k, -1)

    def _losses(self, model, inputs) -> torch.Tensor:
        import torch

        from trainer.flow import RectifiedFlow

        per_bucket = torch.zeros(self.buckets)
        for x0, noise, t, text, pooled in inputs:
            x_t = RectifiedFlow.interpolate(x0, noise, t)  # (K, C, h, w)
            with torch.no_grad():
                prediction = model(x_t, t, text, pooled).float()
            per_sample = (prediction - RectifiedFlow.velocity(x0, noise).float()).pow(2).mean(dim=(1, 2, 3))  # (K,)
            per_bucket += per_sample.cpu().view(self.buckets, self.draws).mean(1)
        return per_bucket / len(inputs)

    def measure(self, model) -> dict[str, float]:
        """{"heldout_loss", "train_probe_loss", "heldout_t0.0-0.2", ...} for `model` (call in eval mode)."""
        heldout = self._losses(model, self.heldout)
        record = {"heldout_loss": float(heldout.mean()), "train_probe_loss": float(self._losses(model, self.train_probe).mean())}
        for i, value in enumerate(heldout.tolist()):
            record[f"heldout_t{i / self.buckets:.1f}-{(i + 1) / self.buckets:.1f}"] = value
        return record


class Previews:
    """Preview grids drawn from the adapter as exported: the weights are written with
    `save_adapter` (the export's dtype and format), loaded into a frozen copy of the base
    pipeline with `load_lora` (what `trainer sample --lora` does), drawn, and unloaded."""

    def __init__(self, pipe, prompts: list[str], config: LoraPreviewConfig, directory: Path, dtype: str):
        self.pipe = pipe
        self.prompts = prompts
        self.config = config
        self.directory = directory
        self.dtype = dtype

    def draw_adapter(self, step: int, adapter: str | Path) -> Path:
        from trainer.export import sample_grid

        c = self.config
        names = load_lora(self.pipe, adapter, 1.0, adapter_names=[f"preview_{step}"])
        try:
            image = sample_grid(self.pipe, self.prompts, images_per_prompt=c.images_per_prompt, steps=c.steps, guidance=c.guidance, seed=c.seed)
        finally:
            unload_lora(self.pipe, names)
        out = self.directory / f"step-{step:06d}.png"
        image.save(out)
        return out

    def draw(self, step: int, transformer: nn.Module) -> Path:
        scratch = self.directory / ".adapter"
        shutil.rmtree(scratch, ignore_errors=True)
        save_adapter(scratch, transformer, dtype=self.dtype)
        try:
            return self.draw_adapter(step, scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def _read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_metrics(path: Path, last_step: int) -> None:
    # A killed run may have logged past its last checkpoint; the resumed run redoes those steps.
    kept = [r for r in _read_metrics(path) if r["step"] <= last_step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def components_of(pipe):
    """The base trainer's `Components` around a loaded pipeline's VAE, text encoder and
    tokenizer, so images and captions are encoded exactly as `trainer cache`/`fit` encode
    them. Their identities are not fingerprinted (hashing a large text encoder's weights
    takes a while and nothing here compares them)."""
    from schemas.trainer import ComponentIdentity
    from trainer.components import Components

    def identity(model) -> ComponentIdentity:
        source = str(getattr(model.config, "_name_or_path", "") or "")
        return ComponentIdentity(source=source, class_name=type(model).__name__, fingerprint="not computed")

    components = Components(
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        max_text_length=int(pipe.tokenizer.model_max_length),
        text_dim=0,
        pooled_dim=0,
        vae_identity=identity(pipe.vae),
        text_identity=identity(pipe.text_encoder),
    )
    hidden, pooled = components.encode_text([""])
    components.text_dim, components.pooled_dim = hidden.shape[-1], pooled.shape[-1]
    return components


def default_preview_prompts(report: LoraDataReport, trigger: str | None) -> list[str]:
    captions = [image.caption for image in report.train]
    if trigger:
        return [captions[0], trigger] if captions[0] != trigger else [trigger]
    distinct = list(dict.fromkeys(captions))
    return distinct[:2]


def _check_resume_config(run_dir: Path, config: LoraTrainConfig) -> None:
    saved_path = run_dir / "config.json"
    if not saved_path.is_file():
        return
    saved = LoraTrainConfig.model_validate_json(saved_path.read_text()).model_dump(mode="json")
    given = config.model_dump(mode="json")
    differences = [key for key in given if given[key] != saved.get(key)]
    if differences:
        raise ValueError(
            f"{run_dir} was started with a different config ({', '.join(differences)} differ); "
            "an exact resume needs the same config: resume without changing options"
        )


def _check_resume_data(run_dir: Path, report: LoraDataReport) -> None:
    path = run_dir / DATA_REPORT
    if not path.is_file():
        return
    saved = LoraDataReport.model_validate_json(path.read_text())
    fields = ("file", "sha256", "role", "caption", "bucket_width", "bucket_height")
    before = [tuple(getattr(i, f) for f in fields) for i in saved.images]
    now = [tuple(getattr(i, f) for f in fields) for i in report.images]
    if before != now:
        changed = sorted({b[0] for b in before} ^ {n[0] for n in now}) or [b[0] for b, n in zip(before, now) if b != n]
        raise ValueError(
            f"the images or captions in {report.directory} changed since {run_dir} started "
            f"(first difference: {changed[:3]}); an exact resume needs the same data: start a new --output"
        )


# ---- the run ----------------------------------------------------------------------------------


def train_lora(
    images: str | Path,
    base: str | Path,
    run_dir: str | Path,
    config: LoraTrainConfig,
    *,
    resume: bool = False,
    device: str | None = None,
    recaptioner=None,
    announce: Callable[[LoraDataReport], None] | None = None,
) -> LoraRunSummary:
    """Train a LoRA adapter for the base pipeline at `base` on the images in `images`.

    Args:
        resume: continue `run_dir` from its latest checkpoint (exactly: same weights and
            metrics as an uninterrupted run); the config and data must be unchanged.
        device: torch device; default CUDA when available.
        recaptioner: captions images without a caption file (default: loaded from
            `config.data.recaption` when set; see `trainer.lora_data.load_recaptioner`).
        announce: called with the data report before training starts (the CLI prints it).

    Returns the run summary (also in `run_dir/summary.json`).
    """
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm import tqdm

    from trainer.checkpoint import latest_checkpoint, load_checkpoint, new_state, save_checkpoint
    from trainer.components import fingerprint
    from trainer.export import export_dir, load_exported_pipeline
    from trainer.flow import RectifiedFlow
    from trainer.lora_data import BatchPlan, decode_config, load_pixels, load_recaptioner, prepare_dataset
    from trainer.lora_report import write_readme
    from trainer.pipeline import encode_prompt
    from trainer.train import KILL_AT_STEP_ENV, WarmupCosine, training_loss

    run_dir = Path(run_dir)
    base_dir = export_dir(base)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = config.mixed_precision if config.mixed_precision != "auto" else ("bf16" if device.type == "cuda" else "no")
    accelerator = Accelerator(mixed_precision=precision, cpu=device.type == "cpu", project_dir=str(run_dir))
    if accelerator.num_processes > 1:
        raise ValueError("trainer lora runs as one process; start it with `trainer lora`, not `accelerate launch` on several GPUs")
    device = accelerator.device

    # ---- where we start ---------------------------------------------------------------------
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if not resume and checkpoint is None and latest_checkpoint(run_dir) is not None:
        raise FileExistsError(f"{run_dir} already has checkpoints: pass --resume to continue it, or choose a new --output")
    if resume:
        _check_resume_config(run_dir, config)
    set_seed(config.seed)  # LoRA's initial A matrices come from the global generator

    # ---- the base pipeline and the folder ------------------------------------------------------
    pipe = load_exported_pipeline(base_dir, device=device)
    pipe.set_progress_bar_config(disable=True)
    transformer = pipe.transformer
    vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    resolution = config.data.resolution or transformer.config.sample_size * vae_factor
    if recaptioner is None and config.data.recaption is not None:
        recaptioner = load_recaptioner(config.data.recaption)  # loads the model only if an image needs it
    known = None
    if resume and (run_dir / DATA_REPORT).is_file():  # captions the model already wrote are not asked for again
        saved = LoraDataReport.model_validate_json((run_dir / DATA_REPORT).read_text())
        known = {i.sha256: (i.generated_caption or "", i.recaption_status) for i in saved.images if i.recaption_status is not None}
    report = prepare_dataset(images, config, resolution=resolution, multiple=vae_factor * transformer.config.patch_size, recaptioner=recaptioner, known_captions=known)
    recaptioner = None  # frees the captioning model before training
    if resume:
        _check_resume_data(run_dir, report)
    if announce:
        announce(report)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(config.model_dump_json(indent=2))
    (run_dir / DATA_REPORT).write_text(report.model_dump_json(indent=2))
    (run_dir / "samples").mkdir(exist_ok=True)

    # Every image and caption is encoded once (a LoRA folder is small): latents at the
    # image's bucket size, caption features as the pipeline computes them when sampling.
    components = components_of(pipe)
    checks = decode_config(config, resolution)
    latents = [components.encode_images(torch.from_numpy(load_pixels(images, image, checks)).permute(2, 0, 1)[None].to(device))[0] for image in report.images]  # N x (C, h, w)
    with torch.no_grad():
        text, pooled = encode_prompt(pipe.tokenizer, pipe.text_encoder, [i.caption for i in report.images], components.max_text_length)
        null_text, null_pooled = encode_prompt(pipe.tokenizer, pipe.text_encoder, [""], components.max_text_length)
    text, pooled = text.float().to(device), pooled.float().to(device)  # (N, L, D), (N, P)
    null_text, null_pooled = null_text.float().to(device), null_pooled.float().to(device)  # (1, L, D), (1, P)
    train_idx = [i for i, image in enumerate(report.images) if image.role == "train"]
    holdout_idx = [i for i, image in enumerate(report.images) if image.role == "holdout"]
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for i in train_idx:
        by_bucket.setdefault((report.images[i].bucket_width, report.images[i].bucket_height), []).append(i)
    plan = BatchPlan(by_bucket, config.optim.batch_size, config.seed)
    heldout = HeldOutLoss(latents, text, pooled, holdout_idx, train_idx, config.holdout, config.seed)

    # ---- a frozen copy of the base (previews, prior targets), then the adapter ---------------
    base_fingerprint = fingerprint(transformer, dict(transformer.config))
    frozen = type(pipe)(
        transformer=copy.deepcopy(transformer).requires_grad_(False).eval(),
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, scheduler=copy.deepcopy(pipe.scheduler),
    )
    frozen.set_progress_bar_config(disable=True)
    prior = make_prior_set(config, report, frozen, components, device)
    previews = Previews(frozen, config.preview.prompts or default_preview_prompts(report, config.trigger), config.preview, run_dir / "samples", config.output.dtype)
    add_adapter(transformer, config.adapter)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(transformer)
    weights = adapter_weights(transformer)
    best = copy.deepcopy(weights).requires_grad_(False)  # the best held-out adapter; checkpointed in the EMA slot
    o, h = config.optim, config.holdout
    optimizer = torch.optim.AdamW(weights.parameters(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(o.warmup_steps, o.steps, 1.0 if o.schedule == "constant" else 0.0))
    generator = torch.Generator(device).manual_seed(config.seed * 1_000_003)  # noise, t, caption dropout, prior rows
    flow = RectifiedFlow(o.logit_normal_mean, o.logit_normal_std)
    monitor = OverfitMonitor(h.tolerance, h.patience)
    metrics_path = run_dir / METRICS
    step = 0
    if checkpoint:
        resumed = load_checkpoint(checkpoint, accelerator=accelerator, model=weights, ema_model=best, optimizer=optimizer, generator=generator)
        scheduler.load_state_dict(resumed.scheduler)
        step = resumed.step
        _truncate_metrics(metrics_path, step)
        for record in _read_metrics(metrics_path):  # the monitor is a function of the evaluations so far
            if record["kind"] == "eval":
                monitor.update(record["step"], record["heldout_loss"], record["train_probe_loss"])
        logger.info("resumed from %s at step %d", checkpoint, step)
    elif metrics_path.exists():
        metrics_path.unlink()
    position = DataPosition(micro_batches=step, world_size=1, num_workers=0, batch_size=o.batch_size, files=len(train_idx))
    transformer, optimizer = accelerator.prepare(transformer, optimizer)

    def log(record: dict) -> None:
        with metrics_path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def evaluate(at_step: int) -> None:
        if not heldout.enabled:
            return
        transformer.eval()
        with accelerator.autocast():
            record = {"step": at_step, "kind": "eval", **heldout.measure(transformer)}
        transformer.train()
        log(record)
        if monitor.update(at_step, record["heldout_loss"], record["train_probe_loss"]):
            copy_weights(best, weights)
        if monitor.flagged_step == at_step:
            logger.warning(
                "overfitting at step %d: held-out loss %.4f has stayed above its best %.4f (step %d) for %d evaluations "
                "while the training loss kept falling; %s",
                at_step, record["heldout_loss"], monitor.best_loss, monitor.best_step, h.patience,
                "stopping, and exporting the adapter of the best step" if h.on_overfit == "stop" else "the best adapter will also be saved in best/",
            )

    # ---- the loop -----------------------------------------------------------------------------
    logger.info(
        "LoRA rank %d (alpha %g) on %s of %s: %d trainable parameters, %d training + %d held-out images, %d steps",
        config.adapter.rank, config.adapter.lora_alpha, "+".join(target_modules(config.adapter)), base_dir,
        sum(q.numel() for q in weights.parameters()), len(train_idx), len(holdout_idx), o.steps,
    )
    if step == 0:
        evaluate(0)
    stopped_early = monitor.flagged_step is not None and h.on_overfit == "stop" and step < o.steps  # resuming a stopped run
    batches = plan.stream(start=step)
    loss_sum, prior_sum, grad_norm = (torch.zeros((), device=device) for _ in range(3))
    window = 0
    kill_at = int(os.environ.get(KILL_AT_STEP_ENV, "-1"))
    progress = tqdm(total=o.steps, initial=step, desc="lora", unit="step")
    transformer.train()
    while step < o.steps and not stopped_early:
        batch = next(batches)  # indices of same-bucket images
        batch_latents = torch.stack([latents[i] for i in batch])  # (B, C, h, w)
        out = training_loss(transformer, flow, batch_latents, text[batch], pooled[batch], null_text, null_pooled, generator, o.caption_dropout)
        loss = out.loss
        if prior is not None:
            prior_latents, prior_text, prior_pooled = prior.batch(batch, batch_latents, generator)
            term = prior_loss(transformer, frozen.transformer, flow, prior_latents, prior_text, prior_pooled, generator, accelerator)
            loss = loss + config.prior.weight * term
            prior_sum += term.detach()
        accelerator.backward(loss)
        if o.grad_clip > 0:
            grad_norm = accelerator.clip_grad_norm_(weights.parameters(), o.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        window += 1
        loss_sum += out.loss.detach()
        progress.update(1)

        if step % config.log_every_steps == 0 or step == o.steps:
            mean_loss = loss_sum.item() / window  # sync point: the window's losses come back to the host
            record = {"step": step, "kind": "train", "loss": mean_loss, "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm) if o.grad_clip > 0 else None}
            if prior is not None:
                record["prior_loss"] = prior_sum.item() / window
            log(record)
            progress.set_postfix(loss=f"{mean_loss:.4f}")
            loss_sum.zero_()
            prior_sum.zero_()
            window = 0
        if step % h.every_steps == 0 or step == o.steps:
            evaluate(step)
            stopped_early = monitor.flagged_step is not None and h.on_overfit == "stop" and step < o.steps
        if config.preview.every_steps and step % config.preview.every_steps == 0 and step < o.steps and not stopped_early:
            previews.draw(step, accelerator.unwrap_model(transformer))
        if step % config.checkpoint.every_steps == 0 or step == o.steps or stopped_early:
            state = new_state(step=step, samples_seen=step * o.batch_size, data=position.model_copy(update={"micro_batches": step}), scheduler=scheduler.state_dict(), config=config.model_dump(mode="json"))
            save_checkpoint(run_dir, accelerator=accelerator, model=weights, ema_model=best, optimizer=optimizer, generator=generator, state=state, keep_last=config.checkpoint.keep_last)
        if step == kill_at:
            logger.warning("%s=%d: killing this process (fault injection)", KILL_AT_STEP_ENV, kill_at)
            os.kill(os.getpid(), signal.SIGKILL)
    progress.close()

    # ---- export: the final adapter (or, after stop-on-overfit, the best one) ------------------
    model = accelerator.unwrap_model(transformer)
    dtype = config.output.dtype
    exported_step, best_file = step, None
    if monitor.flagged_step is not None and h.on_overfit == "stop":
        copy_weights(weights, best)
        exported_step = monitor.best_step
    elif monitor.flagged_step is not None and monitor.best_step != step:
        current = copy.deepcopy(weights).requires_grad_(False)
        copy_weights(weights, best)
        best_file = save_adapter(run_dir / BEST, model, dtype=dtype)
        copy_weights(weights, current)
    comfy_meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(config.adapter.rank), "ss_network_alpha": f"{config.adapter.lora_alpha:g}", "imagemill_trigger": config.trigger or "", "imagemill_base_fingerprint": base_fingerprint}
    adapter_file = save_adapter(run_dir, model, dtype=dtype, comfyui=config.output.comfyui, comfyui_metadata=comfy_meta)
    shutil.copyfile(previews.draw_adapter(exported_step, run_dir), run_dir / "samples" / "final.png")  # what users will get

    records = _read_metrics(metrics_path)
    evals = [r for r in records if r["kind"] == "eval"]
    trains = [r for r in records if r["kind"] == "train"]
    summary = LoraRunSummary(
        created_at=datetime.now(timezone.utc),
        base=str(base_dir),
        base_transformer_fingerprint=base_fingerprint,
        trigger=config.trigger,
        rank=config.adapter.rank,
        alpha=config.adapter.lora_alpha,
        targets=target_modules(config.adapter),
        steps_planned=o.steps,
        steps_done=step,
        stopped_early=stopped_early,
        overfit_step=monitor.flagged_step,
        best_heldout_step=monitor.best_step,
        best_heldout_loss=None if monitor.best_step is None else monitor.best_loss,
        final_heldout_loss=evals[-1]["heldout_loss"] if evals else None,
        final_train_loss=trains[-1]["loss"] if trains else None,
        exported_step=exported_step,
        adapter_file=adapter_file.name,
        comfyui_file=COMFYUI_FILE if config.output.comfyui else None,
        best_adapter_file=str(best_file.relative_to(run_dir)) if best_file else None,
    )
    (run_dir / SUMMARY).write_text(summary.model_dump_json(indent=2))
    write_readme(run_dir, config, report, summary, records)
    logger.info("adapter %s (step %d); previews in %s", adapter_file, exported_step, run_dir / "samples")
    return summary


# ---- command line ----------------------------------------------------------------------------

# flag -> (config path, type, help, choices)
_FLAGS: dict[str, tuple[str, type, str, tuple | None]] = {
    "--trigger": ("trigger", str, "word bound to the subject or style (prefixed to captions; used for previews)", None),
    "--rank": ("adapter.rank", int, "LoRA rank (default 16)", None),
    "--alpha": ("adapter.alpha", float, "LoRA alpha (default: = rank)", None),
    "--targets": ("adapter.targets", str, "layers that get LoRA (default attention)", ("attention", "attention_mlp")),
    "--steps": ("optim.steps", int, "optimizer steps (default 1000)", None),
    "--lr": ("optim.lr", float, "learning rate (default 1e-4)", None),
    "--batch-size": ("optim.batch_size", int, "images per step (default 4)", None),
    "--resolution": ("data.resolution", int, "bucket area resolution^2 (default: the base model's size)", None),
    "--prior-weight": ("prior.weight", float, "weight of prior preservation (default 1; 0 disables)", None),
    "--holdout": ("holdout.images", int, "images held out for the overfitting check (default 2; 0 disables)", None),
    "--eval-every": ("holdout.every_steps", int, "steps between held-out evaluations (default 50)", None),
    "--on-overfit": ("holdout.on_overfit", str, "what to do when held-out loss rises while training loss falls (default warn)", ("warn", "stop")),
    "--preview-every": ("preview.every_steps", int, "steps between preview grids (default 250; 0: final only)", None),
    "--checkpoint-every": ("checkpoint.every_steps", int, "steps between checkpoints (default 250)", None),
    "--mixed-precision": ("mixed_precision", str, "default auto: bf16 on CUDA, fp32 on CPU", ("auto", "no", "bf16")),
    "--seed": ("seed", int, "seed of everything random (default 0)", None),
}


def add_lora_arguments(parser: argparse.ArgumentParser) -> None:
    """The `trainer lora` options (for a subparser of the `trainer` CLI); run with `cmd_lora`."""
    parser.add_argument("--images", required=True, help="folder of 15-200 images, with optional IMAGE.txt captions")
    parser.add_argument("--base", required=True, help="base model: a diffusers pipeline folder from `trainer fit` (RUN_DIR or RUN_DIR/export)")
    parser.add_argument("--output", required=True, help="run folder for the adapter, previews, checkpoints, README")
    parser.add_argument("--config", help="YAML file with LoraTrainConfig fields (flags override it)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any config field, e.g. --set holdout.patience=5")
    for flag, (_, kind, text, choices) in _FLAGS.items():
        parser.add_argument(flag, type=kind, help=text, choices=choices)
    parser.add_argument("--preview-prompt", action="append", help="preview prompt (repeat); default: a training caption and the trigger")
    parser.add_argument("--prior-prompt", action="append", help="prompt for prior preservation, e.g. 'a photo of a dog' (repeat); default: the captions without the trigger")
    parser.add_argument("--gradient-checkpointing", action="store_true", default=None, help="recompute blocks in backward (less memory)")
    parser.add_argument("--comfyui", action="store_true", default=None, help="also write lora_comfyui.safetensors (kohya/ComfyUI keys)")
    parser.add_argument("--recaption-model", help="caption images without a .txt with this VLM (the recaption stage's model)")
    parser.add_argument("--resume", action="store_true", help="continue the run folder from its latest checkpoint")
    parser.add_argument("--device", help="torch device (default: cuda when available)")
    parser.add_argument("--dry-run", action="store_true", help="check the folder and print what would be trained on, then stop")
    parser.set_defaults(func=cmd_lora)


def _set_dotted(tree: dict, dotted: str, value) -> None:
    node = tree
    keys = dotted.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"{dotted}: {key} is not a section")
    node[keys[-1]] = value


def config_from_args(args: argparse.Namespace) -> LoraTrainConfig:
    """The config: the run's saved config.json when resuming, else the --config file or
    defaults; then --set overrides; then explicit flags."""
    import yaml

    tree: dict = {}
    saved = Path(args.output) / "config.json"
    if args.resume and saved.is_file():
        tree = json.loads(saved.read_text())
    elif args.config:
        tree = yaml.safe_load(Path(args.config).read_text()) or {}
    for override in args.set or []:
        key, sep, raw = override.partition("=")
        if not sep:
            raise ValueError(f"--set expects key.path=value, got {override!r}")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw))
    for flag, (path, _, _, _) in _FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            _set_dotted(tree, path, value)
    if args.preview_prompt:
        _set_dotted(tree, "preview.prompts", list(args.preview_prompt))
    if args.prior_prompt:
        _set_dotted(tree, "prior.prompts", list(args.prior_prompt))
    if args.gradient_checkpointing:
        tree["gradient_checkpointing"] = True
    if args.comfyui:
        _set_dotted(tree, "output.comfyui", True)
    if args.recaption_model:
        _set_dotted(tree, "data.recaption", RecaptionConfig(model=args.recaption_model).model_dump(mode="json"))
    return LoraTrainConfig.model_validate(tree)


def cmd_lora(args: argparse.Namespace) -> int:
    from trainer.lora_report import format_data_report

    config = config_from_args(args)
    if args.dry_run:
        from trainer.export import export_dir, load_exported_pipeline
        from trainer.lora_data import load_recaptioner, prepare_dataset

        pipe = load_exported_pipeline(export_dir(args.base))
        factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        recaptioner = load_recaptioner(config.data.recaption) if config.data.recaption else None
        report = prepare_dataset(args.images, config, resolution=config.data.resolution or pipe.transformer.config.sample_size * factor, multiple=factor * pipe.transformer.config.patch_size, recaptioner=recaptioner)
        print(format_data_report(report))
        return 0
    summary = train_lora(
        args.images, args.base, args.output, config, resume=args.resume, device=args.device,
        announce=lambda report: print(format_data_report(report), flush=True),
    )
    run = Path(args.output)
    print(f"adapter: {run / summary.adapter_file} (step {summary.exported_step} of {summary.steps_planned})")
    if summary.comfyui_file:
        print(f"ComfyUI adapter: {run / summary.comfyui_file}")
    if summary.overfit_step is not None:
        print(f"overfitting flagged at step {summary.overfit_step} (best held-out loss at step {summary.best_heldout_step})")
    print(f"previews: {run / 'samples'}; report: {run / 'README.md'}")
    print(f"use it: trainer sample --run {args.base} --lora {run} --lora-scale 0.8 --prompt '{config.trigger or 'your prompt'} ...' --out out.png")
    return 0


def lora_main(argv: list[str] | None = None) -> int:
    """`python -m trainer.lora ...` (the same options as `trainer lora`)."""
    parser = argparse.ArgumentParser(prog="trainer lora", description="LoRA fine-tuning of a trained base model on a folder of images.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_lora_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


def add_sample_lora_arguments(parser: argparse.ArgumentParser) -> None:
    """`trainer sample` options: --lora RUN_DIR_OR_FILE (repeatable) and --lora-scale S (one per --lora)."""
    parser.add_argument("--lora", action="append", metavar="RUN_DIR_OR_FILE", help="LoRA adapter from `trainer lora` (repeat to stack)")
    parser.add_argument("--lora-scale", action="append", type=float, metavar="S", help="adapter strength, one per --lora (default 1.0)")


def apply_sample_lora(pipe, args: argparse.Namespace) -> list[str]:
    """Load the `--lora` adapters of `trainer sample` into `pipe` (no-op without --lora)."""
    sources = args.lora or []
    if not sources:
        return []
    scales = args.lora_scale or [1.0] * len(sources)
    if len(scales) == 1 and len(sources) > 1:
        scales = scales * len(sources)
    return load_lora(pipe, sources, scales)


if __name__ == "__main__":
    sys.exit(lora_main())

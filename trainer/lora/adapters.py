"""LoRA adapters of `trainer lora`: create them on the denoiser (peft), save them in
diffusers' LoRA format (and kohya/ComfyUI key names), load and unload them into a
pipeline (`load_lora`, what `trainer sample --lora` does), and the training-side
pieces that act on the injected weights (gradient checkpointing, the trainable
tensors as one module, copying weights).

Loading: `pipe.load_lora_weights(RUN_DIR)` on the exported pipeline (its class mixes in
`lora_loader_mixin()`, the denoiser `PeftAdapterMixin`). `load_lora` takes that route when
the pipeline has it and otherwise does the same steps with diffusers' and peft's
functions on `pipe.transformer` (pipelines exported before the mixins were added).
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from schemas.lora import LoraAdapterConfig

if TYPE_CHECKING:
    import torch
    from PIL import Image
    from torch import nn

logger = logging.getLogger(__name__)

# torch, diffusers and peft are imported where they are used: `trainer --help` and the
# option builders must not pay for them (diffusers' LoRA loaders alone take seconds).

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



"""The frozen parts: VAE, text encoder and tokenizer, loaded with `from_pretrained`.

`load_components` loads them from any local path or hub id (`ComponentsConfig`), reads the
VAE's `scaling_factor`/`shift_factor` from its config, and fingerprints both models (a hash
of class, config and weights) so a latent cache can say exactly what made it.

The tiny offline components of the demo and the tests (`trainer init-components`) are
built by `trainer/testing/components.py`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os

import torch
from diffusers import AutoencoderKL

from schemas.trainer import ComponentIdentity, ComponentsConfig
from trainer.pipeline import encode_prompt, encode_tokens, tokenize, vae_scale_factor

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_threads_beside_workers(device: torch.device | str, workers: int) -> None:
    """On CPU, leave a core per data-loader worker: intra-op threads that share cores with
    the workers (or other processes) spin at every parallel region, which measured 20x
    slower than one thread on a busy 2-core machine. An explicit OMP_NUM_THREADS wins."""
    if torch.device(device).type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    threads = max(1, (os.cpu_count() or 1) - workers)
    if threads < torch.get_num_threads():
        logger.info("CPU run: %d intra-op thread(s) beside %d data-loader worker(s)", threads, workers)
        torch.set_num_threads(threads)

# Config keys that say how a model was saved or loaded, not what it computes.
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "_diffusers_version", "transformers_version", "torch_dtype", "dtype", "_commit_hash", "_use_default_values"}


def fingerprint(model: torch.nn.Module, config: dict) -> str:
    """SHA-256 over the class name, the config (minus save/load bookkeeping) and every
    parameter and buffer as float32 bytes, so the same weights hash the same whatever
    dtype they were loaded in."""
    digest = hashlib.sha256(type(model).__name__.encode())
    clean = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}
    digest.update(json.dumps(clean, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(data.shape)).encode())
        digest.update(data.numpy().tobytes())
    return digest.hexdigest()


def _text_encoder_class(source: str, subfolder: str | None, revision: str | None):
    import transformers

    config = transformers.AutoConfig.from_pretrained(source, subfolder=subfolder or "", revision=revision)
    model_type = getattr(config, "model_type", "")
    architectures = getattr(config, "architectures", None) or []
    if model_type in ("t5", "mt5", "umt5"):
        return transformers.T5EncoderModel
    if model_type in ("clip", "clip_text_model"):
        if "CLIPTextModelWithProjection" in architectures:
            return transformers.CLIPTextModelWithProjection
        return transformers.CLIPTextModel
    raise ValueError(
        f"text encoder {source!r} (subfolder {subfolder!r}) has model_type {model_type!r}; "
        "supported: CLIP text models and T5 encoders"
    )


@dataclasses.dataclass
class Components:
    """The loaded frozen models and what the trainer needs to know about them."""

    vae: AutoencoderKL
    text_encoder: torch.nn.Module
    tokenizer: object
    max_text_length: int
    text_dim: int
    pooled_dim: int
    vae_identity: ComponentIdentity
    text_identity: ComponentIdentity

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def shift_factor(self) -> float:
        return float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def vae_scale_factor(self) -> int:
        return vae_scale_factor(self.vae)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Components:
        for model in (self.vae, self.text_encoder):
            model.to(device)
            if dtype is not None and model.dtype != dtype:
                model.to(dtype=dtype)
        return self

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) images -> scaled latents (B, C, H/f, W/f) float32: the VAE
        posterior's mean, (mean - shift_factor) * scaling_factor."""
        x = pixels.to(self.vae.device, self.vae.dtype) / 127.5 - 1.0  # (B, 3, H, W) in [-1, 1]
        mean = self.vae.encode(x).latent_dist.mean.float()  # (B, C, h, w)
        return (mean - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def encode_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, pooled = encode_tokens(self.text_encoder, input_ids, attention_mask)
        return hidden.float(), pooled.float()

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, pooled = encode_prompt(self.tokenizer, self.text_encoder, prompts, self.max_text_length)
        return hidden.float(), pooled.float()

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return tokenize(self.tokenizer, prompts, self.max_text_length)


def load_components(config: ComponentsConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Components:
    """Load the VAE, text encoder and tokenizer named in `config`, frozen and in eval mode."""
    import transformers

    if not config.vae or not config.text_encoder:
        raise ValueError(
            "components.vae and components.text_encoder must name a model (path or hub id); "
            "set them in the config, or pass --components DIR_OR_HUB_ID for a pipeline-layout folder"
        )
    vae = AutoencoderKL.from_pretrained(config.vae, subfolder=config.vae_subfolder, revision=config.revision)
    encoder_cls = _text_encoder_class(config.text_encoder, config.text_encoder_subfolder, config.revision)
    text_encoder = encoder_cls.from_pretrained(
        config.text_encoder, subfolder=config.text_encoder_subfolder or "", revision=config.revision
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        config.tokenizer or config.text_encoder,
        subfolder=config.tokenizer_subfolder or ("" if config.tokenizer else config.text_encoder_subfolder or ""),
        revision=config.revision,
    )
    # The pipeline pads to tokenizer.model_max_length; make it the trained length.
    tokenizer.model_max_length = config.max_text_length
    for model in (vae, text_encoder):
        model.requires_grad_(False)
        model.eval()
    vae_identity = ComponentIdentity(
        source=config.vae,
        subfolder=config.vae_subfolder,
        class_name=type(vae).__name__,
        fingerprint=fingerprint(vae, dict(vae.config)),
    )
    text_identity = ComponentIdentity(
        source=config.text_encoder,
        subfolder=config.text_encoder_subfolder,
        class_name=type(text_encoder).__name__,
        fingerprint=fingerprint(text_encoder, text_encoder.config.to_dict()),
    )
    components = Components(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        max_text_length=config.max_text_length,
        text_dim=0,
        pooled_dim=0,
        vae_identity=vae_identity,
        text_identity=text_identity,
    )
    components.to(device, dtype)
    hidden, pooled = components.encode_text([""])
    components.text_dim, components.pooled_dim = hidden.shape[-1], pooled.shape[-1]
    logger.info(
        "components: VAE %s (x%d, %d latent channels, scaling %.5f), text encoder %s (%d tokens x %d, pooled %d)",
        config.vae, components.vae_scale_factor, components.latent_channels, components.scaling_factor,
        config.text_encoder, config.max_text_length, components.text_dim, components.pooled_dim,
    )
    return components


def components_config_for(root: str, base: ComponentsConfig | None = None) -> ComponentsConfig:
    """A `ComponentsConfig` for a pipeline-layout folder or hub repo (vae/, text_encoder/,
    tokenizer/); the other fields (max_text_length, revision) come from `base`."""
    fields = base.model_dump() if base else {}
    fields.update(
        vae=root,
        vae_subfolder="vae",
        text_encoder=root,
        text_encoder_subfolder="text_encoder",
        tokenizer=root,
        tokenizer_subfolder="tokenizer",
    )
    return ComponentsConfig(**fields)

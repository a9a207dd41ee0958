"""The frozen parts: VAE, text encoder and tokenizer, loaded with `from_pretrained`.

`load_components` loads them from any local path or hub id (`ComponentsConfig`), reads the
VAE's `scaling_factor`/`shift_factor` from its config, and fingerprints both models (a hash
of class, config and weights) so a latent cache can say exactly what made it.

`build_demo_components` is a demo and test aid only: it builds a tiny VAE and a tiny CLIP
text encoder offline (no model hub), so `make demo` and the tests run anywhere. Its text
encoder is randomly initialised and its VAE is trained for a few hundred steps on
synthetic coloured shapes, just enough that decoded samples show colours.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from schemas.trainer import ComponentIdentity, ComponentsConfig
from trainer.pipeline import encode_prompt, encode_tokens, tokenize

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
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

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


# ---- demo / test aid: tiny offline components ----------------------------------------------

_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_TOKENIZER_CORPUS = (
    "a an the on of in with and red green blue yellow purple white black orange pink brown grey gray "
    "circle square triangle shape background photo picture image of a small large big dog cat house tree "
    "sky sea city car person flower street mountain"
)


def build_tiny_tokenizer(max_length: int, vocab_size: int = 512):
    """A CLIP tokenizer with a small byte-level BPE vocabulary trained (tokenizers'
    `BpeTrainer`) on a short English word list; unseen words fall back to single bytes."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix="", unk_token="<|endoftext|>"))
    bpe.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator([_TOKENIZER_CORPUS] * 4, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    # CLIP's BPE needs every byte symbol both mid-word and word-final.
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        for token in (symbol, symbol + "</w>"):
            vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    tokenizer.model_max_length = max_length
    return tokenizer


def build_tiny_text_encoder(tokenizer, hidden_size: int = 32, layers: int = 2, heads: int = 2, seed: int = 0):
    """A randomly initialised `CLIPTextModel` (hidden 32, 2 layers by default)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=max(tokenizer.model_max_length, 8),
        projection_dim=hidden_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config).eval()


def build_tiny_vae(
    resolution: int,
    block_out_channels: tuple[int, ...] = (16, 16, 16),
    latent_channels: int = 4,
    norm_groups: int = 1,
    seed: int = 0,
) -> AutoencoderKL:
    """A small `AutoencoderKL` (x4 downsampling with three blocks), randomly initialised.

    One normalisation group: with per-channel-group GroupNorm a flat colour field is
    normalised away, and the demo images are mostly flat colour.
    """
    torch.manual_seed(seed)
    blocks = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=block_out_channels,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=norm_groups,
        sample_size=resolution,
    )


def train_tiny_vae(
    vae: AutoencoderKL,
    resolution: int,
    steps: int,
    batch_size: int = 8,
    train_resolution: int | None = None,
    lr: float = 2e-3,
    seed: int = 0,
    kl_weight: float = 1e-6,
) -> float:
    """Fit the VAE to reconstruct synthetic coloured shapes, then set `scaling_factor` to
    1 / std of the latent means at `resolution` (how Stable Diffusion chose 0.18215).

    The VAE is fully convolutional, so it trains on `train_resolution` images (default
    min(resolution, 32): cheap on CPU) and is used at `resolution`. Adam with cosine decay;
    it decodes the posterior mean while training (a plain autoencoder with a small KL
    term): the mean is also what the cache stores. Measured on one CPU thread: 800 steps at
    32 px take ~30 s and reach a held-out MSE of 0.015 at 64 px (mean error 9/255).
    Returns the reconstruction MSE (images in [-1, 1]) on held-out images at `resolution`.
    """
    from trainer.demo_data import random_images

    def as_tensor(array):
        return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (N, 3, R, R)

    train_resolution = train_resolution or min(resolution, 32)
    images = as_tensor(random_images(512, train_resolution, seed))
    held_out = as_tensor(random_images(32, resolution, seed + 1))
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    threads = torch.get_num_threads()
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # convolutions this small are fastest (and deterministic) on one thread
    vae.train()
    for step in range(steps):
        x = images[torch.randint(0, images.shape[0], (batch_size,), generator=generator)]
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.mode()).sample
        loss = torch.nn.functional.mse_loss(reconstruction, x) + kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0:
            logger.info("demo VAE step %d/%d: loss %.4f", step, steps, loss.item())
    vae.eval()
    vae.requires_grad_(False)
    with torch.no_grad():
        means = vae.encode(held_out).latent_dist.mean
        mse = torch.nn.functional.mse_loss(vae.decode(means).sample, held_out).item()
    vae.register_to_config(scaling_factor=float(1.0 / means.std()))
    torch.set_num_threads(threads)
    return mse


def build_demo_components(output: Path, resolution: int = 64, max_text_length: int = 16, vae_steps: int = 800, seed: int = 0) -> ComponentsConfig:
    """Write a tiny VAE, CLIP text encoder and tokenizer to `output/{vae,text_encoder,tokenizer}`
    with `save_pretrained` (demo and test aid; not a useful model). Returns the config that
    loads them back."""
    output = Path(output)
    tokenizer = build_tiny_tokenizer(max_text_length)
    text_encoder = build_tiny_text_encoder(tokenizer, seed=seed)
    vae = build_tiny_vae(resolution, seed=seed)
    mse = train_tiny_vae(vae, resolution, vae_steps, seed=seed) if vae_steps > 0 else float("nan")
    tokenizer.save_pretrained(output / "tokenizer")
    text_encoder.save_pretrained(output / "text_encoder")
    vae.save_pretrained(output / "vae")
    (output / "README.md").write_text(
        "Tiny demo components written by `trainer init-components` (imagemill).\n"
        "A random-initialised CLIP text encoder, a byte-level BPE tokenizer with a small vocabulary,\n"
        f"and an AutoencoderKL trained for {vae_steps} steps on synthetic shapes "
        f"(held-out reconstruction MSE {mse:.4f}, images in [-1, 1]). For demos and tests only.\n"
    )
    logger.info("demo components written to %s (VAE reconstruction MSE %.4f)", output, mse)
    return components_config_for(str(output), ComponentsConfig(max_text_length=max_text_length))

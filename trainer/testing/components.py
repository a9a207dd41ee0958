"""Tiny offline components for the demo and the tests: a VAE, a CLIP text encoder and a
tokenizer built without any model hub, so `make demo` and the tests run anywhere. The
text encoder is randomly initialised and the VAE is trained for a few hundred steps on
synthetic coloured shapes (`trainer/testing/shapes.py`), just enough that decoded
samples show colours. Not useful models.

`trainer init-components` writes them: the demo (`make demo`, `pipelines/demo.py`)
needs a VAE and text encoder and has no hub to download real ones from, so the command
stays for users who run it.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from schemas.trainer import ComponentsConfig
from trainer.components import components_config_for

logger = logging.getLogger(__name__)

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
    from trainer.testing.shapes import random_images

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

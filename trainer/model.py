"""The denoiser: a compact diffusion transformer for text-to-image latents.

Architecture: DiT (Peebles & Xie 2023, facebookresearch/DiT `models.py`) with adaLN-Zero
blocks conditioned on the timestep and the pooled caption embedding, plus a cross-attention
layer per block that reads the caption's token embeddings (PixArt-alpha, Chen et al. 2023).
Queries and keys are RMS-normalised per head (QK-norm, as in SD3 and ViT-22B), which keeps
bf16 attention logits bounded.

Why cross-attention rather than joint attention (SD3's MMDiT): the image sequence keeps its
length (256 tokens at 256 px with an 8x VAE and patch 2), so self-attention and MLP cost do
not grow with caption length, and a caption is read once per block through its own K/V
projections. Joint attention would push the 77 text tokens through every MLP as well.
No attention mask is used on the caption (as Stable Diffusion does with CLIP): padded
positions carry the encoder's padding states, and an unmasked call is what lets
`scaled_dot_product_attention` pick the flash kernel.

Attention goes through `torch.nn.functional.scaled_dot_product_attention` (flash or cuDNN
kernels on CUDA in bf16/fp16), or the `flash_attn` package's `flash_attn_func` when it is
installed and the inputs are CUDA bf16/fp16. Every attention projection is its own
`nn.Linear` named `to_q`, `to_k`, `to_v`, `to_out`, so peft's LoRA can target them
(`trainer lora`, issue 5).

This file imports only torch and diffusers: the export copies it next to the weights so that
`DiffusionPipeline.from_pretrained(..., trust_remote_code=True)` can load the model without
imagemill installed.
"""

from __future__ import annotations

import importlib
import importlib.util
import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

# Named sizes (hidden width, blocks, heads). S/B/L/XL are DiT's; "tiny" is for tests and the demo.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 64, "depth": 4, "num_heads": 4},
    "S": {"hidden_size": 384, "depth": 12, "num_heads": 6},
    "B": {"hidden_size": 768, "depth": 12, "num_heads": 12},
    "L": {"hidden_size": 1024, "depth": 24, "num_heads": 16},
    "XL": {"hidden_size": 1152, "depth": 28, "num_heads": 16},
}

ATTENTION_KERNELS = ("auto", "sdpa", "flash_attn")
MICRO_CONDITIONS = 6  # original (h, w), crop top-left (top, left), target (h, w)


def flash_attn_available() -> bool:
    """True when the `flash_attn` package (Dao et al.) is importable."""
    return importlib.util.find_spec("flash_attn") is not None


def _flash_attn_func():
    # Imported lazily so that this file has no hard dependency on flash_attn.
    return importlib.import_module("flash_attn").flash_attn_func


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x * (1 + scale) + shift, with shift/scale (B, 1, D) broadcast over tokens."""
    return x * (1 + scale) + shift


def sincos_2d(embed_dim: int, grid_h: int, grid_w: int, scale: float = 1.0) -> torch.Tensor:
    """Fixed 2D sine-cosine position embedding (MAE/DiT): (grid_h * grid_w, embed_dim), row-major.

    Half the channels encode the row, half the column; each half is [sin, cos] over
    `embed_dim / 4` frequencies 1 / 10000^(i / (embed_dim / 4)), of the token's row and
    column index times `scale` (1: DiT's integer positions; see `position_scale`).
    """
    if embed_dim % 4:
        raise ValueError(f"hidden_size must be divisible by 4 for 2D sin-cos embeddings, got {embed_dim}")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (D/4,)
    rows = torch.arange(grid_h, dtype=torch.float64)[:, None].expand(grid_h, grid_w).reshape(-1) * scale  # (N,)
    cols = torch.arange(grid_w, dtype=torch.float64)[None, :].expand(grid_h, grid_w).reshape(-1) * scale  # (N,)
    row_angles = rows[:, None] * omega[None]  # (N, D/4)
    col_angles = cols[:, None] * omega[None]  # (N, D/4)
    emb = torch.cat([row_angles.sin(), row_angles.cos(), col_angles.sin(), col_angles.cos()], dim=1)  # (N, D)
    return emb.float()


def position_scale(base_grid: int, grid_h: int, grid_w: int) -> float:
    """Interpolated positions: the spacing that makes a (grid_h, grid_w) token grid span the
    same position range, per unit of image area, as the square `base_grid` grid the model
    was built for: base_grid / sqrt(grid_h * grid_w). 1 at the base grid (DiT's integer
    positions, so square runs are unchanged); 0.5 on a grid twice as wide and high (the next
    resolution stage), so a token at the same place in the image gets the same embedding it
    had at the lower resolution (PixArt-alpha's and SD3's interpolated sin-cos tables); both
    axes share one spacing, so an aspect bucket's positions keep its aspect ratio.
    """
    return base_grid / math.sqrt(grid_h * grid_w)


def timestep_embedding(t: torch.Tensor, dim: int, scale: float = 1000.0, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of t in [0, 1] (scaled by `scale`, as DDPM's integer steps were): (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)  # (dim/2,)
    angles = (t.float() * scale)[:, None] * freqs[None]  # (B, dim/2)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)  # (B, dim)


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v/out projections and optional QK-norm.

    Self-attention when `context` is None, cross-attention otherwise (context already
    projected to `dim`).
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)
        self.norm_q = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.norm_k = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.kernel = "auto"

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        batch, n_query, _ = x.shape
        n_key = context.shape[1]
        q = self.to_q(x).view(batch, n_query, self.num_heads, self.head_dim)  # (B, N, H, Dh)
        k = self.to_k(context).view(batch, n_key, self.num_heads, self.head_dim)  # (B, M, H, Dh)
        v = self.to_v(context).view(batch, n_key, self.num_heads, self.head_dim)  # (B, M, H, Dh)
        # RMSNorm may run in fp32 under autocast; the fused kernels need q, k, v in one dtype.
        q = self.norm_q(q).to(v.dtype)
        k = self.norm_k(k).to(v.dtype)
        use_flash_attn = (
            self.kernel in ("auto", "flash_attn")
            and q.is_cuda
            and q.dtype in (torch.float16, torch.bfloat16)
            and flash_attn_available()
        )
        if use_flash_attn:
            out = _flash_attn_func()(q, k, v)  # (B, N, H, Dh)
        else:
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            ).transpose(1, 2)  # (B, N, H, Dh)
        return self.to_out(out.reshape(batch, n_query, self.num_heads * self.head_dim))  # (B, N, D)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """adaLN-Zero self-attention and MLP (DiT) with an unmodulated cross-attention between (PixArt)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qk_norm: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn1 = Attention(dim, num_heads, qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=True, eps=1e-6)
        self.attn2 = Attention(dim, num_heads, qk_norm)
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = FeedForward(dim, int(dim * mlp_ratio))
        self.adaLN = nn.Linear(dim, 6 * dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, cond_act: torch.Tensor) -> torch.Tensor:
        # x (B, N, D) image tokens; context (B, L, D) caption tokens; cond_act (B, D) = silu(t_emb + pooled_emb)
        shift1, scale1, gate1, shift3, scale3, gate3 = self.adaLN(cond_act)[:, None].chunk(6, dim=-1)  # 6 x (B, 1, D)
        x = x + gate1 * self.attn1(modulate(self.norm1(x), shift1, scale1))  # (B, N, D)
        x = x + self.attn2(self.norm2(x), context)  # (B, N, D)
        x = x + gate3 * self.mlp(modulate(self.norm3(x), shift3, scale3))  # (B, N, D)
        return x


class DiffusionTransformer(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """Predicts the rectified-flow velocity (noise - x0) for latents at time t in [0, 1].

    `PeftAdapterMixin` gives it diffusers' LoRA adapter methods (`load_lora_adapter`,
    `set_adapters`, ...), which the pipeline's `load_lora_weights` uses.

    Args:
        sample_size: latent side the position table is built for (other sizes are computed on the fly).
        in_channels: latent channels (the VAE's `latent_channels`).
        patch_size: latent pixels per token side.
        hidden_size, depth, num_heads, mlp_ratio: transformer size (see `PRESETS`).
        text_dim: width of the text encoder's token embeddings.
        pooled_dim: width of its pooled embedding.
        qk_norm: RMSNorm on queries and keys.
        timestep_scale: t is multiplied by this before the sinusoidal embedding.
        micro_conditioning: SDXL's size and crop micro-conditioning (Podell et al. 2023, sec. 2.2):
            original size (h, w), crop top-left (top, left) and target size (h, w), in pixels,
            each sinusoidally embedded (`frequency_dim` channels), concatenated, passed through
            an MLP and added to the timestep conditioning. The MLP's last layer starts at zero,
            so turning it on does not change an untrained model's output. False: no such input
            (the square, centre-cropped training of earlier runs).
        pixels_per_latent: the VAE factor, for the default conditions when a caller passes none
            (an uncropped image of the latent's size: what `trainer lora` trains on).

    Positions: fixed 2D sin-cos, interpolated to other token grids (`position_scale`).
    Gradient checkpointing: `enable_gradient_checkpointing()` (diffusers) recomputes each
    block's activations in the backward pass instead of storing them.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        in_channels: int = 4,
        patch_size: int = 2,
        hidden_size: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        text_dim: int = 768,
        pooled_dim: int = 768,
        qk_norm: bool = True,
        timestep_scale: float = 1000.0,
        frequency_dim: int = 256,
        micro_conditioning: bool = False,
        pixels_per_latent: int = 8,
    ):
        super().__init__()
        if sample_size % patch_size:
            raise ValueError(f"sample_size {sample_size} is not divisible by patch_size {patch_size}")
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.t_embedder = nn.Sequential(
            nn.Linear(frequency_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.pooled_embedder = nn.Sequential(
            nn.Linear(pooled_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.context_embedder = nn.Sequential(
            nn.Linear(text_dim, hidden_size), nn.GELU(approximate="tanh"), nn.Linear(hidden_size, hidden_size)
        )
        self.size_embedder = (
            nn.Sequential(nn.Linear(MICRO_CONDITIONS * frequency_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
            if micro_conditioning
            else None
        )
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm) for _ in range(depth))
        self.gradient_checkpointing = False  # set by ModelMixin.enable_gradient_checkpointing
        self.norm_out = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.adaLN_out = nn.Linear(hidden_size, 2 * hidden_size)
        self.proj_out = nn.Linear(hidden_size, patch_size * patch_size * in_channels)
        grid = sample_size // patch_size
        self.register_buffer("pos_embed", sincos_2d(hidden_size, grid, grid)[None], persistent=False)  # (1, N, D)
        self._init_weights()

    def _init_weights(self) -> None:
        # DiT's scheme: xavier-uniform linears, zero biases, small-normal timestep MLP, and
        # zero-initialised adaLN, cross-attention output and final projection, so every block
        # starts as the identity and the model starts by predicting 0.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        weight = self.x_embedder.weight.data
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        for layer in (self.t_embedder[0], self.t_embedder[2]):
            nn.init.normal_(layer.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN.weight)
            nn.init.zeros_(block.adaLN.bias)
            nn.init.zeros_(block.attn2.to_out.weight)
            nn.init.zeros_(block.attn2.to_out.bias)
        zeroed = [self.adaLN_out, self.proj_out] + ([self.size_embedder[2]] if self.size_embedder is not None else [])
        for layer in zeroed:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def use_attention(self, kernel: str) -> None:
        """Pick the attention kernel: `auto` (flash_attn package when usable, else SDPA), `sdpa`, `flash_attn`."""
        if kernel not in ATTENTION_KERNELS:
            raise ValueError(f"attention kernel must be one of {ATTENTION_KERNELS}, got {kernel!r}")
        if kernel == "flash_attn" and not flash_attn_available():
            raise ValueError("attention kernel `flash_attn` asked for, but the flash_attn package is not installed")
        for module in self.modules():
            if isinstance(module, Attention):
                module.kernel = kernel

    def _position_table(self, grid_h: int, grid_w: int, like: torch.Tensor) -> torch.Tensor:
        if self.pos_embed.shape[1] == grid_h * grid_w and grid_h == grid_w:
            return self.pos_embed.to(like.dtype)
        base = self.config.sample_size // self.config.patch_size
        table = sincos_2d(self.config.hidden_size, grid_h, grid_w, position_scale(base, grid_h, grid_w))
        return table[None].to(like.device, like.dtype)  # (1, N, D)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        micro_conditions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden_states (B, C, H, W) noisy latents; timestep (B,) in [0, 1] (1 = pure noise);
        encoder_hidden_states (B, L, text_dim); pooled_projections (B, pooled_dim);
        micro_conditions (B, 6) pixels: original (h, w), crop (top, left), target (h, w), for a
        model built with `micro_conditioning` (default: an uncropped image of the latent's size
        in pixels) and refused by one built without.
        Returns the predicted velocity (B, C, H, W)."""
        batch, channels, height, width = hidden_states.shape
        p = self.config.patch_size
        grid_h, grid_w = height // p, width // p
        x = self.x_embedder(hidden_states).flatten(2).transpose(1, 2)  # (B, N, D), N = grid_h * grid_w
        x = x + self._position_table(grid_h, grid_w, x)  # (B, N, D)
        t_freq = timestep_embedding(timestep, self.config.frequency_dim, self.config.timestep_scale)  # (B, 256)
        cond = self.t_embedder(t_freq.to(x.dtype)) + self.pooled_embedder(pooled_projections.to(x.dtype))  # (B, D)
        if self.size_embedder is not None:
            if micro_conditions is None:
                h, w = height * self.config.pixels_per_latent, width * self.config.pixels_per_latent
                micro_conditions = hidden_states.new_tensor([h, w, 0, 0, h, w], dtype=torch.float32).expand(batch, MICRO_CONDITIONS)
            sizes = micro_conditions.reshape(-1).float()  # (B * 6,)
            size_freq = timestep_embedding(sizes, self.config.frequency_dim, scale=1.0).view(batch, -1)  # (B, 6 * 256)
            cond = cond + self.size_embedder(size_freq.to(x.dtype))  # (B, D)
        elif micro_conditions is not None:
            raise ValueError("micro_conditions given to a model built without micro_conditioning")
        cond_act = F.silu(cond)  # (B, D), shared by every block's adaLN
        context = self.context_embedder(encoder_hidden_states.to(x.dtype))  # (B, L, D)
        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, context, cond_act)  # (B, N, D), recomputed in backward
            else:
                x = block(x, context, cond_act)  # (B, N, D)
        shift, scale = self.adaLN_out(cond_act)[:, None].chunk(2, dim=-1)  # 2 x (B, 1, D)
        x = self.proj_out(modulate(self.norm_out(x), shift, scale))  # (B, N, p * p * C)
        x = x.view(batch, grid_h, grid_w, p, p, channels)  # (B, h, w, p, p, C)
        x = x.permute(0, 5, 1, 3, 2, 4).reshape(batch, channels, grid_h * p, grid_w * p)  # (B, C, H, W)
        return x

    def forward_flops(self, height: int, width: int, text_len: int) -> int:
        """Forward FLOPs for one sample of latent size (height, width) and `text_len` caption tokens.

        Counts every matmul and convolution (2 FLOPs per multiply-add) and both attention
        matmuls (QK^T and AV), which is what `torch.utils.flop_counter` counts; elementwise
        ops, norms and softmax are left out. Training costs about 3x this (forward + backward).
        """
        c = self.config
        d, p, channels = c.hidden_size, c.patch_size, c.in_channels
        n = (height // p) * (width // p)  # image tokens
        length = text_len
        mlp_hidden = int(d * c.mlp_ratio)
        flops = 2 * n * d * channels * p * p  # patch embedding
        flops += 2 * (c.frequency_dim * d + d * d)  # timestep MLP
        flops += 2 * (c.pooled_dim * d + d * d)  # pooled caption MLP
        flops += 2 * length * (c.text_dim * d + d * d)  # caption token projection
        if c.get("micro_conditioning", False):
            flops += 2 * (MICRO_CONDITIONS * c.frequency_dim * d + d * d)  # size/crop MLP
        per_block = 2 * d * 6 * d  # adaLN
        per_block += 4 * 2 * n * d * d + 4 * n * n * d  # self-attention: q, k, v, out + QK^T and AV
        per_block += 2 * 2 * n * d * d + 2 * 2 * length * d * d + 4 * n * length * d  # cross-attention
        per_block += 2 * 2 * n * d * mlp_hidden  # MLP
        flops += c.depth * per_block
        flops += 2 * d * 2 * d + 2 * n * d * p * p * channels  # final adaLN + projection
        return flops


def build_transformer(
    preset: str,
    *,
    sample_size: int,
    in_channels: int,
    text_dim: int,
    pooled_dim: int,
    patch_size: int = 2,
    hidden_size: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    mlp_ratio: float = 4.0,
    qk_norm: bool = True,
    micro_conditioning: bool = False,
    pixels_per_latent: int = 8,
) -> DiffusionTransformer:
    """A `DiffusionTransformer` from a named preset, with optional size overrides."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; known: {sorted(PRESETS)}")
    size = dict(PRESETS[preset])
    for name, value in (("hidden_size", hidden_size), ("depth", depth), ("num_heads", num_heads)):
        if value is not None:
            size[name] = value
    return DiffusionTransformer(
        sample_size=sample_size,
        in_channels=in_channels,
        patch_size=patch_size,
        mlp_ratio=mlp_ratio,
        text_dim=text_dim,
        pooled_dim=pooled_dim,
        qk_norm=qk_norm,
        micro_conditioning=micro_conditioning,
        pixels_per_latent=pixels_per_latent,
        **size,
    )

"""The text-to-image pipeline: the one code path that draws previews, exports and `trainer sample`.

`ImagemillPipeline` is a diffusers `DiffusionPipeline` holding the denoiser
(`DiffusionTransformer`), the frozen VAE and text encoder, the tokenizer and diffusers'
`FlowMatchEulerDiscreteScheduler` (Euler steps on the rectified-flow ODE, see
`trainer/flow.py`). Training builds it in memory around the EMA weights for validation
grids; the export saves it with `save_pretrained` and copies this file (and `model.py`)
beside the weights, so

    DiffusionPipeline.from_pretrained(RUN_DIR / "export", trust_remote_code=True)

loads exactly this class and produces exactly the preview images for the same seed.

`encode_prompt` here is also what the cache and the trainer use to embed captions, so
training and sampling see the same text features. This file imports only torch, numpy
and diffusers (it must load without imagemill installed).
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import SanaLoraLoaderMixin
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor


def vae_scale_factor(vae) -> int:
    """Pixels per latent along each side: 2 ** (number of VAE blocks - 1), as diffusers
    computes it (the one place this project does)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def tokenize(tokenizer, prompts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, padded/truncated to `max_length`: 2 x (B, L) int64."""
    tokens = tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    )
    return tokens.input_ids, tokens.attention_mask


def _is_t5(text_encoder) -> bool:
    return getattr(text_encoder.config, "model_type", "") in ("t5", "mt5", "umt5")


def encode_tokens(
    text_encoder, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Caption token embeddings (B, L, D) and a pooled embedding (B, P).

    CLIP: last hidden state (unmasked, as Stable Diffusion uses it; CLIP's causal mask keeps
    real tokens blind to the padding) and the EOS-token pooled output (projected, for
    `CLIPTextModelWithProjection`). T5: last hidden state with the padding masked inside
    the encoder, and the mean over real tokens as the pooled embedding.
    """
    device = text_encoder.device
    input_ids = input_ids.to(device)
    attention_mask = attention_mask.to(device)
    if _is_t5(text_encoder):
        hidden = text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, D)
        weights = attention_mask.to(hidden.dtype)[..., None]  # (B, L, 1)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)  # (B, D)
        return hidden, pooled
    output = text_encoder(input_ids=input_ids)
    pooled = getattr(output, "text_embeds", None)
    if pooled is None:
        pooled = output.pooler_output  # (B, D)
    return output.last_hidden_state, pooled


def encode_prompt(tokenizer, text_encoder, prompts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`tokenize` then `encode_tokens`: the caption features the denoiser is trained on."""
    input_ids, attention_mask = tokenize(tokenizer, prompts, max_length)
    return encode_tokens(text_encoder, input_ids, attention_mask)


class ImagemillPipeline(DiffusionPipeline, SanaLoraLoaderMixin):
    """Text-to-image with a rectified-flow diffusion transformer and classifier-free guidance.

    `load_lora_weights(DIR)` loads a `trainer lora` adapter into the transformer: diffusers
    has no generic transformer-only LoRA loader, and Sana's is the plain one (no key
    conversion, `_lora_loadable_modules = ["transformer"]`).
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"

    def __init__(self, transformer, vae, text_encoder, tokenizer, scheduler):
        super().__init__()
        self.register_modules(
            transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler
        )
        self.vae_scale_factor = vae_scale_factor(self.vae)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @property
    def max_text_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    def _embed(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, pooled = encode_prompt(self.tokenizer, self.text_encoder, prompts, self.max_text_length)
        dtype = self.transformer.dtype
        return hidden.to(self._execution_device, dtype), pooled.to(self._execution_device, dtype)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str = "",
        num_inference_steps: int = 30,
        guidance_scale: float = 4.0,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
    ):
        """Generate images.

        Args:
            prompt: one caption or a list; each gives `num_images_per_prompt` images, in order.
            negative_prompt: the unconditional caption for guidance; "" is what training's caption
                dropout used.
            num_inference_steps: Euler steps from t = 1 (noise) to t = 0, evenly spaced in t
                (before the scheduler's `shift`).
            guidance_scale: classifier-free guidance; 1 runs the conditional model only.
            height, width: pixels; default: the denoiser's `sample_size` times the VAE factor.
            generator, latents: the initial noise (B, C, H/f, W/f); drawn from `generator` if not given.
            output_type: "pil", "np", "pt" or "latent" (the final latents, unscaled back to the VAE's space).
            original_size, crops_coords_top_left, target_size: SDXL's size and crop conditions
                ((h, w), (top, left), (h, w) in pixels), for a model trained with them; the
                defaults, (height, width), (0, 0), (height, width), ask for an uncropped image
                at the generated size. Ignored by a model trained without them.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        batch = len(prompts)
        device = self._execution_device
        dtype = self.transformer.dtype
        height = height or self.transformer.config.sample_size * self.vae_scale_factor
        width = width or self.transformer.config.sample_size * self.vae_scale_factor

        text, pooled = self._embed(prompts)  # (B, L, D), (B, P)
        guided = guidance_scale > 1.0
        if guided:
            null_text, null_pooled = self._embed([negative_prompt])  # (1, L, D), (1, P)
            text = torch.cat([text, null_text.expand_as(text)])  # (2B, L, D)
            pooled = torch.cat([pooled, null_pooled.expand_as(pooled)])  # (2B, P)

        micro = None
        if getattr(self.transformer.config, "micro_conditioning", False):
            values = [*(original_size or (height, width)), *crops_coords_top_left, *(target_size or (height, width))]
            micro = torch.tensor([values], device=device, dtype=torch.float32).expand(text.shape[0], 6)  # (B', 6)
        extra = () if micro is None else (micro,)

        shape = (batch, self.transformer.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        latents = latents.to(device, torch.float32)  # the ODE state stays in fp32

        sigmas = np.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps)
        self.scheduler.set_timesteps(sigmas=sigmas, device=device)
        train_steps = self.scheduler.config.num_train_timesteps
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([latents, latents]) if guided else latents
            sigma = (t / train_steps).expand(model_input.shape[0]).to(dtype)  # (B',) in [0, 1]
            velocity = self.transformer(model_input.to(dtype), sigma, text, pooled, *extra).float()
            if guided:
                v_cond, v_uncond = velocity.chunk(2)
                velocity = v_uncond + guidance_scale * (v_cond - v_uncond)  # = flow.guided_velocity
            latents = self.scheduler.step(velocity, t, latents).prev_sample

        scaling = self.vae.config.scaling_factor
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        latents = latents / scaling + shift
        if output_type == "latent":
            images = latents
        else:
            decoded = self.vae.decode(latents.to(self.vae.dtype)).sample
            images = self.image_processor.postprocess(decoded.float(), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

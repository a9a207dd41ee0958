"""How `trainer lora` watches a run: the held-out loss by timestep bucket and a train
probe at fixed timesteps and noise (`HeldOutLoss`), the overfitting flag (held-out
loss rising while training loss falls: `OverfitMonitor`), and preview grids drawn
from the adapter exactly as it is exported (`Previews`).
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from schemas.lora import LoraDataReport, LoraHoldoutConfig, LoraPreviewConfig
from trainer.lora.adapters import load_lora, save_adapter, unload_lora

if TYPE_CHECKING:
    import torch
    from torch import nn

logger = logging.getLogger(__name__)

# torch, diffusers and peft are imported where they are used: `trainer --help` and the
# option builders must not pay for them (diffusers' LoRA loaders alone take seconds).


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
                prediction = model(x_t, t, text, pooled)
            per_sample = RectifiedFlow.per_sample_loss(prediction, x0, noise)  # (K,): the training loss, per sample
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


def default_preview_prompts(report: LoraDataReport, trigger: str | None) -> list[str]:
    captions = [image.caption for image in report.train]
    if trigger:
        return [captions[0], trigger] if captions[0] != trigger else [trigger]
    distinct = list(dict.fromkeys(captions))
    return distinct[:2]



"""The training objective: rectified flow with logit-normal timesteps, apart from the model.

Convention (the one diffusers' `FlowMatchEulerDiscreteScheduler` and SD3 use, so the
exported pipeline samples with the stock scheduler):

    x_t = (1 - t) * x0 + t * noise,   t in [0, 1], t = 1 is pure noise
    the model predicts the velocity v = dx_t/dt = noise - x0

and sampling integrates dx/dt = v from t = 1 down to t = 0 with Euler steps
(`x_{t'} = x_t + (t' - t) * v`). Timesteps are drawn as t = sigmoid(n), n ~ N(mean, std)
("lognorm" in Esser et al. 2024, which found it best among the schedules they tried), so
the middle of the path, where the velocity is hardest to predict, gets the most samples.
Written against `model(x_t, t, text, pooled)` as in cloneofsimo/minRF's `rf.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

VelocityModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class FlowLoss:
    loss: torch.Tensor  # () mean over the batch: what is backpropagated
    per_sample: torch.Tensor  # (B,) detached, for loss-by-timestep logging
    t: torch.Tensor  # (B,) the timesteps drawn


class RectifiedFlow:
    """Rectified-flow loss with logit-normal timestep sampling.

    Args:
        logit_mean, logit_std: t = sigmoid(N(logit_mean, logit_std)); (0, 1) is SD3's default.
    """

    def __init__(self, logit_mean: float = 0.0, logit_std: float = 1.0):
        self.logit_mean = logit_mean
        self.logit_std = logit_std

    def sample_timesteps(self, batch: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """(B,) timesteps in (0, 1), drawn on `device` from `generator` (no host sync)."""
        normal = torch.randn(batch, generator=generator, device=device)
        return torch.sigmoid(normal * self.logit_std + self.logit_mean)

    @staticmethod
    def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = (1 - t) x0 + t noise, with t (B,) broadcast over (B, C, H, W)."""
        t = t.view(-1, *([1] * (x0.dim() - 1)))
        return (1 - t) * x0 + t * noise

    @staticmethod
    def velocity(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The regression target: d x_t / dt = noise - x0."""
        return noise - x0

    def loss(
        self,
        model: VelocityModel,
        x0: torch.Tensor,
        text: torch.Tensor,
        pooled: torch.Tensor,
        generator: torch.Generator,
        micro: torch.Tensor | None = None,
    ) -> FlowLoss:
        """Mean squared error between the model's velocity and noise - x0.

        x0 (B, C, H, W) clean latents (already scaled); text (B, L, D) and pooled (B, P) the
        (possibly dropped-out) caption embeddings. Noise and t come from `generator`, whose
        state the checkpoint saves, so a resumed run draws exactly what the original would.
        `micro` (B, 6): size and crop conditions, for a model that takes them (`trainer.model`).
        """
        t, noise, x_t = self.noisy(x0, generator)
        extra = () if micro is None else (micro,)
        prediction = model(x_t, t, text, pooled, *extra)  # (B, C, H, W)
        per_sample = self.per_sample_loss(prediction, x0, noise)  # (B,)
        return FlowLoss(loss=per_sample.mean(), per_sample=per_sample.detach(), t=t)

    def noisy(self, x0: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A training draw for clean latents x0 (B, C, H, W): t (B,) from the timestep
        distribution, then noise (B, C, H, W), both from `generator` in that order, and
        x_t (B, C, H, W) between them."""
        t = self.sample_timesteps(x0.shape[0], generator, x0.device)  # (B,)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)  # (B, C, H, W)
        return t, noise, self.interpolate(x0, noise, t)

    @classmethod
    def per_sample_loss(cls, prediction: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """(B,) mean squared error of a predicted velocity (B, C, H, W) against noise - x0,
        in fp32: the loss, per sample, that training minimises and evaluation reports."""
        return (prediction.float() - cls.velocity(x0, noise).float()).pow(2).mean(dim=(1, 2, 3))


def guided_velocity(v_cond: torch.Tensor, v_uncond: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022) on velocities: v_u + g (v_c - v_u); g = 1 is unguided."""
    return v_uncond + guidance * (v_cond - v_uncond)


def timestep_bucket(t: torch.Tensor, buckets: int) -> torch.Tensor:
    """Index of t's equal-width bucket in [0, 1): (B,) int64 in [0, buckets)."""
    return (t * buckets).long().clamp_(0, buckets - 1)

"""Rectified flow: timestep distribution, path, loss, and that the exported pipeline's
Euler sampler integrates the same ODE the loss trains."""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from trainer.flow import RectifiedFlow, guided_velocity, timestep_bucket


def test_logit_normal_timesteps():
    flow = RectifiedFlow(logit_mean=0.5, logit_std=0.8)
    t = flow.sample_timesteps(40_000, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert ((t > 0) & (t < 1)).all()
    logits = torch.log(t / (1 - t))
    assert abs(logits.mean().item() - 0.5) < 0.02
    assert abs(logits.std().item() - 0.8) < 0.02


def test_path_endpoints_and_velocity():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn((2, 4, 3, 3), generator=g), torch.randn((2, 4, 3, 3), generator=g)
    torch.testing.assert_close(RectifiedFlow.interpolate(x0, noise, torch.zeros(2)), x0)
    torch.testing.assert_close(RectifiedFlow.interpolate(x0, noise, torch.ones(2)), noise)
    t, h = torch.tensor([0.3, 0.6]), 1e-3
    derivative = (RectifiedFlow.interpolate(x0, noise, t + h) - RectifiedFlow.interpolate(x0, noise, t)) / h
    torch.testing.assert_close(derivative, RectifiedFlow.velocity(x0, noise), rtol=1e-3, atol=1e-3)


def point_mass_velocity(target: torch.Tensor):
    """The exact velocity field when every x0 equals `target`: v = (x_t - target) / t."""

    def velocity(x_t, t, text, pooled):
        return (x_t - target) / t.view(-1, 1, 1, 1)

    return velocity


def test_loss_is_zero_for_the_exact_velocity_and_positive_otherwise():
    flow = RectifiedFlow()
    target = torch.randn(1, 4, 3, 3).expand(5, -1, -1, -1)
    text, pooled = torch.zeros(5, 2, 8), torch.zeros(5, 8)
    exact = flow.loss(point_mass_velocity(target), target, text, pooled, torch.Generator().manual_seed(1))
    assert exact.loss.item() < 1e-8 and exact.per_sample.shape == (5,) and exact.t.shape == (5,)
    wrong = flow.loss(lambda x, t, c, p: torch.zeros_like(x), target, text, pooled, torch.Generator().manual_seed(1))
    assert wrong.loss.item() > 0.5


class PointMassTransformer(ModelMixin, ConfigMixin):
    """Stands in for the denoiser: the exact velocity towards `target` (scaled latents)."""

    @register_to_config
    def __init__(self, sample_size: int = 4, in_channels: int = 4):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the module a dtype and device
        self.target = None

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections):
        return (hidden_states - self.target) / timestep.view(-1, 1, 1, 1)


def test_pipeline_sampler_integrates_the_trained_ode(components_dir):
    from trainer.export import make_scheduler
    from trainer.pipeline import ImagemillPipeline
    from tests.trainer.conftest import tiny_config
    from trainer.components import load_components

    components = load_components(tiny_config(components_dir).components)
    transformer = PointMassTransformer(sample_size=4, in_channels=4)
    transformer.target = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    pipe = ImagemillPipeline(transformer, components.vae, components.text_encoder, components.tokenizer, make_scheduler())
    pipe.set_progress_bar_config(disable=True)
    out = pipe(["a", "b"], num_inference_steps=7, guidance_scale=2.5, generator=torch.Generator().manual_seed(0), output_type="latent").images
    # Euler is exact on straight paths: every sample lands on the target, in VAE space.
    expected = transformer.target / components.scaling_factor + components.shift_factor
    torch.testing.assert_close(out, expected.expand_as(out), rtol=1e-4, atol=1e-4)


def test_guidance_and_buckets():
    cond, uncond = torch.tensor([2.0]), torch.tensor([1.0])
    assert guided_velocity(cond, uncond, 1.0).item() == 2.0
    assert guided_velocity(cond, uncond, 3.0).item() == 4.0
    assert timestep_bucket(torch.tensor([0.0, 0.099, 0.1, 0.55, 0.999, 1.0]), 10).tolist() == [0, 0, 1, 5, 9, 9]

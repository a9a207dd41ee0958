"""The denoiser: shapes, initialisation, FLOP count, attention, LoRA targets, save/load."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from trainer.model import PRESETS, Attention, DiffusionTransformer, build_transformer


def tiny(**overrides) -> DiffusionTransformer:
    kwargs = dict(sample_size=8, in_channels=4, text_dim=24, pooled_dim=16, hidden_size=32, depth=2, num_heads=2)
    kwargs.update(overrides)
    preset = kwargs.pop("preset", "tiny")
    return build_transformer(preset, **kwargs)


def randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Give the zero-initialised layers weights too, so every path contributes."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)


def inputs(batch=2, size=(8, 8), text_len=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn((batch, 4, *size), generator=g),
        torch.rand(batch, generator=g),
        torch.randn((batch, text_len, 24), generator=g),
        torch.randn((batch, 16), generator=g),
    )


def test_starts_as_zero_velocity_and_keeps_shape():
    model = tiny()
    x, t, text, pooled = inputs()
    # adaLN-Zero and a zero final projection: the untrained model predicts exactly 0.
    assert torch.count_nonzero(model(x, t, text, pooled)) == 0
    randomise(model)
    out = model(x, t, text, pooled)
    assert out.shape == x.shape and out.abs().sum() > 0
    # Other latent sizes (non-square too) work: the position table is computed for them.
    x2, t2, text2, pooled2 = inputs(size=(12, 6))
    assert model(x2, t2, text2, pooled2).shape == (2, 4, 12, 6)


def test_output_depends_on_timestep_and_on_the_caption():
    model = tiny()
    randomise(model)
    x, t, text, pooled = inputs()
    base = model(x, t, text, pooled)
    assert not torch.allclose(base, model(x, 1 - t, text, pooled))
    assert not torch.allclose(base, model(x, t, text.flip(1), pooled))  # token embeddings via cross-attention
    assert not torch.allclose(base, model(x, t, text, -pooled))  # pooled embedding via adaLN


@pytest.mark.parametrize("size,text_len", [((8, 8), 5), ((12, 6), 7)])
def test_forward_flops_equal_torch_flop_counter(size, text_len):
    model = tiny(patch_size=2)
    x, t, text, pooled = inputs(batch=3, size=size, text_len=text_len)
    # The math backend spells attention as matmuls, which the counter sees.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, t, text, pooled)
    assert counter.get_total_flops() == 3 * model.forward_flops(*size, text_len)


def test_attention_equals_softmax_reference_with_qk_norm():
    torch.manual_seed(0)
    attention = Attention(16, num_heads=2, qk_norm=True)
    x = torch.randn(2, 6, 16)
    context = torch.randn(2, 3, 16)
    out = attention(x, context)
    q = attention.norm_q(attention.to_q(x).view(2, 6, 2, 8)).transpose(1, 2)
    k = attention.norm_k(attention.to_k(context).view(2, 3, 2, 8)).transpose(1, 2)
    v = attention.to_v(context).view(2, 3, 2, 8).transpose(1, 2)
    weights = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1)
    reference = attention.to_out((weights @ v).transpose(1, 2).reshape(2, 6, 16))
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


def test_attention_projections_are_lora_targets():
    from peft import LoraConfig, inject_adapter_in_model

    model = tiny()
    names = [n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "to_out")]
    assert len(names) == 2 * 2 * 4  # depth x (self, cross) x (q, k, v, out)
    assert all(isinstance(model.get_submodule(n), torch.nn.Linear) for n in names)
    model = inject_adapter_in_model(LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "to_out"]), model)
    lora = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert len(lora) == 2 * len(names)
    x, t, text, pooled = inputs()
    assert model(x, t, text, pooled).shape == x.shape


def test_save_pretrained_round_trip(tmp_path):
    model = tiny()
    randomise(model, seed=3)
    model.save_pretrained(tmp_path)
    loaded = DiffusionTransformer.from_pretrained(tmp_path)
    x, t, text, pooled = inputs()
    torch.testing.assert_close(model(x, t, text, pooled), loaded(x, t, text, pooled), rtol=0, atol=0)
    assert loaded.config.hidden_size == 32 and loaded.config.depth == 2


def test_presets_and_overrides():
    assert PRESETS["XL"] == {"hidden_size": 1152, "depth": 28, "num_heads": 16}
    model = tiny(preset="S", hidden_size=48, depth=1, num_heads=3)
    assert (model.config.hidden_size, model.config.depth, model.config.num_heads) == (48, 1, 3)
    with pytest.raises(ValueError, match="unknown model preset"):
        tiny(preset="XXL")
    with pytest.raises(ValueError, match="not installed"):
        model.use_attention("flash_attn")  # the flash_attn package is not installed on this machine


def micro(batch=2, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (batch, 6), generator=g).float()


def test_size_and_crop_conditioning():
    plain, conditioned = tiny(), tiny(micro_conditioning=True)
    x, t, text, pooled = inputs()
    # Zero-initialised last layer: switching it on changes nothing before training.
    assert torch.count_nonzero(conditioned(x, t, text, pooled, micro())) == 0
    randomise(conditioned)
    base = conditioned(x, t, text, pooled, micro())
    changed = micro()
    changed[:, 2:4] += 8  # another crop offset
    assert not torch.allclose(base, conditioned(x, t, text, pooled, changed))
    assert not torch.allclose(base, conditioned(x, t, text, pooled, micro(seed=2)))
    # Without conditions: an uncropped image of the latent's size (8 pixels per latent by default).
    uncropped = torch.tensor([[64.0, 64, 0, 0, 64, 64]]).expand(2, 6)
    torch.testing.assert_close(conditioned(x, t, text, pooled), conditioned(x, t, text, pooled, uncropped))
    with pytest.raises(ValueError, match="built without micro_conditioning"):
        plain(x, t, text, pooled, micro())
    # The FLOP count includes the size MLP.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        conditioned(x, t, text, pooled, micro())
    assert counter.get_total_flops() == 2 * conditioned.forward_flops(8, 8, 5)


def test_positions_are_interpolated_to_other_grids():
    from trainer.model import position_scale, sincos_2d

    model = tiny()  # sample_size 8, patch 2: a 4x4 base grid
    assert position_scale(4, 4, 4) == 1.0
    base = model._position_table(4, 4, torch.zeros(()))[0]  # (16, D)
    torch.testing.assert_close(base, sincos_2d(32, 4, 4))
    double = model._position_table(8, 8, torch.zeros(()))[0].view(8, 8, -1)  # the next stage's grid
    # Token (2i, 2j) of the 8x8 grid sits where token (i, j) of the 4x4 grid did: same embedding.
    torch.testing.assert_close(double[::2, ::2].reshape(16, -1), base)
    wide = model._position_table(2, 8, torch.zeros(()))[0].view(2, 8, -1)  # a 4:1 bucket of the same area
    torch.testing.assert_close(wide[:, :4].reshape(8, -1), sincos_2d(32, 4, 4).view(4, 4, -1)[:2].reshape(8, -1))


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny(micro_conditioning=True)
    randomise(model)
    x, t, text, pooled = inputs()
    conditions = micro()

    saved = []

    def gradients():
        model.zero_grad()
        saved.clear()
        # Count what autograd keeps from the forward pass for the backward pass.
        with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x, lambda x: x):
            loss = model(x, t, text, pooled, conditions).square().mean()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}, sum(saved)

    plain, kept_plain = gradients()
    model.enable_gradient_checkpointing()
    assert model.gradient_checkpointing
    checkpointed, kept_checkpointed = gradients()
    assert kept_checkpointed < 0.5 * kept_plain  # block activations are recomputed, not kept
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-6, msg=name)

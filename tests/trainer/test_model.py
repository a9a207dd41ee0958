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

"""The aesthetic head: LAION's checkpoint layouts load as they are, and the
score is the head applied to the normalised CLIP image embedding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from schemas.scoring import AestheticConfig, EmbeddingHeadConfig, ScoringConfig
from stages.aesthetic import FIELD, clip_heads
from stages.models.heads import EmbeddingHead
from pipelines.testing.models import save_embedding_head


def test_laion_v1_linear_head(tmp_path):
    """v1 (`sa_0_4_vit_b_32_linear.pth`): one Linear(512, 1) state dict, `weight`/`bias`."""
    path = tmp_path / "sa_0_4_vit_b_32_linear.pth"
    state = save_embedding_head(path, [512, 1], layout="linear", seed=0, bias=5.5)
    embeddings = np.random.default_rng(0).normal(size=(6, 512)).astype(np.float32)
    scores = EmbeddingHead.load(EmbeddingHeadConfig(path=str(path), output="identity"), 512)(embeddings)
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    want = unit @ state["weight"].numpy()[0] + 5.5
    np.testing.assert_allclose(scores, want, rtol=1e-5)
    # Normalisation matters: the raw embedding gives other numbers.
    assert not np.allclose(scores, embeddings @ state["weight"].numpy()[0] + 5.5)


def test_laion_v2_mlp_layout_without_activations(tmp_path):
    """v2 (improved predictor): layers.0, .2, .4, .6 linear with dropout between (no
    activations) then layers.7; the indices are not contiguous."""
    state = {}
    sizes = [(768, 64), (64, 32), (32, 16), (16, 8), (8, 1)]
    for index, (n_in, n_out) in zip([0, 2, 4, 6, 7], sizes):
        state[f"layers.{index}.weight"] = torch.randn(n_out, n_in) / n_in**0.5
        state[f"layers.{index}.bias"] = torch.randn(n_out) * 0.1
    path = tmp_path / "improved.pth"
    torch.save({"state_dict": state}, path)  # some checkpoints wrap the state dict
    embeddings = np.random.default_rng(1).normal(size=(3, 768)).astype(np.float32)
    got = EmbeddingHead.load(EmbeddingHeadConfig(path=str(path), output="identity"), 768)(embeddings)
    x = torch.nn.functional.normalize(torch.from_numpy(embeddings), dim=-1)
    for index in [0, 2, 4, 6, 7]:
        x = x @ state[f"layers.{index}.weight"].T + state[f"layers.{index}.bias"]
    np.testing.assert_allclose(got, x[:, 0].numpy(), rtol=1e-4, atol=1e-6)


def test_mapping_and_config():
    head = {"path": "a.pth", "output": "identity"}
    assert clip_heads(None) == {}
    assert clip_heads(AestheticConfig(head=head)) == {FIELD: EmbeddingHeadConfig(**head)}
    with pytest.raises(ValueError, match="aesthetic.head.*configure `scoring.clip`"):
        ScoringConfig(aesthetic={"head": head})

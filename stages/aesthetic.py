"""Aesthetic score: a head on the CLIP image embedding.

Follows LAION's aesthetic predictors: the L2-normalised CLIP image embedding
goes through a linear layer (v1, e.g. `sa_0_4_vit_b_32_linear.pth` for
ViT-B/32) or an MLP (v2, `layers.0 .. layers.7` on ViT-L/14), trained to
predict a 1..10 human rating. LAION-Aesthetics subsets keep >= 5, 6 or 6.5.
Both checkpoint layouts load as they are (`EmbeddingHeadConfig`, output
`identity`). The head runs in `stages.clip_score.ApplyClipHeadsDoFn`, on the
embedding the CLIP step already computed; `SelectConfig.min_aesthetic_score`
is the threshold.
"""

from __future__ import annotations

from schemas.scoring import AestheticConfig, EmbeddingHeadConfig

FIELD = "aesthetic_score"


def clip_heads(config: AestheticConfig | None) -> dict[str, EmbeddingHeadConfig]:
    """Record field -> head config for the aesthetic head (empty when off)."""
    if config is None:
        return {}
    return {FIELD: config.head}

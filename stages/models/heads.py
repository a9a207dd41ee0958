"""The small heads that score a CLIP image embedding (`punsafe`, `pwatermark`,
`aesthetic_score`): loading a checkpoint of linear layers and running it in numpy.
No Beam."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from schemas.scoring import EmbeddingHeadConfig


def _head_state_dict(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"embedding head checkpoint {path!r} does not exist")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            import torch

            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state:
                state = state["state_dict"]
    except Exception as err:
        raise ValueError(f"embedding head checkpoint {path!r} could not be read: {err}") from err
    if not isinstance(state, dict) or not state:
        raise ValueError(f"embedding head checkpoint {path!r} holds no state dict")
    return state


def _linear_layers(state: dict, path: str) -> list[tuple[Any, Any]]:
    """[(weight [out, in], bias [out] or None)] in application order."""
    if "weight" in state:
        return [(state["weight"], state.get("bias"))]
    indices = sorted({int(k.split(".")[1]) for k in state if k.startswith("layers.") and k.endswith(".weight")})
    if not indices:
        raise ValueError(
            f"embedding head checkpoint {path!r}: expected `weight`/`bias` or `layers.<i>.weight` tensors, "
            f"found {sorted(state)[:8]}"
        )
    layers = [(state[f"layers.{i}.weight"], state.get(f"layers.{i}.bias")) for i in indices]
    for n, ((w, _), (w_next, _)) in enumerate(zip(layers, layers[1:])):
        if w.shape[0] != w_next.shape[1]:
            raise ValueError(
                f"embedding head checkpoint {path!r}: layer {indices[n]} gives {w.shape[0]} features "
                f"but layer {indices[n + 1]} takes {w_next.shape[1]}"
            )
    return layers


def check_embedding_head(config: EmbeddingHeadConfig, embed_dim: int | None) -> tuple[int, int]:
    """Validate a head checkpoint before the pipeline starts; returns (in, out) features."""
    layers = _linear_layers(_head_state_dict(config.path), config.path)
    in_features, out_features = layers[0][0].shape[1], layers[-1][0].shape[0]
    if embed_dim is not None and in_features != embed_dim:
        raise ValueError(
            f"embedding head {config.path!r} takes {in_features}-dim embeddings but the CLIP model gives {embed_dim}"
        )
    if config.output in ("identity", "sigmoid") and out_features != 1:
        raise ValueError(f"embedding head {config.path!r} has {out_features} outputs; output={config.output!r} needs 1")
    if config.output == "softmax_last" and out_features < 2:
        raise ValueError(f"embedding head {config.path!r} has 1 output; output='softmax_last' needs >= 2 classes")
    return in_features, out_features


class EmbeddingHead:
    """A chain of linear layers on an (optionally L2-normalised) embedding,
    giving one score per row. Built by `load`; call it on [batch, dim] float32."""

    def __init__(self, layers, activation: str, output: str, normalize_input: bool):
        self.layers = layers  # [(weight [out, in], bias [out] | None)] torch tensors
        self.activation = activation
        self.output = output
        self.normalize_input = normalize_input

    @classmethod
    def load(cls, config: EmbeddingHeadConfig, embed_dim: int | None = None) -> EmbeddingHead:
        check_embedding_head(config, embed_dim)
        layers = _linear_layers(_head_state_dict(config.path), config.path)
        layers = [(w.float(), b.float() if b is not None else None) for w, b in layers]
        return cls(layers, config.activation, config.output, config.normalize_input)

    def __call__(self, embeddings: np.ndarray) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        with torch.inference_mode():
            x = torch.from_numpy(np.asarray(embeddings, dtype=np.float32))  # [B, D]
            if self.normalize_input:
                x = F.normalize(x, dim=-1)
            for i, (weight, bias) in enumerate(self.layers):
                x = F.linear(x, weight, bias)  # [B, out_i]
                if i < len(self.layers) - 1 and self.activation != "none":
                    x = F.relu(x) if self.activation == "relu" else F.gelu(x)
            if self.output == "identity":
                scores = x[:, 0]
            elif self.output == "sigmoid":
                scores = torch.sigmoid(x[:, 0])
            else:
                scores = torch.softmax(x, dim=-1)[:, -1]
            return scores.numpy().astype(np.float64)  # [B]

"""What the model stages share: device and dtype choice, batching and resource
hints for `RunInference`, decoding a staged image once for every model, and the
small heads that score CLIP embeddings.

How a record reaches the models (see `pipelines/scoring.py`):
1. `PrepareImagesDoFn` reads the record's staged bytes (`ImageRef`), decodes
   them once (EXIF-transposed RGB) and asks each model's `Preparer` for its
   input: uint8 arrays, so a batch in flight stays 4x smaller than float32 and
   normalisation runs on the model's device.
2. `RunInference` with a model's `ModelHandler` batches the examples
   (`beam.BatchElements`), loads the model on the worker (`load_model`) and
   fills in the example's scores.
All of it is fused in one Beam stage: the arrays never cross a shuffle.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from schemas import RejectReason, SampleRecord, Stage
from schemas.scoring import BatchingConfig, EmbeddingHeadConfig, ModelWorkerConfig
from stages.base import REJECTS, Drop, rejection
from stages.core.decode import decode_rgb

LOG = logging.getLogger(__name__)

# Namespace of the metrics of the shared scoring steps.
NAMESPACE = "scoring"


# ---------------------------------------------------------------- devices


def resolve_device(preference: str):
    """`auto` -> CUDA when available, else CPU; `cuda` without CUDA is an error
    (a GPU job silently running on CPU would be 50x slower)."""
    import torch

    if preference == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if preference == "cuda":
        raise RuntimeError("scoring.device is `cuda` but this worker has no CUDA device (torch.cuda.is_available() is False)")
    return torch.device("cpu")


def resolve_dtype(device, precision: str):
    """Compute dtype under autocast: `auto` is bf16 on CUDA (when the GPU
    supports it, else fp16) and fp32 on CPU. None means no autocast."""
    import torch

    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def onnx_providers(preference: str) -> list[str]:
    """onnxruntime execution providers for a device preference."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    if preference != "cpu" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if preference == "cuda":
        raise RuntimeError(
            "scoring.device is `cuda` but onnxruntime has no CUDAExecutionProvider "
            f"(available: {available}); install onnxruntime-gpu on the workers"
        )
    return ["CPUExecutionProvider"]


# ---------------------------------------------------------------- RunInference wiring


def model_handler_kwargs(batching: BatchingConfig, scoring: ModelWorkerConfig) -> dict[str, Any]:
    """Keyword arguments for `ModelHandler.__init__`: batch bounds and sharing."""
    kwargs: dict[str, Any] = {
        "min_batch_size": batching.min_batch_size,
        "max_batch_size": batching.max_batch_size,
    }
    if scoring.share_model_across_processes:
        # ModelHandler shares across processes when large_model or model_copies is set.
        kwargs["large_model"] = True
        kwargs["model_copies"] = scoring.model_copies or 1
    return kwargs


class ScoringHandlerMixin:
    """What the scoring ModelHandlers (CLIP, NudeNet) share. Subclasses set
    `metrics_namespace` and `_hints` (from `resource_hints`)."""

    metrics_namespace: str
    _hints: dict[str, str]

    def get_num_bytes(self, batch: Sequence[ScoringExample]) -> int:
        # Beam's default pickles the whole batch just to measure it.
        return sum(example.nbytes() for example in batch)

    def get_metrics_namespace(self) -> str:
        return self.metrics_namespace

    def get_resource_hints(self) -> dict:
        return dict(self._hints)


def resource_hints(scoring: ModelWorkerConfig) -> dict[str, str]:
    """Beam resource hints for the model steps (empty when none are set)."""
    hints = {}
    if scoring.accelerator:
        hints["accelerator"] = scoring.accelerator
    if scoring.min_ram:
        hints["min_ram"] = scoring.min_ram
    return hints


# ---------------------------------------------------------------- examples


@dataclasses.dataclass
class ScoringExample:
    """A record on its way through the models, with each model's input.

    Only lives inside the fused scoring stage; the arrays are dropped before
    the record leaves it.
    """

    record: SampleRecord
    inputs: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # model input name -> array

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.inputs.values())


class Preparer(Protocol):
    """Turns a decoded image (and its record) into one model's inputs."""

    def setup(self) -> None: ...

    def __call__(self, image, record: SampleRecord) -> dict[str, np.ndarray]: ...


def _read_staged(ref):
    from stages.staging import read_image_bytes

    return read_image_bytes(ref)


class PrepareImagesDoFn(beam.DoFn):
    """SampleRecord -> ScoringExample with every model's input.

    Reads the staged bytes and decodes them once for all models. A record whose
    bytes cannot be read (`staging_lost`) or decoded (`not_an_image`) goes to
    the `rejects` output at stage `select` (they passed decoding earlier, so
    this means the staging files were lost or corrupted).
    """

    def __init__(self, preparers: Sequence[Preparer]):
        self.preparers = list(preparers)
        self.prepared = Metrics.counter(NAMESPACE, "prepared")
        self.lost = Metrics.counter(NAMESPACE, f"dropped_{RejectReason.STAGING_LOST.value}")
        self.undecodable = Metrics.counter(NAMESPACE, f"dropped_{RejectReason.NOT_AN_IMAGE.value}")

    def setup(self):
        for preparer in self.preparers:
            preparer.setup()

    def process(self, record: SampleRecord) -> Iterator[Any]:
        if record.image_ref is None:
            raise ValueError(f"{record.key}: no image_ref; the model stages run after staging")
        try:
            data = _read_staged(record.image_ref)
        except Exception as err:  # a lost staging file costs the sample, not the run
            self.lost.inc()
            drop = Drop(RejectReason.STAGING_LOST, f"{record.image_ref.path}: {err}"[:300])
            yield beam.pvalue.TaggedOutput(REJECTS, rejection(record, Stage.SELECT, drop))
            return
        try:
            image = decode_rgb(data)
        except Exception as err:
            self.undecodable.inc()
            drop = Drop(RejectReason.NOT_AN_IMAGE, f"staged bytes no longer decode: {err}"[:300])
            yield beam.pvalue.TaggedOutput(REJECTS, rejection(record, Stage.SELECT, drop))
            return
        example = ScoringExample(record)
        for preparer in self.preparers:
            example.inputs.update(preparer(image, record))
        self.prepared.inc()
        yield example


# ---------------------------------------------------------------- embedding heads


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

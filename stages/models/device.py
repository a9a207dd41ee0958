"""Where a model runs: the torch device and autocast dtype for a device/precision
preference, and the onnxruntime execution providers. No Beam."""

from __future__ import annotations

import logging

LOG = logging.getLogger(__name__)


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

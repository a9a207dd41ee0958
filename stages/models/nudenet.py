"""NudeNet 3.x's detector (`320n.onnx`) run with onnxruntime: the config check,
NudeNet's letterbox, and the reduction of its raw output to one `nsfw_score` per
image (see `stages/safety.py` for what the score means). No Beam."""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Sequence

import numpy as np

from schemas import SampleRecord
from schemas.scoring import NudeNetConfig
from stages.models.device import onnx_providers

LOG = logging.getLogger(__name__)

PIXELS = "nudenet_pixels"  # uint8 [S, S, 3] RGB letterboxed

# Output classes of NudeNet 3.x's 320n.onnx, in model output order
# (rows 4.. of its [batch, 4 + 18, boxes] output; rows 0..3 are the box).
NUDENET_LABELS = [
    "FEMALE_GENITALIA_COVERED",
    "FACE_FEMALE",
    "BUTTOCKS_EXPOSED",
    "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED",
    "MALE_BREAST_EXPOSED",
    "ANUS_EXPOSED",
    "FEET_EXPOSED",
    "BELLY_COVERED",
    "FEET_COVERED",
    "ARMPITS_COVERED",
    "ARMPITS_EXPOSED",
    "FACE_MALE",
    "BELLY_EXPOSED",
    "MALE_GENITALIA_EXPOSED",
    "ANUS_COVERED",
    "FEMALE_BREAST_COVERED",
    "BUTTOCKS_COVERED",
]
_BOX_ROWS = 4


class SafetyConfigError(ValueError):
    """The safety config cannot work; raised before the pipeline starts."""


def packaged_nudenet_model() -> str:
    """Path of the detector shipped in the nudenet package (found without importing it)."""
    spec = importlib.util.find_spec("nudenet")
    if spec is None or not spec.submodule_search_locations:
        raise SafetyConfigError("the nudenet package is not installed; set safety.nudenet.model_path to an ONNX file")
    return os.path.join(list(spec.submodule_search_locations)[0], "320n.onnx")


def nudenet_model_path(config: NudeNetConfig) -> str:
    return config.model_path or packaged_nudenet_model()


def check_nudenet_config(config: NudeNetConfig) -> None:
    path = nudenet_model_path(config)
    if not os.path.isfile(path):
        raise SafetyConfigError(f"NudeNet model {path!r} does not exist (safety.nudenet.model_path)")
    unknown = sorted(set(config.unsafe_classes) - set(NUDENET_LABELS))
    if unknown:
        raise SafetyConfigError(f"safety.nudenet.unsafe_classes: unknown {unknown}; classes are {NUDENET_LABELS}")
    if not config.unsafe_classes:
        raise SafetyConfigError("safety.nudenet.unsafe_classes is empty; turn NudeNet off with `nudenet: null` instead")


def letterbox(rgb: np.ndarray, size: int) -> np.ndarray:
    """NudeNet's input geometry: pad right/bottom with black to a square, then
    bilinear resize. uint8 [H, W, 3] -> uint8 [size, size, 3]."""
    import cv2

    height, width = rgb.shape[:2]
    side = max(height, width)
    padded = cv2.copyMakeBorder(rgb, 0, side - height, 0, side - width, cv2.BORDER_CONSTANT, value=(0, 0, 0))
    return cv2.resize(padded, (size, size), interpolation=cv2.INTER_LINEAR)


def unsafe_scores(raw: np.ndarray, class_indices: Sequence[int]) -> np.ndarray:
    """Detector output [B, 4 + classes, boxes] -> nsfw_score [B]: the highest
    confidence of an unsafe class over all candidate boxes (0 when no box)."""
    if raw.ndim != 3 or raw.shape[1] < _BOX_ROWS + 1:
        raise ValueError(f"expected detector output [batch, 4 + classes, boxes], got {raw.shape}")
    if raw.shape[2] == 0:
        return np.zeros(raw.shape[0])
    rows = [_BOX_ROWS + i for i in class_indices]
    return raw[:, rows, :].max(axis=(1, 2)).astype(np.float64)


class NudeNetPreparer:
    """Decoded image -> letterboxed uint8 pixels for NudeNet."""

    def __init__(self, config: NudeNetConfig):
        self.size = config.input_size

    def setup(self) -> None:
        pass

    def __call__(self, image, record: SampleRecord) -> dict[str, np.ndarray]:
        return {PIXELS: letterbox(np.asarray(image, dtype=np.uint8), self.size)}


class NudeNetDetector:
    """The ONNX session; `score` takes and returns numpy (works through
    Beam's cross-process model proxy)."""

    def __init__(self, session, class_indices: list[int]):
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.class_indices = class_indices

    def raw(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [B, S, S, 3] RGB -> detector output [B, 4 + 18, boxes]."""
        x = pixels.transpose(0, 3, 1, 2).astype(np.float32) / 255.0  # [B, 3, S, S]
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x)})[0]

    def score(self, pixels: np.ndarray) -> np.ndarray:
        return unsafe_scores(self.raw(pixels), self.class_indices)


def load_nudenet(config: NudeNetConfig, device_preference: str, cpu_threads: int | None) -> NudeNetDetector:
    """An onnxruntime session of the NudeNet detector on the chosen providers, its
    output shape checked."""
    import onnxruntime

    path = nudenet_model_path(config)
    providers = onnx_providers(device_preference)
    options = onnxruntime.SessionOptions()
    if cpu_threads is not None:
        options.intra_op_num_threads = cpu_threads
    try:
        session = onnxruntime.InferenceSession(path, sess_options=options, providers=providers)
    except Exception as err:
        raise RuntimeError(f"could not load the NudeNet ONNX model {path!r}: {err}") from err
    outputs = session.get_outputs()[0].shape
    if len(outputs) != 3 or outputs[1] != _BOX_ROWS + len(NUDENET_LABELS):
        raise RuntimeError(f"{path!r} gives outputs {outputs}; expected [batch, {4 + len(NUDENET_LABELS)}, boxes]")
    LOG.info("NudeNet %s on %s", path, session.get_providers())
    return NudeNetDetector(session, [NUDENET_LABELS.index(c) for c in config.unsafe_classes])

"""CLIP (open_clip): the config checks run before a pipeline starts, the image
preprocessing resolved without loading the model, the CPU-side preparer (resize,
crop, tokenize) and the loaded scorer (image-text cosine similarity and the image
embedding). No Beam: `stages/clip_score.py` wraps it in a RunInference handler.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence

import numpy as np

from schemas import SampleRecord
from schemas.scoring import ClipConfig, EmbeddingHeadConfig
from stages.models.device import resolve_device, resolve_dtype
from stages.models.heads import check_embedding_head

LOG = logging.getLogger(__name__)

PIXELS = "clip_pixels"  # uint8 [H, W, 3], resized and cropped
TOKENS = "clip_tokens"  # int64 [context_length]

# The PreprocessCfg fields that decide what the model sees.
_PREPROCESS_KEYS = ("size", "mean", "std", "interpolation", "resize_mode", "fill_color")


class ClipConfigError(ValueError):
    """The CLIP config cannot work; raised before the pipeline starts."""


def register_model_config(config: ClipConfig) -> None:
    """Register `config.model_config_path` with open_clip (idempotent)."""
    if config.model_config_path is None:
        return
    import open_clip

    if not os.path.exists(config.model_config_path):
        raise ClipConfigError(f"clip.model_config_path {config.model_config_path!r} does not exist")
    if config.model not in open_clip.list_models():
        open_clip.add_model_config(config.model_config_path)


def _model_config(config: ClipConfig) -> dict:
    import open_clip

    register_model_config(config)
    if config.model.startswith(("hf-hub:", "local-dir:")):
        raise ClipConfigError(
            f"clip.model {config.model!r}: use an architecture name and `pretrained` (a tag or a local file); "
            "register a custom architecture with clip.model_config_path"
        )
    model_cfg = open_clip.get_model_config(config.model)
    if model_cfg is None:
        raise ClipConfigError(
            f"clip.model {config.model!r} is not an open_clip architecture; known: {', '.join(open_clip.list_models()[:12])}, ... "
            "(or register one with clip.model_config_path)"
        )
    return model_cfg


def preprocess_config(config: ClipConfig) -> dict:
    """The image preprocessing open_clip will attach to this model, resolved
    without loading it (the decode step needs it before any model exists):
    open_clip's defaults, then the pretrained tag's mean/std/interpolation/resize
    mode, then the vision tower's input size. `ClipModelHandler.load_model`
    checks it against the loaded model's own config."""
    from dataclasses import asdict

    from open_clip.pretrained import get_pretrained_cfg
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    model_cfg = _model_config(config)
    cfg = asdict(PreprocessCfg())
    tag_cfg = get_pretrained_cfg(config.model, config.pretrained)
    if tag_cfg:
        cfg = merge_preprocess_dict(cfg, tag_cfg)
    size = model_cfg["vision_cfg"].get("image_size", cfg["size"])
    cfg["size"] = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    return {key: (tuple(cfg[key]) if isinstance(cfg[key], list) else cfg[key]) for key in _PREPROCESS_KEYS}


def _same_preprocess(expected: dict, actual: dict) -> bool:
    def norm(value):
        if isinstance(value, (list, tuple)):
            return tuple(round(float(v), 6) if isinstance(v, float) else v for v in value)
        return value

    actual = dict(actual)
    if isinstance(actual.get("size"), int):
        actual["size"] = (actual["size"], actual["size"])
    return all(norm(expected[k]) == norm(actual.get(k, expected[k])) for k in _PREPROCESS_KEYS)


def clip_embed_dim(config: ClipConfig) -> int:
    """The embedding size of the architecture, from its config alone (no weights read)."""
    return int(_model_config(config)["embed_dim"])


def check_clip_config(config: ClipConfig) -> int:
    """Fail early, with the path and what to do, when the CLIP config cannot
    load; returns the embedding dimension. A pretrained tag is only checked to
    be known (the workers download it); a local checkpoint is opened and its
    tensor names compared with the architecture's."""
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    model_cfg = _model_config(config)
    embed_dim = int(model_cfg["embed_dim"])
    if get_pretrained_cfg(config.model, config.pretrained):
        return embed_dim
    path = config.pretrained
    if not os.path.isfile(path):
        tags = list_pretrained_tags_by_model(config.model)
        raise ClipConfigError(
            f"clip.pretrained {path!r} is neither a pretrained tag of {config.model} "
            f"({', '.join(tags) or 'none'}) nor an existing local file"
        )
    checkpoint_keys = _checkpoint_keys(path)
    expected = _architecture_keys(config.model)
    if expected is not None:
        missing = sorted(expected - checkpoint_keys)
        unexpected = sorted(checkpoint_keys - expected - {"state_dict"})
        if missing:
            raise ClipConfigError(
                f"clip.pretrained {path!r} does not fit {config.model}: missing {len(missing)} tensors "
                f"(e.g. {missing[:3]}); unexpected {unexpected[:3]}"
            )
    return embed_dim


def _checkpoint_keys(path: str) -> set[str]:
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                keys = set(f.keys())
        else:
            import torch

            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            if isinstance(state, dict) and "state_dict" in state:
                state = state["state_dict"]
            if not isinstance(state, dict):
                raise ValueError(f"holds a {type(state).__name__}, not a state dict")
            keys = {k[len("module.") :] if k.startswith("module.") else k for k in state}
    except Exception as err:
        raise ClipConfigError(f"clip.pretrained {path!r} is not a readable checkpoint: {err}") from err
    if not keys:
        raise ClipConfigError(f"clip.pretrained {path!r} holds no tensors")
    return keys


def _architecture_keys(model: str) -> set[str] | None:
    """State-dict names of the architecture, built on the meta device (no memory, no weights)."""
    import open_clip

    try:
        meta_model = open_clip.create_model(model, device="meta", pretrained_text=False)
    except Exception as err:  # e.g. HF text towers that need their config from the hub
        LOG.warning("could not build %s on the meta device to check its checkpoint: %s", model, err)
        return None
    return set(meta_model.state_dict())


class ClipPreparer:
    """Decoded image + record -> uint8 resized/cropped pixels and caption tokens."""

    def __init__(self, config: ClipConfig, preprocess: dict):
        self.config = config
        self.preprocess = preprocess

    def setup(self) -> None:
        import open_clip
        from open_clip.transform import PreprocessCfg, image_transform_v2
        from torchvision.transforms import Normalize, ToTensor

        register_model_config(self.config)
        transform = image_transform_v2(PreprocessCfg(**self.preprocess), is_train=False)
        # Keep the PIL-level steps (resize, crop, mode); ToTensor and Normalize run on the device.
        self._pil_steps = [t for t in transform.transforms if not isinstance(t, (ToTensor, Normalize))]
        if len(self._pil_steps) != len(transform.transforms) - 2:
            raise RuntimeError(f"unexpected open_clip eval transform {transform}; expected ... ToTensor, Normalize")
        self._tokenizer = open_clip.get_tokenizer(self.config.model)

    def __call__(self, image, record: SampleRecord) -> dict[str, np.ndarray]:
        for step in self._pil_steps:
            image = step(image)
        pixels = np.asarray(image, dtype=np.uint8)  # [H, W, 3]
        tokens = self._tokenizer([record.caption_original]).numpy()[0].astype(np.int64)  # [context_length]
        return {PIXELS: pixels, TOKENS: tokens}


class ClipScorer:
    """The loaded CLIP model on its device. `score` takes and returns numpy, so
    it also works through Beam's cross-process model proxy."""

    def __init__(self, model, device, dtype, mean: Sequence[float], std: Sequence[float]):
        import torch

        self.model = model
        self.device = device
        self.dtype = dtype
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)

    def score(self, pixels: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """pixels uint8 [B, H, W, 3], tokens int64 [B, L] -> (similarity [B],
        image embedding [B, D], text embedding [B, D]), embeddings L2-normalised."""
        import contextlib

        import torch
        import torch.nn.functional as F

        with torch.inference_mode():
            x = torch.from_numpy(pixels).to(self.device, non_blocking=True)  # [B, H, W, 3] uint8
            x = x.permute(0, 3, 1, 2).float().div_(255.0)  # [B, 3, H, W] in 0..1
            x = (x - self.mean) / self.std
            text = torch.from_numpy(tokens).to(self.device, non_blocking=True)  # [B, L]
            autocast = (
                torch.autocast(device_type=self.device.type, dtype=self.dtype)
                if self.dtype is not None
                else contextlib.nullcontext()
            )
            with autocast:
                image_emb = self.model.encode_image(x)  # [B, D]
                text_emb = self.model.encode_text(text)  # [B, D]
            image_emb = F.normalize(image_emb.float(), dim=-1)
            text_emb = F.normalize(text_emb.float(), dim=-1)
            similarity = (image_emb * text_emb).sum(dim=-1)  # [B]
            # One device->host copy per batch (a sync point).
            return similarity.cpu().numpy().astype(np.float64), image_emb.cpu().numpy(), text_emb.cpu().numpy()


@dataclasses.dataclass
class ClipOutput:
    similarity: float
    embedding: np.ndarray  # float32 [D], L2-normalised
    text_embedding: np.ndarray | None = None  # float32 [D], L2-normalised caption embedding


def load_clip_scorer(config: ClipConfig, preprocess: dict, device_preference: str, precision: str, cpu_threads: int | None) -> ClipScorer:
    """Load the open_clip model as users load it (`create_model_and_transforms`) on
    the chosen device, check its preprocessing against `preprocess` (what the decode
    step resized with), and wrap it for scoring."""
    import open_clip
    from open_clip.model import get_model_preprocess_cfg

    register_model_config(config)
    device = resolve_device(device_preference)
    if cpu_threads is not None:
        import torch

        torch.set_num_threads(cpu_threads)
    model, _, _ = open_clip.create_model_and_transforms(
        config.model, pretrained=config.pretrained, device=device
    )
    model.eval()
    actual = get_model_preprocess_cfg(model)
    if not _same_preprocess(preprocess, actual):
        raise RuntimeError(
            f"open_clip preprocessing for {config.model}/{config.pretrained} is {actual}, "
            f"but the decode step resized with {preprocess}"
        )
    dtype = resolve_dtype(device, precision)
    LOG.info("CLIP %s (%s) on %s, autocast %s", config.model, config.pretrained, device, dtype)
    return ClipScorer(model, device, dtype, preprocess["mean"], preprocess["std"])


def check_heads(heads: dict[str, EmbeddingHeadConfig], embed_dim: int) -> None:
    """Validate every head checkpoint against the CLIP embedding size."""
    for field, cfg in heads.items():
        try:
            check_embedding_head(cfg, embed_dim)
        except (OSError, ValueError) as err:
            raise ClipConfigError(f"head for {field}: {err}") from err

"""The recaptioning VLM (a LLaVA-style image-text-to-text model from
transformers): its processor and prompt, batch collation, batched greedy
generation (`Captioner`) and the checks run before a pipeline starts
(`validate_model`). No Beam: `stages/recaption.py` wraps it in a RunInference
handler."""

from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from schemas.scoring import RecaptionConfig
from stages.core.caption_gate import Generation
from stages.models.device import resolve_device, resolve_dtype

LOG = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def load_processor(model: str):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model)


def format_prompt(processor, config: RecaptionConfig) -> str:
    """The text fed to the processor with each image: the processor's chat
    template applied to one user turn (image + `config.prompt`) when it has one
    and `use_chat_template` is on, else `config.prompt_template`."""
    if config.use_chat_template and getattr(processor, "chat_template", None):
        conversation = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": config.prompt}]},
        ]
        return processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    return config.prompt_template.replace("{prompt}", config.prompt)


def collate(examples: Sequence[Mapping[str, np.ndarray]], pad_token_id: int) -> dict[str, np.ndarray]:
    """Stack per-image processor outputs (each with a leading batch dim of 1)
    into one batch.

    Token sequences (every array shaped like `input_ids`) are left-padded to the
    longest, as decoder-only generation needs: `input_ids` with `pad_token_id`,
    the others (attention mask, token types) with 0. Any other array (pixel
    values, image sizes) is zero-padded in each dim to the largest and
    concatenated along the batch dim (LLaVA-NeXT's varying patch counts).
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    seq_keys = {k for k, v in examples[0].items() if np.shape(v) == np.shape(examples[0]["input_ids"])}
    batch: dict[str, np.ndarray] = {}
    for key in examples[0]:
        arrays = [np.asarray(ex[key]) for ex in examples]
        if key in seq_keys:
            length = max(a.shape[-1] for a in arrays)
            fill = pad_token_id if key == "input_ids" else 0
            batch[key] = np.concatenate(
                [np.pad(a, [(0, 0)] * (a.ndim - 1) + [(length - a.shape[-1], 0)], constant_values=fill) for a in arrays]
            )
        else:
            shape = np.max([a.shape for a in arrays], axis=0)
            batch[key] = np.concatenate(
                [np.pad(a, [(0, 0)] + [(0, int(s) - d) for s, d in zip(shape[1:], a.shape[1:])]) for a in arrays]
            )
    return batch


class Captioner:
    """A vision-language model and its tokenizer, loaded once per worker process
    (or machine): what `CaptionModelHandler.load_model` returns. `generate` takes
    and returns plain picklable values, so Beam's cross-process model sharing
    can proxy it."""

    def __init__(self, model, tokenizer, *, max_new_tokens: int):
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        gen = model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else tokenizer.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = gen.pad_token_id if gen.pad_token_id is not None else min(self.eos_token_ids, default=0)
        self.pad_token_id = int(pad)
        # Greedy decoding, whatever sampling defaults the checkpoint ships with.
        self.generation_config = copy.deepcopy(gen)
        self.generation_config.update(
            do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, pad_token_id=self.pad_token_id,
            temperature=None, top_p=None, top_k=None,
        )

    @classmethod
    def load(cls, config: RecaptionConfig) -> Captioner:
        """Load `config.model` with `AutoModelForImageTextToText` (safetensors
        weights only) on `config.device`, in `config.precision`, with
        `config.cpu_threads` torch threads on CPU."""
        import torch
        from transformers import AutoModelForImageTextToText

        device = resolve_device(config.device)
        dtype = resolve_dtype(device, config.precision) or torch.float32  # None: no reduced precision
        if device.type == "cpu" and config.cpu_threads:
            torch.set_num_threads(config.cpu_threads)  # process-wide, as the worker process is ours
        model = AutoModelForImageTextToText.from_pretrained(
            config.model, dtype=dtype, device_map=str(device), use_safetensors=True
        )
        model.eval()
        LOG.info("recaption model %s loaded on %s as %s", config.model, device, dtype)
        return cls(model, load_processor(config.model).tokenizer, max_new_tokens=config.max_new_tokens)

    @property
    def device(self):
        return self.model.device

    def generate(self, examples: Sequence[Mapping[str, np.ndarray]]) -> list[Generation]:
        """One batched greedy `generate()` over per-image processor outputs."""
        import torch

        batch = collate(examples, self.pad_token_id)
        dtype = self.model.dtype
        tensors = {}
        for key, array in batch.items():
            tensor = torch.from_numpy(np.ascontiguousarray(array))
            if tensor.is_floating_point():
                tensor = tensor.to(dtype)
            tensors[key] = tensor.to(self.device, non_blocking=True)
        with torch.inference_mode():
            output = self.model.generate(**tensors, generation_config=self.generation_config)
        # Decoder-only models return prompt + continuation; keep the continuation.
        if not self.model.config.is_encoder_decoder:
            output = output[:, tensors["input_ids"].shape[1] :]
        rows = output.cpu().tolist()  # the one device -> host sync per batch
        generations = []
        for row in rows:
            end = next((i for i, token in enumerate(row) if token in self.eos_token_ids), None)
            tokens = row if end is None else row[:end]
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            generations.append(
                Generation(text=text.strip(), num_tokens=len(row) if end is None else end + 1, finished=end is not None)
            )
        return generations


# --------------------------------------------------------------------------- #
# Validation before the pipeline starts.


def validate_model(config: RecaptionConfig) -> None:
    """Fail fast, before any pipeline runs, when `config.model` cannot serve as
    a recaptioning model: a missing path, a folder without config.json or
    safetensors weights, a model that is not an image-text-to-text model, a
    missing or broken processor, or a prompt without the image token.

    Raises:
        ValueError, naming the path and what to do about it.
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

    where = f"recaption.model {config.model!r}"
    path = Path(config.model).expanduser()
    if "://" in config.model:
        raise ValueError(
            f"{where}: remote URLs are not supported; copy the checkpoint into the worker image "
            "(or a mounted folder) and pass that directory, or pass a Hugging Face Hub id"
        )
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{where} is a file; pass the checkpoint directory (the one holding config.json)")
        if not (path / "config.json").is_file():
            raise ValueError(
                f"{where} has no config.json; pass a directory written by save_pretrained() "
                "(model and processor), or a Hugging Face Hub id"
            )
        if not any(path.glob("*.safetensors")):
            raise ValueError(
                f"{where} has no *.safetensors weights; only safetensors checkpoints are loaded "
                "(convert .bin weights with save_pretrained(safe_serialization=True))"
            )
    elif not _HUB_ID.match(config.model):
        raise ValueError(f"{where}: no such directory (and not a Hugging Face Hub id like 'org/name')")
    try:
        model_config = AutoConfig.from_pretrained(config.model)
    except (OSError, ValueError, json.JSONDecodeError) as err:
        problem = (
            "has no readable config.json" if path.exists()
            else "is neither a local directory nor reachable on the Hugging Face Hub (offline? a typo?)"
        )
        raise ValueError(f"{where} {problem}: {err}") from err
    if type(model_config) not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING:
        raise ValueError(
            f"{where} is a {model_config.model_type!r} model, which AutoModelForImageTextToText cannot load; "
            "recaptioning needs a LLaVA-style vision-language checkpoint (e.g. llava-hf/llava-1.5-7b-hf)"
        )
    try:
        processor = load_processor(config.model)
    except (OSError, ValueError, TypeError, KeyError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{where}: could not load its processor (image processor + tokenizer): {err}. "
            "Save it beside the model with processor.save_pretrained(DIR)"
        ) from err
    if getattr(processor, "image_processor", None) is None or getattr(processor, "tokenizer", None) is None:
        raise ValueError(
            f"{where}: AutoProcessor loaded a {type(processor).__name__}, which lacks an image processor or a "
            "tokenizer; save the model's multimodal processor (e.g. LlavaProcessor) to the directory"
        )
    image_token = getattr(processor, "image_token", None)
    prompt = format_prompt(processor, config)
    if image_token and image_token not in prompt:
        raise ValueError(
            f"{where}: the prompt {prompt!r} lacks the image token {image_token!r}; "
            "put it in recaption.prompt_template"
        )

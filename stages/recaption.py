"""Recaption: a synthetic caption for each selected sample from a LLaVA-style
vision-language model, with the alt text kept beside it.

Nothing is dropped here. Every record leaves with `caption_original` untouched
and `recaption_status` set:

- `ok`: the generated caption passed the quality gate and is stored in
  `caption_synthetic` (the shard writer puts it in KEY.txt when
  `shards.caption_source` is `synthetic`; both captions go to KEY.json).
- a fallback reason: `caption_synthetic` stays None, so KEY.txt gets the alt
  text. The gate checks, in this order (each can be disabled in
  `RecaptionConfig`): `empty` (no word characters), `prompt_echo` (the caption
  contains the prompt, or >= `max_prompt_overlap` of its words are prompt words,
  default 0.8), `too_short` (< `min_words` words, default 3), `looping` (a word
  n-gram with n <= 8, or a run of 3+ characters, repeated `max_repeats` times
  back to back, default 3), `truncated` (generation hit `max_new_tokens`
  without an end-of-sequence token). `unreadable_image` means the staged bytes
  could not be read or decoded, so nothing was generated.

This is the recaptioning recipe of DALL-E 3 ("Improving Image Generation with
Better Captions", Betker et al. 2023) and PixArt-alpha (LLaVA captions for
SA-1B), with the alt text kept as the fallback and for caption mixing.

Beam layout, all inside `Recaption`:

    Prepare   ParDo: read the staged bytes, decode (EXIF upright, RGB), run the
              model's processor (resize, normalise, prompt tokens).
    Generate  RunInference with `CaptionModelHandler`: BatchElements, then one
              batched greedy `generate()` per batch on a model loaded once per
              worker process (or once per machine with `share_model_across_processes`).
    Gate      ParDo: the quality gate; counts `recaption/captioned` and
              `recaption/fallback_<reason>`.

The three steps carry the same resource hints (`accelerator`, `min_ram`), so the
runner fuses them: pixel tensors never cross a shuffle. Decoding and
preprocessing run in the Prepare step, outside the model call, so on a worker
running several bundles at once (Dataflow runs many threads per SDK process,
all sharing the one model) the CPU work of one bundle overlaps the GPU work of
another instead of sitting in front of it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, RunInference
from PIL import Image

from schemas import RecaptionStatus, SampleRecord
from schemas.scoring import RecaptionConfig
from stages.core.decode import decode_rgb
from stages.inference import model_handler_kwargs, resolve_device, resolve_dtype, resource_hints
from stages.staging import ImageReader

LOG = logging.getLogger(__name__)

NAMESPACE = "recaption"
FALLBACK = "fallback"
_MAX_LOOP_NGRAM = 8
_WORD = re.compile(r"\w+(?:['\u2019]\w+)*")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# --------------------------------------------------------------------------- #
# The quality gate: plain Python.


def caption_words(text: str) -> list[str]:
    """Lower-cased words (runs of letters/digits, apostrophes inside) of `text`."""
    return [w.lower() for w in _WORD.findall(text)]


def echoes_prompt(words: Sequence[str], prompt_words: Sequence[str], max_overlap: float) -> bool:
    """True when `words` contain the whole prompt as a contiguous run, or when at
    least `max_overlap` (a fraction, 0-1] of them are words of the prompt."""
    if not words or not prompt_words:
        return False
    n = len(prompt_words)
    prompt_run = list(prompt_words)
    if any(list(words[i : i + n]) == prompt_run for i in range(len(words) - n + 1)):
        return True
    vocabulary = set(prompt_words)
    return sum(w in vocabulary for w in words) / len(words) >= max_overlap


def is_looping(text: str, words: Sequence[str], max_repeats: int) -> bool:
    """True when a word n-gram (n <= 8) occurs `max_repeats` times back to back
    ("on a mat on a mat on a mat"), or a run of 3 to 40 characters does
    ("hahahaha...", "..........."), the usual failure of greedy decoding."""
    if max_repeats < 2:
        raise ValueError(f"max_repeats must be >= 2 to detect a repeat, got {max_repeats}")
    words = list(words)
    for n in range(1, _MAX_LOOP_NGRAM + 1):
        span = n * max_repeats
        for start in range(len(words) - span + 1):
            gram = words[start : start + n]
            if all(words[start + k * n : start + (k + 1) * n] == gram for k in range(1, max_repeats)):
                return True
    return re.search(r"(.{3,40}?)\1{%d,}" % (max_repeats - 1), text, flags=re.DOTALL) is not None


def gate_caption(text: str, *, prompt: str, truncated: bool, config: RecaptionConfig) -> RecaptionStatus:
    """The quality gate for one generated caption (see the module docstring).

    Args:
        text: the decoded caption, special tokens removed.
        prompt: the user prompt (`config.prompt`, without the chat template).
        truncated: generation stopped at `max_new_tokens` without end-of-sequence.
    Returns:
        `RecaptionStatus.OK` or the first failed check.
    """
    words = caption_words(text)
    if not words:
        return RecaptionStatus.EMPTY
    if config.max_prompt_overlap is not None and echoes_prompt(
        words, caption_words(prompt), config.max_prompt_overlap
    ):
        return RecaptionStatus.PROMPT_ECHO
    if config.min_words and len(words) < config.min_words:
        return RecaptionStatus.TOO_SHORT
    if config.max_repeats and is_looping(text, words, config.max_repeats):
        return RecaptionStatus.LOOPING
    if config.reject_truncated and truncated:
        return RecaptionStatus.TRUNCATED
    return RecaptionStatus.OK


@dataclasses.dataclass(frozen=True)
class Generation:
    """One generated caption. `num_tokens` counts generated tokens up to and
    including end-of-sequence; `finished` is False when `max_new_tokens` ran out."""

    text: str
    num_tokens: int
    finished: bool


def apply_generation(record: SampleRecord, generation: Generation, config: RecaptionConfig) -> SampleRecord:
    """The record with `recaption_status` set, and `caption_synthetic` set only
    when the gate passes (None otherwise: the alt text stays the caption)."""
    text = generation.text.strip()
    status = gate_caption(text, prompt=config.prompt, truncated=not generation.finished, config=config)
    return record.model_copy(
        update={
            "caption_synthetic": text if status is RecaptionStatus.OK else None,
            "recaption_status": status,
        }
    )


# --------------------------------------------------------------------------- #
# Model loading and batched generation: plain Python + torch + transformers.


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


# --------------------------------------------------------------------------- #
# Beam adapters.


@dataclasses.dataclass
class PreparedExample:
    """A record and its processor outputs (token ids, pixel values: numpy
    arrays with a batch dim of 1). Lives only inside the fused recaption steps."""

    record: SampleRecord
    inputs: dict[str, np.ndarray]


class CaptionModelHandler(ModelHandler[PreparedExample, tuple[SampleRecord, Generation], Captioner]):
    """RunInference model handler: loads a `Captioner` once per worker process
    (or once per machine with `share_model_across_processes`, via Beam's
    multi_process_shared)
    and captions each batch with one greedy `generate()`."""

    def __init__(self, config: RecaptionConfig):
        super().__init__(**model_handler_kwargs(config.batching, config))
        self.config = config

    def load_model(self) -> Captioner:
        return Captioner.load(self.config)

    def run_inference(
        self, batch: Sequence[PreparedExample], model: Captioner, inference_args: dict[str, Any] | None = None
    ) -> Iterable[tuple[SampleRecord, Generation]]:
        generations = model.generate([example.inputs for example in batch])
        return list(zip([example.record for example in batch], generations))

    def get_num_bytes(self, batch: Sequence[PreparedExample]) -> int:
        return sum(array.nbytes for example in batch for array in example.inputs.values())

    def get_metrics_namespace(self) -> str:
        return f"{NAMESPACE}_inference"

    def get_resource_hints(self) -> dict:
        return resource_hints(self.config)


class PrepareDoFn(beam.DoFn):
    """Reads a record's staged image, decodes it and runs the processor. Records
    whose image cannot be read or decoded go to the `fallback` output with
    `recaption_status = unreadable_image`."""

    def __init__(self, config: RecaptionConfig):
        self.config = config
        self.unreadable = Metrics.counter(NAMESPACE, f"fallback_{RecaptionStatus.UNREADABLE_IMAGE.value}")

    def setup(self) -> None:
        self._processor = load_processor(self.config.model)
        self._prompt = format_prompt(self._processor, self.config)
        self._reader = ImageReader()

    def process(self, record: SampleRecord) -> Iterator[Any]:
        try:
            if record.image_ref is None:
                raise ValueError("the record has no image_ref")
            image = decode_rgb(self._reader.read(record.image_ref))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            LOG.warning("recaption: %s: cannot read its image: %s", record.key, err)
            self.unreadable.inc()
            yield beam.pvalue.TaggedOutput(
                FALLBACK,
                record.model_copy(update={"caption_synthetic": None, "recaption_status": RecaptionStatus.UNREADABLE_IMAGE}),
            )
            return
        inputs = self._processor(images=image, text=self._prompt, return_tensors="np")
        yield PreparedExample(record, {key: np.asarray(value) for key, value in inputs.items()})

    def teardown(self) -> None:
        reader = getattr(self, "_reader", None)
        if reader is not None:
            reader.close()


class GateDoFn(beam.DoFn):
    """Applies the quality gate to each generation and counts the outcome."""

    def __init__(self, config: RecaptionConfig):
        self.config = config
        self.captioned = Metrics.counter(NAMESPACE, "captioned")
        self.fallbacks = {
            status: Metrics.counter(NAMESPACE, f"fallback_{status.value}")
            for status in RecaptionStatus
            if status not in (RecaptionStatus.OK, RecaptionStatus.UNREADABLE_IMAGE)
        }
        self.generated_tokens = Metrics.distribution(NAMESPACE, "generated_tokens")

    def process(self, element: tuple[SampleRecord, Generation]) -> Iterator[SampleRecord]:
        record, generation = element
        updated = apply_generation(record, generation, self.config)
        self.generated_tokens.update(generation.num_tokens)
        if updated.recaption_status is RecaptionStatus.OK:
            self.captioned.inc()
        else:
            self.fallbacks[updated.recaption_status].inc()
        yield updated


class Recaption(beam.PTransform):
    """PCollection[SampleRecord] -> PCollection[SampleRecord]: every record,
    with `recaption_status` set and `caption_synthetic` set where the quality
    gate passed. Apply it to the selected samples only.

    The model path is validated when the transform is applied (pipeline
    construction), so a bad path fails before anything runs; call `validate()`
    to check it earlier. Resource hints from the config (`accelerator`,
    `min_ram`) are set on the whole composite; override them with
    `.with_resource_hints(...)`.
    """

    def __init__(self, config: RecaptionConfig, label: str | None = None):
        super().__init__(label)
        self.config = config
        self._validated = False
        hints = resource_hints(config)
        if hints:
            self.with_resource_hints(**hints)

    def validate(self) -> None:
        """Raise ValueError if the model or its processor cannot be loaded."""
        if not self._validated:
            validate_model(self.config)
            self._validated = True

    def expand(self, records: beam.PCollection[SampleRecord]) -> beam.PCollection[SampleRecord]:
        self.validate()
        prepared = records | "Prepare" >> beam.ParDo(PrepareDoFn(self.config)).with_outputs(FALLBACK, main="examples")
        generated = prepared.examples | "Generate" >> RunInference(CaptionModelHandler(self.config))
        gated = generated | "Gate" >> beam.ParDo(GateDoFn(self.config))
        return (gated, prepared[FALLBACK]) | "Merge" >> beam.Flatten()

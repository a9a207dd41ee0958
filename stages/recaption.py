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

The gate is `stages/core/caption_gate.py`; the model, its processor and batched
generation are `stages/models/captioner.py`; this module is the Beam wiring.

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

import dataclasses
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
from PIL import Image
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, RunInference

from schemas import RecaptionStatus, SampleRecord
from schemas.scoring import RecaptionConfig
from stages.core.caption_gate import Generation, apply_generation
from stages.core.decode import decode_rgb
from stages.inference import model_handler_kwargs, resource_hints
from stages.models.captioner import Captioner, format_prompt, load_processor
from stages.staging import ImageReader

LOG = logging.getLogger(__name__)

NAMESPACE = "recaption"
FALLBACK = "fallback"


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

    Building the graph reads no model file: the workers load the model in
    `setup()`/`load_model()`. Check the model folder before building the graph
    with `stages.models.captioner.validate_model` (`beam run curate` does, in
    `pipelines.scoring.check_models`, so a bad path is refused before any work
    starts). Resource hints from the config (`accelerator`, `min_ram`) are set
    on the whole composite; override them with `.with_resource_hints(...)`.
    """

    def __init__(self, config: RecaptionConfig, label: str | None = None):
        super().__init__(label)
        self.config = config
        hints = resource_hints(config)
        if hints:
            self.with_resource_hints(**hints)

    def expand(self, records: beam.PCollection[SampleRecord]) -> beam.PCollection[SampleRecord]:
        prepared = records | "Prepare" >> beam.ParDo(PrepareDoFn(self.config)).with_outputs(FALLBACK, main="examples")
        generated = prepared.examples | "Generate" >> RunInference(CaptionModelHandler(self.config))
        gated = generated | "Gate" >> beam.ParDo(GateDoFn(self.config))
        return (gated, prepared[FALLBACK]) | "Merge" >> beam.Flatten()

"""CLIP image-text similarity, and the image embedding the heads score.

`clip_similarity` is the cosine similarity between the L2-normalised open_clip
image embedding and the embedding of the alt text (`caption_original`), as in
LAION-400M/5B's `similarity` column (LAION-5B kept >= 0.28 under ViT-B/32).
The same forward pass gives the image embedding; the embedding heads
(`punsafe`, `pwatermark`, `aesthetic_score`: see `stages/safety.py`,
`stages/aesthetic.py`) run on it in the next, cheap step (`ApplyClipHeadsDoFn`),
so no image is encoded twice.

The embedding itself is not stored on the record: 512 floats per sample would
make `KEY.json` and `index.parquet` several times larger, tie them to one CLIP
model, and every score we select on is already derived from it. With
`emit_embeddings`, `ApplyClipHeadsDoFn` puts it (float16, L2-normalised, and
the caption's when asked) on a separate `embeddings` output instead, keyed by
sample key (`stages/embeddings.py`): the semantic dedup step and the
embeddings writer read that, and the records stay small.

The model is loaded exactly as users load it:
`open_clip.create_model_and_transforms(model, pretrained=...)` on the worker
(`ClipModelHandler.load_model`). Resize and crop run on CPU in the decode step
(`ClipPreparer`, uint8 output); scaling and normalisation run on the model's
device.

The model code (config checks, preprocessing, the scorer) is `stages/models/clip.py`, with
no Beam; this module holds the RunInference handler and the heads DoFn.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from schemas import SampleRecord
from schemas.scoring import ClipConfig, EmbeddingHeadConfig, ScoringConfig
from stages.inference import ScoringExample, ScoringHandlerMixin, model_handler_kwargs, resource_hints
from stages.models.clip import PIXELS, TOKENS, ClipOutput, ClipScorer, load_clip_scorer
from stages.models.heads import EmbeddingHead

LOG = logging.getLogger(__name__)

NAMESPACE = "clip_score"


class ClipModelHandler(ScoringHandlerMixin, ModelHandler[ScoringExample, PredictionResult, ClipScorer]):
    """RunInference handler: ScoringExample (with `clip_pixels`, `clip_tokens`)
    -> PredictionResult(example, ClipOutput)."""

    metrics_namespace = NAMESPACE

    def __init__(self, config: ClipConfig, scoring: ScoringConfig, preprocess: dict):
        super().__init__(**model_handler_kwargs(config.batching, scoring))
        self.config = config
        self.device_preference = scoring.device
        self.precision = scoring.precision
        self.cpu_threads = scoring.cpu_threads
        self.preprocess = preprocess
        self._hints = resource_hints(scoring)

    def load_model(self) -> ClipScorer:
        return load_clip_scorer(self.config, self.preprocess, self.device_preference, self.precision, self.cpu_threads)

    def run_inference(
        self, batch: Sequence[ScoringExample], model: ClipScorer, inference_args: dict[str, Any] | None = None
    ) -> Iterable[PredictionResult]:
        pixels = np.stack([example.inputs[PIXELS] for example in batch])  # [B, H, W, 3]
        tokens = np.stack([example.inputs[TOKENS] for example in batch])  # [B, L]
        similarity, embedding, text = model.score(pixels, tokens)
        return [
            PredictionResult(example, ClipOutput(float(s), e, t))
            for example, s, e, t in zip(batch, similarity, embedding, text)
        ]


class ApplyClipHeadsDoFn(beam.DoFn):
    """PredictionResult(example, ClipOutput) -> ScoringExample with
    `clip_similarity` and every head's score set on the record; the CLIP
    inputs and the embedding are dropped here.

    `heads` maps a SampleRecord score field to its head config. Scores are
    annotations only; `stages/select.py` applies the thresholds. With
    `emit_embeddings`, each sample's embedding also goes to the `embeddings`
    output as an `stages.embeddings.EmbeddingRow` tuple (with the caption's
    embedding when `text_embeddings`).
    """

    EMBEDDINGS = "embeddings"

    def __init__(
        self,
        heads: dict[str, EmbeddingHeadConfig],
        embed_dim: int,
        emit_embeddings: bool = False,
        text_embeddings: bool = False,
    ):
        unknown = set(heads) - set(SampleRecord.model_fields)
        if unknown:
            raise ValueError(f"no SampleRecord field for heads {sorted(unknown)}")
        self.heads = dict(heads)
        self.embed_dim = embed_dim
        self.emit_embeddings = emit_embeddings
        self.text_embeddings = text_embeddings
        self.similarity = Metrics.distribution(NAMESPACE, "clip_similarity_x1000")
        self.head_scores = {field: Metrics.distribution(NAMESPACE, f"{field}_x1000") for field in self.heads}

    def setup(self):
        self._heads = {field: EmbeddingHead.load(cfg, self.embed_dim) for field, cfg in self.heads.items()}

    def process(self, result: PredictionResult) -> Iterator[ScoringExample]:
        example: ScoringExample = result.example
        output: ClipOutput = result.inference
        scores = {"clip_similarity": output.similarity}
        for field, head in self._heads.items():
            scores[field] = float(head(output.embedding[None, :])[0])
        for field, value in scores.items():
            (self.similarity if field == "clip_similarity" else self.head_scores[field]).update(int(round(value * 1000)))
        inputs = {k: v for k, v in example.inputs.items() if k not in (PIXELS, TOKENS)}
        record = example.record.model_copy(update=scores)
        if self.emit_embeddings:
            from stages.embeddings import embedding_row

            text = output.text_embedding if self.text_embeddings else None
            yield beam.pvalue.TaggedOutput(self.EMBEDDINGS, embedding_row(record, output.embedding, text))
        yield ScoringExample(record, inputs)

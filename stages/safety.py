"""Safety scores: NudeNet's detector (`nsfw_score`) and two CLIP-embedding
heads (`punsafe`, `pwatermark`).

NudeNet 3.x ships a YOLOv8 detector (`320n.onnx`, 18 body-part classes) inside
the `nudenet` package. We run it with onnxruntime through our own
`ModelHandler` rather than `nudenet.NudeDetector`, to batch images, pick the
device, and reduce its boxes to one number per image:

    nsfw_score = max over candidate boxes and unsafe classes of the class confidence

(`NudeNetConfig.unsafe_classes`, default: exposed genitalia, breasts,
buttocks, anus). This is taken on the raw detector output, before NudeNet's
0.2 confidence floor and its class-agnostic NMS: whenever `NudeDetector.detect`
reports an unsafe box with score s, `nsfw_score >= s`, and an unsafe part
that a more confident overlapping box (a face, a covered part) would suppress
in NMS still counts. 0..1; a threshold sits in `SelectConfig.max_nsfw_score`.

Input: NudeNet's letterbox (pad right/bottom with black to a square, bilinear
resize to 320x320, scale to 0..1), fed in RGB order. nudenet 3.4.2's own
`_read_image` converts with `COLOR_RGBA2BGR` and then swaps again, so it feeds
BGR (notAI-tech/NudeNet#203); YOLOv8 models are trained on RGB.

`punsafe` and `pwatermark` come from heads on the CLIP image embedding
(LAION's CLIP-based NSFW detector and watermark scores play these roles);
their checkpoints are configured in `SafetyConfig` and run by
`stages.clip_score.ApplyClipHeadsDoFn`.

The detector code (config check, letterbox, scoring, loading) is `stages/models/nudenet.py`,
with no Beam; this module holds the RunInference handler and the DoFn that attaches the score.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from schemas.scoring import EmbeddingHeadConfig, NudeNetConfig, SafetyConfig, ScoringConfig
from stages.inference import ScoringExample, ScoringHandlerMixin, model_handler_kwargs, resource_hints
from stages.models.nudenet import NudeNetDetector, PIXELS, load_nudenet

LOG = logging.getLogger(__name__)

NAMESPACE = "safety"


def clip_heads(config: SafetyConfig | None) -> dict[str, EmbeddingHeadConfig]:
    """Record field -> head config for the safety heads on the CLIP embedding."""
    if config is None:
        return {}
    heads = {}
    if config.nsfw_head is not None:
        heads["punsafe"] = config.nsfw_head
    if config.watermark_head is not None:
        heads["pwatermark"] = config.watermark_head
    return heads


class NudeNetModelHandler(ScoringHandlerMixin, ModelHandler[ScoringExample, PredictionResult, NudeNetDetector]):
    """RunInference handler: ScoringExample (with `nudenet_pixels`) ->
    PredictionResult(example, nsfw_score)."""

    metrics_namespace = NAMESPACE

    def __init__(self, config: NudeNetConfig, scoring: ScoringConfig):
        super().__init__(**model_handler_kwargs(config.batching, scoring))
        self.config = config
        self.device_preference = scoring.device
        self.cpu_threads = scoring.cpu_threads
        self._hints = resource_hints(scoring)

    def load_model(self) -> NudeNetDetector:
        return load_nudenet(self.config, self.device_preference, self.cpu_threads)

    def run_inference(
        self, batch: Sequence[ScoringExample], model: NudeNetDetector, inference_args: dict[str, Any] | None = None
    ) -> Iterable[PredictionResult]:
        scores = model.score(np.stack([example.inputs[PIXELS] for example in batch]))
        return [PredictionResult(example, float(score)) for example, score in zip(batch, scores)]


class AttachNsfwScoreDoFn(beam.DoFn):
    """PredictionResult(example, nsfw_score) -> ScoringExample with
    `nsfw_score` on the record and the NudeNet input dropped."""

    def __init__(self):
        self.scores = Metrics.distribution(NAMESPACE, "nsfw_score_x1000")

    def process(self, result: PredictionResult) -> Iterator[ScoringExample]:
        example: ScoringExample = result.example
        self.scores.update(int(round(result.inference * 1000)))
        inputs = {k: v for k, v in example.inputs.items() if k != PIXELS}
        yield ScoringExample(example.record.model_copy(update={"nsfw_score": result.inference}), inputs)

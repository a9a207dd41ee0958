"""The model stages of `beam run curate`: scores -> selection -> recaption.

    Prepare     ParDo: staged bytes -> decoded once -> each model's uint8 input
    Clip        RunInference(ClipModelHandler): similarity + image embedding
    ClipHeads   ParDo: punsafe / pwatermark / aesthetic_score from the embedding;
                the embeddings leave on a side output (`ModelStages.embeddings`)
    NudeNet     RunInference(NudeNetModelHandler): nsfw_score
    Decontaminate  dedup.eval_sets by CLIP cosine (stages/decontaminate.py)
    SemanticDedup  dedup.semantic on those embeddings (stages/semantic_dedup.py)
    Select      ParDo: thresholds (the only step that drops on scores)
    Recaption   stages.recaption.Recaption on the selected samples

Prepare .. NudeNet carry the same resource hints (`scoring.accelerator`,
`scoring.min_ram`), so a runner fuses them into one stage on the accelerator
workers: pixels never cross a shuffle, and decoding overlaps inference across
bundles. Select has no hints (it is cheap and fuses with what follows).

Every model is off until configured (see `schemas/scoring.py`); with nothing
configured `ModelStages.enabled` is False and the curate pipeline skips it.
Building the graph reads no model file (the workers load them in `setup()` /
`load_model()`); `check_models` checks every model file the config names, and
`beam run curate` calls it before it builds the graph, so a missing or
unreadable checkpoint is refused before any work starts.
"""

from __future__ import annotations

import logging

import apache_beam as beam
from apache_beam.ml.inference.base import RunInference

from schemas import CurateConfig
from schemas.scoring import ScoringConfig, SelectConfig
from stages import aesthetic, clip_score, safety
from stages.models.clip import ClipPreparer, check_clip_config, check_heads, clip_embed_dim, preprocess_config
from stages.models.nudenet import NudeNetPreparer, check_nudenet_config
from stages.base import REJECTS
from stages.inference import PrepareImagesDoFn, ScoringExample, resource_hints
from stages.core.select import SCORE_FIELDS
from stages.select import apply_select

LOG = logging.getLogger(__name__)

UNSELECTED_DIR = "unselected"


class ScoringConfigError(ValueError):
    """The scoring/selection config cannot work; raised before the pipeline starts."""


def computed_scores(scoring: ScoringConfig) -> set[str]:
    """SampleRecord score fields the configured scorers fill in."""
    fields = set()
    if scoring.clip is not None:
        fields.add("clip_similarity")
    if scoring.safety is not None and scoring.safety.nudenet is not None:
        fields.add("nsfw_score")
    fields.update(safety.clip_heads(scoring.safety))
    fields.update(aesthetic.clip_heads(scoring.aesthetic))
    return fields


def check_thresholds(select: SelectConfig, available: set[str], where: str = "scoring") -> None:
    """Every enabled threshold must have its score computed."""
    missing = {name: SCORE_FIELDS[name] for name in select.thresholds() if SCORE_FIELDS[name] not in available}
    if missing:
        listing = ", ".join(f"select.{name} needs {field}" for name, field in sorted(missing.items()))
        raise ScoringConfigError(f"{listing}, which {where} does not compute; configure its scorer or unset it")


def check_models(config: CurateConfig) -> None:
    """The config-checking step `beam run curate` runs before it builds the graph:
    thresholds against the configured scorers, then every model file the run will
    load (the CLIP checkpoint against its architecture, each head against the
    embedding size, the NudeNet ONNX file and classes, the recaptioning model), so a
    bad path fails at once with the path and what to do, before any work starts.
    Raises ValueError (ClipConfigError, SafetyConfigError, ScoringConfigError)."""
    scoring: ScoringConfig = config.scoring
    check_thresholds(config.select, computed_scores(scoring))
    if scoring.clip is not None:
        embed_dim = check_clip_config(scoring.clip)
        heads = {**safety.clip_heads(scoring.safety), **aesthetic.clip_heads(scoring.aesthetic)}
        check_heads(heads, embed_dim)
    if scoring.safety is not None and scoring.safety.nudenet is not None:
        check_nudenet_config(scoring.safety.nudenet)
    if getattr(config, "recaption", None) is not None:
        from stages.models.captioner import validate_model

        validate_model(config.recaption)


def _strip(example: ScoringExample):
    """The record alone: model inputs never leave the scoring stage."""
    return example.record


class ScoreImages(beam.PTransform):
    """PCollection[SampleRecord with image_ref] -> (scored records, rejects).

    Scores only; nothing is dropped on a score here. Rejects are records whose
    staged bytes could not be read back. With `emit_embeddings` (needs CLIP),
    `self.embeddings` (after `expand`) holds one `stages.embeddings.EmbeddingRow`
    per scored sample (with the caption's embedding when `text_embeddings`).
    """

    def __init__(self, scoring: ScoringConfig, emit_embeddings: bool = False, text_embeddings: bool = False):
        super().__init__()
        self.scoring = scoring
        self.emit_embeddings = emit_embeddings and scoring.clip is not None
        self.text_embeddings = text_embeddings
        self.embeddings: beam.PCollection | None = None
        self.embed_dim = None
        self.preprocess = None
        if scoring.clip is not None:
            # From the architecture's config and open_clip's registry: no model file is read
            # here (`check_models` validates the files before the graph is built).
            self.embed_dim = clip_embed_dim(scoring.clip)
            self.preprocess = preprocess_config(scoring.clip)
        hints = resource_hints(scoring)
        if hints:
            self.with_resource_hints(**hints)

    def heads(self):
        return {**safety.clip_heads(self.scoring.safety), **aesthetic.clip_heads(self.scoring.aesthetic)}

    def expand(self, records):
        scoring = self.scoring
        nudenet = scoring.safety.nudenet if scoring.safety is not None else None
        preparers = []
        if scoring.clip is not None:
            preparers.append(ClipPreparer(scoring.clip, self.preprocess))
        if nudenet is not None:
            preparers.append(NudeNetPreparer(nudenet))
        prepared = records | "Prepare" >> beam.ParDo(PrepareImagesDoFn(preparers)).with_outputs(
            REJECTS, main="examples"
        )
        examples = prepared.examples
        if scoring.clip is not None:
            heads = clip_score.ApplyClipHeadsDoFn(
                self.heads(), self.embed_dim, self.emit_embeddings, self.text_embeddings
            )
            scored = (
                examples
                | "Clip" >> RunInference(clip_score.ClipModelHandler(scoring.clip, scoring, self.preprocess))
                | "ClipHeads" >> beam.ParDo(heads).with_outputs(heads.EMBEDDINGS, main="examples")
            )
            examples = scored.examples
            if self.emit_embeddings:
                self.embeddings = scored[heads.EMBEDDINGS]
        if nudenet is not None:
            examples = (
                examples
                | "NudeNet" >> RunInference(safety.NudeNetModelHandler(nudenet, scoring))
                | "AttachNsfwScore" >> beam.ParDo(safety.AttachNsfwScoreDoFn())
            )
        scored = examples | "ToRecords" >> beam.Map(_strip)
        return scored, prepared[REJECTS]


def _recaption_transform(config: CurateConfig):
    """stages.recaption.Recaption for `config.recaption`, or None when off."""
    recaption_config = getattr(config, "recaption", None)
    if recaption_config is None:
        return None
    from stages.recaption import Recaption

    return Recaption(recaption_config)


class ModelStages(beam.PTransform):
    """PCollection[SampleRecord] (after dedup, with image_ref) -> (kept, rejects).

    Scores every record with the configured models, applies the selection
    thresholds, and recaptions the selected ones. With `select.keep_unselected`,
    the records selection drops are also available as `self.unselected`
    (after `expand`), scores included and `image_ref` still set, for the
    curate pipeline to write with `WriteShards` under `DIR/unselected/`.

    With CLIP and `embeddings.enabled` or `dedup.semantic`, `self.embeddings`
    (after `expand`) holds every scored sample's `EmbeddingRow`, for
    `WriteEmbeddings`. `dedup.semantic` runs between scoring and selection,
    writing its centroids under `output_dir`.
    """

    def __init__(self, config: CurateConfig, output_dir: str | None = None):
        super().__init__()
        self.config = config
        self.output_dir = output_dir
        scoring: ScoringConfig = config.scoring
        check_thresholds(config.select, computed_scores(scoring))
        semantic_config = config.dedup.semantic
        if semantic_config is not None and scoring.clip is None:
            raise ScoringConfigError("dedup.semantic needs the CLIP embeddings: configure scoring.clip or unset it")
        self.semantic = None
        if semantic_config is not None:
            from stages.semantic_dedup import SemanticDedup

            self.semantic = SemanticDedup(semantic_config, output_dir)
        self.decontaminate = None
        if config.dedup.eval_sets and scoring.clip is not None and config.dedup.eval_cosine_threshold is not None:
            from stages.decontaminate import DecontaminateByEmbedding, eval_items

            self.decontaminate = DecontaminateByEmbedding(
                config.dedup,
                eval_items(config.dedup),
                scoring.clip,
                scoring,
                preprocess_config(scoring.clip),
            )
        emit = config.embeddings.enabled or self.semantic is not None or self.decontaminate is not None
        self.score = (
            ScoreImages(scoring, emit_embeddings=emit, text_embeddings=config.embeddings.text)
            if scoring.enabled
            else None
        )
        self.embeddings: beam.PCollection | None = None
        self.recaption = _recaption_transform(config)
        self.unselected: beam.PCollection | None = None
        if not self.enabled:
            LOG.info("model stages off: configure scoring.clip / scoring.safety / recaption to enable them")

    @property
    def enabled(self) -> bool:
        return self.score is not None or self.recaption is not None

    def expand(self, records):
        rejects = []
        if self.score is not None:
            records, score_rejects = records | "Score" >> self.score
            rejects.append(score_rejects)
            self.embeddings = self.score.embeddings
        if self.decontaminate is not None:
            # Before semantic dedup: a sample too close to an evaluation image cannot be a survivor.
            records, eval_rejects, self.embeddings = (records, self.embeddings) | "Decontaminate" >> self.decontaminate
            rejects.append(eval_rejects)
        if self.semantic is not None:
            records, semantic_rejects = (records, self.embeddings) | "SemanticDedup" >> self.semantic
            rejects.append(semantic_rejects)
        if self.config.select.thresholds():
            records, select_rejects, self.unselected = apply_select(
                records, "Select", self.config.select, emit_unselected=self.config.select.keep_unselected
            )
            rejects.append(select_rejects)
        if self.recaption is not None:
            records = records | "Recaption" >> self.recaption
        if not rejects:
            rejects.append(records.pipeline | "NoRejects" >> beam.Create([]))
        return records, tuple(rejects) | "ModelRejects" >> beam.Flatten()

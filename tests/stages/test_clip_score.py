"""CLIP similarity and the embedding heads, checked against open_clip used
directly (the way users load a model), and the config errors that must stop a
run before it starts."""

from __future__ import annotations

import pickle

import apache_beam as beam
import numpy as np
import open_clip
import pytest
import torch
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.test_pipeline import TestPipeline

from schemas import CurateConfig
from schemas.scoring import ClipConfig, EmbeddingHeadConfig, ScoringConfig
from stages.clip_score import ClipModelHandler
from stages.inference import ScoringExample
from stages.models.clip import (
    ClipConfigError,
    ClipPreparer,
    PIXELS,
    TOKENS,
    check_clip_config,
    preprocess_config,
)
from stages.models.heads import EmbeddingHead
from pipelines.testing.models import TINY_CLIP_NAME, save_embedding_head, save_tiny_clip
from pipelines.testing.images import make_images, staged_records
from tests.portable import portable_services, service_logs

# Scores only: the default `auto` thresholds would drop samples a tiny random model scores low.
SCORE_ONLY = {"min_clip_similarity": None, "max_nsfw_score": None, "max_punsafe": None}

CAPTIONS = ["a red circle", "a blue square on grass", "two dogs", "an empty street at night", "a cat"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(ClipConfig, nsfw head config, aesthetic head config) for a tiny model on disk."""
    directory = tmp_path_factory.mktemp("tiny_clip")
    config_path, weights = save_tiny_clip(directory, seed=1)
    save_embedding_head(directory / "nsfw.safetensors", [32, 16, 1], seed=4)
    save_embedding_head(directory / "aesthetic.pth", [32, 1], layout="linear", seed=5, bias=5.0)
    clip = ClipConfig(model=TINY_CLIP_NAME, pretrained=str(weights), model_config_path=str(config_path))
    nsfw = EmbeddingHeadConfig(path=str(directory / "nsfw.safetensors"), activation="relu", output="sigmoid")
    aesthetic = EmbeddingHeadConfig(path=str(directory / "aesthetic.pth"), output="identity")
    return clip, nsfw, aesthetic


def reference_scores(clip: ClipConfig, images, captions):
    """What a user gets from open_clip directly: cosine of normalised embeddings,
    and the normalised image embeddings."""
    model, _, preprocess = open_clip.create_model_and_transforms(clip.model, pretrained=clip.pretrained)
    model.eval()
    tokenizer = open_clip.get_tokenizer(clip.model)
    with torch.no_grad():
        image_emb = model.encode_image(torch.stack([preprocess(im) for im in images]))
        text_emb = model.encode_text(tokenizer(captions))
    image_emb = image_emb / image_emb.norm(dim=-1, keepdim=True)
    text_emb = text_emb / text_emb.norm(dim=-1, keepdim=True)
    return (image_emb * text_emb).sum(-1).numpy(), image_emb.numpy(), preprocess


def test_preprocess_config_matches_what_open_clip_attaches(tiny):
    clip, _, _ = tiny
    resolved = preprocess_config(clip)
    model = open_clip.create_model(clip.model, pretrained=clip.pretrained)
    attached = open_clip.model.get_model_preprocess_cfg(model)
    assert resolved["size"] == tuple(attached["size"]) == (32, 32)
    for key in ("mean", "std", "interpolation", "resize_mode", "fill_color"):
        assert tuple(np.atleast_1d(resolved[key])) == tuple(np.atleast_1d(attached[key])), key


def test_preprocess_config_takes_the_pretrained_tags_values():
    # A tag with non-default statistics: its mean/std must win over open_clip's defaults.
    tag = open_clip.pretrained.get_pretrained_cfg("ViT-B-16-SigLIP", "webli")
    resolved = preprocess_config(ClipConfig(model="ViT-B-16-SigLIP", pretrained="webli"))
    assert resolved["mean"] == tuple(tag["mean"]) != open_clip.OPENAI_DATASET_MEAN
    assert resolved["size"] == (224, 224)


def test_uint8_preparation_plus_device_normalisation_equals_open_clip(tiny):
    clip, _, _ = tiny
    images = make_images(3, size=48, seed=2) + [make_images(1, size=48, seed=3)[0].resize((80, 40))]
    _, _, preprocess = reference_scores(clip, images[:1], CAPTIONS[:1])
    handler = ClipModelHandler(clip, ScoringConfig(), preprocess_config(clip))
    scorer = handler.load_model()
    preparer = ClipPreparer(clip, preprocess_config(clip))
    preparer.setup()
    for image in images:
        pixels = preparer(image, _record("x"))[PIXELS]
        assert pixels.dtype == np.uint8 and pixels.shape == (32, 32, 3)
        ours = (torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255 - scorer.mean[0]) / scorer.std[0]
        np.testing.assert_allclose(ours.numpy(), preprocess(image).numpy(), atol=1e-5)


def _record(caption):
    from schemas import Provenance, SampleRecord

    return SampleRecord(key="x", url="http://x/y.jpg", caption_original=caption, provenance=Provenance(source_file="f", source_row=0))


def test_handler_scores_equal_open_clip_for_any_batch_split(tiny):
    clip, _, _ = tiny
    images = make_images(5, seed=7)
    want_similarity, want_embedding, _ = reference_scores(clip, images, CAPTIONS)
    handler = ClipModelHandler(clip, ScoringConfig(), preprocess_config(clip))
    pickle.loads(pickle.dumps(handler))
    scorer = handler.load_model()
    preparer = ClipPreparer(clip, preprocess_config(clip))
    preparer.setup()
    examples = [ScoringExample(_record(c), preparer(im, _record(c))) for im, c in zip(images, CAPTIONS)]
    assert examples[0].inputs[TOKENS].shape == (77,)
    for split in ([5], [1, 1, 1, 1, 1], [2, 3]):
        results, start = [], 0
        for size in split:
            results += handler.run_inference(examples[start : start + size], scorer)
            start += size
        np.testing.assert_allclose([r.inference.similarity for r in results], want_similarity, atol=1e-5)
        np.testing.assert_allclose(np.stack([r.inference.embedding for r in results]), want_embedding, atol=1e-5)
    assert handler.get_num_bytes(examples) == sum(e.inputs[PIXELS].nbytes + e.inputs[TOKENS].nbytes for e in examples)


def test_model_stages_write_clip_and_head_scores(tiny, tmp_path, monkeypatch):
    """End to end in Beam: staged bytes -> similarity and head scores on the
    record, with each image encoded once for the similarity and all three heads."""
    from pipelines.scoring import ModelStages

    encoded = []
    original_encode = open_clip.model.CLIP.encode_image

    def counting_encode(self, image, *args, **kwargs):
        encoded.append(image.shape[0])
        return original_encode(self, image, *args, **kwargs)

    clip, nsfw, aesthetic = tiny
    images = make_images(5, seed=11)
    records = staged_records(tmp_path, images, CAPTIONS, fmt="PNG")  # lossless: same pixels as the reference
    config = CurateConfig(
        scoring=ScoringConfig(
            clip=clip,
            safety={"nudenet": None, "nsfw_head": nsfw.model_dump(), "watermark_head": nsfw.model_dump()},
            aesthetic={"head": aesthetic.model_dump()},
        ),
        select=SCORE_ONLY,
    )
    out = tmp_path / "scored.jsonl"
    stages = ModelStages(config)
    monkeypatch.setattr(open_clip.model.CLIP, "encode_image", counting_encode)
    with TestPipeline(runner=FnApiRunner()) as p:
        kept, rejects = p | beam.Create(records) | stages
        _ = kept | beam.Map(lambda r: r.model_dump_json()) | beam.io.WriteToText(str(out), shard_name_template="")
    monkeypatch.undo()
    assert sum(encoded) == len(records)  # one image forward pass per sample, heads included
    from schemas import SampleRecord

    scored = {r.key: r for r in (SampleRecord.model_validate_json(line) for line in out.read_text().splitlines())}
    assert sorted(scored) == [r.key for r in records]

    want_similarity, want_embedding, _ = reference_scores(clip, images, CAPTIONS)
    nsfw_head, aesthetic_head = EmbeddingHead.load(nsfw, 32), EmbeddingHead.load(aesthetic, 32)
    for i, record in enumerate(records):
        got = scored[record.key]
        assert got.clip_similarity == pytest.approx(float(want_similarity[i]), abs=1e-5)
        assert got.punsafe == pytest.approx(float(nsfw_head(want_embedding[i : i + 1])[0]), abs=1e-5)
        assert got.pwatermark == got.punsafe  # same head configured twice
        assert got.aesthetic_score == pytest.approx(float(aesthetic_head(want_embedding[i : i + 1])[0]), abs=1e-5)
        assert got.nsfw_score is None  # NudeNet off
        assert got.image_ref == record.image_ref  # the shard writer still needs it
    assert len({round(r.clip_similarity, 6) for r in scored.values()}) == len(records)


def test_pt_checkpoint_loads_like_safetensors(tmp_path):
    config_path, weights = save_tiny_clip(tmp_path, seed=1, fmt="pt")
    clip = ClipConfig(model=TINY_CLIP_NAME, pretrained=str(weights), model_config_path=str(config_path))
    assert check_clip_config(clip) == 32
    scorer = ClipModelHandler(clip, ScoringConfig(), preprocess_config(clip)).load_model()
    assert not scorer.model.training


# ---------------------------------------------------------------- errors before the pipeline starts


def test_default_thresholds_apply_only_where_the_score_is_computed(tiny):
    clip, nsfw, _ = tiny
    assert CurateConfig().select.thresholds() == {}
    with_clip = CurateConfig(scoring=ScoringConfig(clip=clip, safety={"nsfw_head": nsfw.model_dump()}))
    assert with_clip.select.thresholds() == {"min_clip_similarity": 0.28, "max_nsfw_score": 0.5, "max_punsafe": 0.5}
    chosen = CurateConfig(scoring=ScoringConfig(clip=clip), select={"min_clip_similarity": 0.2})
    assert chosen.select.thresholds() == {"min_clip_similarity": 0.2}


def _curate(clip: ClipConfig, **scoring) -> CurateConfig:
    return CurateConfig(scoring=ScoringConfig(clip=clip, **scoring))


def test_bad_model_paths_fail_before_the_pipeline(tiny, tmp_path):
    from pipelines.scoring import check_models

    clip, nsfw, _ = tiny
    missing = clip.model_copy(update={"pretrained": str(tmp_path / "nope.safetensors")})
    with pytest.raises(ClipConfigError, match="nope.safetensors.*neither a pretrained tag"):
        check_models(_curate(missing))

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 definitely not safetensors")
    with pytest.raises(ClipConfigError, match="garbage.safetensors.*not a readable checkpoint"):
        check_models(_curate(clip.model_copy(update={"pretrained": str(garbage)})))

    wrong = tmp_path / "wrong.safetensors"
    save_embedding_head(wrong, [32, 1])  # a readable checkpoint of something else
    with pytest.raises(ClipConfigError, match="does not fit imagemill-tiny-clip: missing"):
        check_models(_curate(clip.model_copy(update={"pretrained": str(wrong)})))

    with pytest.raises(ClipConfigError, match="not an open_clip architecture"):
        check_models(_curate(ClipConfig(model="ViT-Nonexistent-7", pretrained=clip.pretrained)))

    with pytest.raises(ClipConfigError, match="model_config_path.*does not exist"):
        check_models(_curate(clip.model_copy(update={"model_config_path": str(tmp_path / "nope.json")})))

    with pytest.raises(ClipConfigError, match="neither a pretrained tag of ViT-B-32 .*laion2b_s34b_b79k"):
        check_models(_curate(ClipConfig(pretrained="laion2b_not_a_tag")))

    big_head = tmp_path / "big.safetensors"
    save_embedding_head(big_head, [512, 1])
    with pytest.raises(ClipConfigError, match="head for punsafe.*512-dim.*gives 32"):
        check_models(
            _curate(clip, safety={"nudenet": None, "nsfw_head": {"path": str(big_head), "output": "sigmoid"}})
        )


def test_default_config_names_the_laion_model_and_is_accepted_without_download():
    # The real default passes validation (its tag is known); the download happens on the workers.
    clip = ClipConfig()
    assert (clip.model, clip.pretrained) == ("ViT-B-32", "laion2b_s34b_b79k")
    assert check_clip_config(clip) == 512
    assert preprocess_config(clip)["size"] == (224, 224)


@pytest.mark.portable
@pytest.mark.slow  # ~1 min of worker start-up; the FnApiRunner tests above cover the same code in-process
def test_model_stages_on_the_portable_runner(portable_services, tiny, tmp_path):  # noqa: F811
    """Workers in other processes, with the project only from the staged sdist,
    unpickle the stages, register the tiny architecture from its config file,
    load CLIP, the heads and NudeNet, and give the same scores as open_clip here."""
    import sys

    from apache_beam.internal.cloudpickle import cloudpickle
    from apache_beam.runners.runner import PipelineState
    from apache_beam.testing.util import assert_that

    from pipelines.runner import create_runner, make_pipeline_options
    from pipelines.scoring import ModelStages

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the matcher below; workers cannot import tests
    clip, nsfw, _ = tiny
    images = make_images(4, seed=13)
    records = staged_records(tmp_path, images, CAPTIONS[:4], fmt="PNG")
    want, embeddings, _ = reference_scores(clip, images, CAPTIONS[:4])
    head = EmbeddingHead.load(nsfw, 32)
    expected = {
        r.key: (float(want[i]), float(head(embeddings[i : i + 1])[0])) for i, r in enumerate(records)
    }
    config = CurateConfig(scoring=ScoringConfig(clip=clip, safety={"nsfw_head": nsfw.model_dump()}), select=SCORE_ONLY)

    def check(scored):
        got = {r.key: r for r in scored}
        assert sorted(got) == sorted(expected), sorted(got)
        for key, (similarity, punsafe) in expected.items():
            assert abs(got[key].clip_similarity - similarity) < 1e-5, (key, got[key].clip_similarity, similarity)
            assert abs(got[key].punsafe - punsafe) < 1e-5
            assert 0.0 <= got[key].nsfw_score < 0.2

    options = make_pipeline_options(portable_services.argv)
    p = beam.Pipeline(runner=create_runner(options), options=options)
    kept, _ = p | beam.Create(records) | ModelStages(config)
    assert_that(kept, check)
    state = p.run().wait_until_finish(duration=300_000)
    assert state == PipelineState.DONE, service_logs(portable_services.workdir)

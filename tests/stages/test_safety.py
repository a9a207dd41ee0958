"""NudeNet through our own ModelHandler: the packaged 320n.onnx run with
onnxruntime on real (generated) images, its preprocessing checked against the
nudenet package, and the reduction of detections to one score per image."""

from __future__ import annotations

import pickle

import apache_beam as beam
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from schemas import CurateConfig, RejectReason
from schemas.scoring import DEFAULT_UNSAFE_CLASSES, NudeNetConfig, SafetyConfig, ScoringConfig
from stages.models.nudenet import (
    NUDENET_LABELS,
    NudeNetPreparer,
    SafetyConfigError,
    check_nudenet_config,
    letterbox,
    packaged_nudenet_model,
    unsafe_scores,
)
from stages.safety import NudeNetModelHandler, clip_heads
from pipelines.testing.images import make_images, staged_records

# Abstract blurred ellipses (no people at all) found by a black-box search that
# maximised the detector's unsafe output: 320n.onnx scores it ~0.73
# BUTTOCKS_EXPOSED. It stands in for an unsafe photo, which a test suite must
# not ship. Background RGB, then ellipses (x, y, w, h, r, g, b).
FLAGGED_BACKGROUND = (234, 143, 218)
FLAGGED_ELLIPSES = [
    (40, 249, 122, 100, 176, 174, 171),
    (0, 219, 90, 34, 203, 170, 224),
    (50, 53, 42, 111, 240, 162, 218),
    (137, 138, 92, 131, 255, 213, 190),
    (216, 126, 139, 133, 255, 187, 171),
    (251, 14, 22, 123, 255, 194, 138),
    (86, 237, 40, 129, 189, 201, 116),
    (9, 139, 46, 107, 242, 173, 101),
]


def flagged_image() -> Image.Image:
    image = Image.new("RGB", (320, 320), FLAGGED_BACKGROUND)
    draw = ImageDraw.Draw(image)
    for x, y, w, h, r, g, b in FLAGGED_ELLIPSES:
        draw.ellipse([x, y, x + w, y + h], fill=(r, g, b))
    return image.filter(ImageFilter.GaussianBlur(3))


@pytest.fixture(scope="module")
def detector():
    return NudeNetModelHandler(NudeNetConfig(), ScoringConfig()).load_model()


def test_labels_match_the_nudenet_package():
    from nudenet import nudenet

    assert NUDENET_LABELS == getattr(nudenet, "__labels")
    assert set(DEFAULT_UNSAFE_CLASSES) <= set(NUDENET_LABELS)


@pytest.mark.parametrize("shape", [(120, 200), (200, 120), (64, 64), (500, 333)])
def test_letterbox_equals_nudenets_preprocessing(shape):
    from nudenet import nudenet

    rgb = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    ours = letterbox(rgb, 320).transpose(2, 0, 1)[None].astype(np.float32) / 255.0
    # nudenet treats an array as BGR and hands the model the same channel order
    # it was given (issue #203), so an RGB array gives the RGB input we feed.
    theirs = nudenet._read_image(rgb, 320)[0]
    np.testing.assert_allclose(ours, theirs, atol=1e-6)


def test_reduction_takes_the_most_confident_unsafe_class_over_all_boxes():
    unsafe = [NUDENET_LABELS.index(c) for c in ("BUTTOCKS_EXPOSED", "ANUS_EXPOSED")]
    raw = np.zeros((3, 4 + len(NUDENET_LABELS), 5), dtype=np.float32)
    raw[:, :4, :] = 50.0  # box coordinates must not count
    face = 4 + NUDENET_LABELS.index("FACE_FEMALE")
    raw[0, face, :] = 0.99  # a confident safe class
    raw[0, 4 + unsafe[0], 2] = 0.31
    raw[1, 4 + unsafe[1], 4] = 0.8
    raw[1, 4 + unsafe[0], 0] = 0.6
    raw[1, face, 4] = 0.95  # the same box is more confidently a face: NudeNet's detect() would drop it
    np.testing.assert_allclose(unsafe_scores(raw, unsafe), [0.31, 0.8, 0.0])
    assert unsafe_scores(np.zeros((2, 22, 0)), unsafe).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="expected detector output"):
        unsafe_scores(np.zeros((2, 22)), unsafe)


def test_detector_flags_the_flagged_image_and_passes_benign_ones(detector):
    from nudenet import NudeDetector

    flagged = flagged_image()
    benign = make_images(3, size=256, seed=5)
    preparer = NudeNetPreparer(NudeNetConfig())
    pixels = np.stack([preparer(im, None)["nudenet_pixels"] for im in [flagged, *benign]])
    scores = detector.score(pixels)
    assert scores[0] > 0.5
    assert (scores[1:] < 0.2).all()

    # Cross-check with the nudenet package on the same pixels: every unsafe box
    # it reports scores at most our number, and it reports one for the flagged image.
    reference = NudeDetector()
    for image, score in zip([flagged, *benign], scores):
        detections = [d for d in reference.detect(np.asarray(image)) if d["class"] in DEFAULT_UNSAFE_CLASSES]
        assert all(d["score"] <= score + 1e-5 for d in detections)
        if image is flagged:
            assert detections and max(d["score"] for d in detections) == pytest.approx(score, abs=1e-4)
        else:
            assert not detections


def test_batched_equals_one_at_a_time(detector):
    preparer = NudeNetPreparer(NudeNetConfig())
    images = [flagged_image(), *make_images(3, size=200, seed=9)]
    pixels = np.stack([preparer(im, None)["nudenet_pixels"] for im in images])
    together = detector.score(pixels)
    alone = [detector.score(pixels[i : i + 1])[0] for i in range(len(images))]
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_pipeline_scores_and_selection_drops_unsafe(tmp_path):
    from pipelines.scoring import ModelStages

    images = [flagged_image(), *make_images(3, size=256, seed=5)]
    records = staged_records(tmp_path, images)  # JPEG, as crawled images are
    config = CurateConfig(scoring=ScoringConfig(safety=SafetyConfig()), select={"max_nsfw_score": 0.5})
    stages = ModelStages(config)
    pickle.loads(pickle.dumps(NudeNetModelHandler(NudeNetConfig(), ScoringConfig())))
    with TestPipeline(runner=FnApiRunner()) as p:
        kept, rejects = p | beam.Create(records) | stages
        assert_that(
            kept | beam.Map(lambda r: (r.key, r.nsfw_score is not None and r.nsfw_score < 0.2, r.clip_similarity)),
            equal_to([("k001", True, None), ("k002", True, None), ("k003", True, None)]),
        )
        assert_that(
            rejects | beam.Map(lambda r: (r.key, r.reason, r.score > 0.5, r.detail.startswith("nsfw_score 0."))),
            equal_to([("k000", RejectReason.UNSAFE, True, True)]),
            label="rejects",
        )


def test_config_errors(tmp_path):
    with pytest.raises(SafetyConfigError, match="nope.onnx.*does not exist"):
        check_nudenet_config(NudeNetConfig(model_path=str(tmp_path / "nope.onnx")))
    with pytest.raises(SafetyConfigError, match="unknown \\['NAKED'\\]"):
        check_nudenet_config(NudeNetConfig(unsafe_classes=["NAKED"]))
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not onnx")
    handler = NudeNetModelHandler(NudeNetConfig(model_path=str(garbage)), ScoringConfig())
    with pytest.raises(RuntimeError, match="could not load the NudeNet ONNX model .*garbage.onnx"):
        handler.load_model()
    assert packaged_nudenet_model().endswith("320n.onnx")


def test_clip_heads_mapping_and_their_need_for_clip():
    head = {"path": "h.safetensors", "output": "sigmoid"}
    assert clip_heads(None) == {}
    assert set(clip_heads(SafetyConfig(nsfw_head=head, watermark_head=head))) == {"punsafe", "pwatermark"}
    with pytest.raises(ValueError, match="safety.nsfw_head.*configure `scoring.clip`"):
        ScoringConfig(safety={"nsfw_head": head})

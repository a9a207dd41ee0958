"""trainer.lora_data: the image folder of `trainer lora`: set-aside images, captions
(files, trigger, recaptioning), aspect-ratio buckets and the batch plan."""

from __future__ import annotations

import numpy as np
import pytest

from schemas.lora import CaptionSource
from schemas.records import RecaptionStatus
from tests.trainer.lora_helpers import CONCEPT_RGB, TRIGGER, draw_shape, short_config
from trainer.lora_data import BatchPlan, make_buckets, nearest_bucket, prepare_dataset, without_word
from trainer.testing.shapes import SHAPES


def test_too_small_and_too_wide_images_are_set_aside_with_the_curation_reasons(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(10):
        draw_shape("circle", (220, 40, 40), CONCEPT_RGB, 48, 48, rng).save(folder / f"ok{i}.png")
    draw_shape("circle", (220, 40, 40), CONCEPT_RGB, 10, 12, rng).save(folder / "tiny.png")
    draw_shape("circle", (220, 40, 40), CONCEPT_RGB, 250, 50, rng).save(folder / "banner.png")
    report = prepare_dataset(folder, short_config(), resolution=32, multiple=8)
    aside = {row.file: row.reason for row in report.set_aside}
    assert aside == {"tiny.png": "too_small", "banner.png": "aspect_ratio"}
    assert len(report.images) == 10


def test_captions_from_files_trigger_fallback_and_hygiene(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, name in enumerate(["a", "b", "c", "d", "e"]):
        draw_shape(SHAPES[i % 3], (40, 70, 220), CONCEPT_RGB, 40 + 7 * i, 40, rng).save(folder / f"{name}.png")
    (folder / "a.txt").write_text("a dog   on the beach\n")
    (folder / "c.txt").write_text("  ")
    (folder / "d.txt").write_text("IMG_1234.jpg")
    (folder / "e.txt").write_text("ZXQ sitting")
    report = prepare_dataset(folder, short_config(holdout={"images": 0}), resolution=32, multiple=8)
    by_file = {i.file: i for i in report.images}
    assert by_file["a.png"].caption == f"{TRIGGER}, a dog on the beach" and by_file["a.png"].caption_source is CaptionSource.TXT
    assert by_file["b.png"].caption == TRIGGER and by_file["b.png"].caption_source is CaptionSource.TRIGGER
    assert by_file["c.png"].caption_source is CaptionSource.TRIGGER and "empty_caption" in by_file["c.png"].note
    assert by_file["d.png"].caption_source is CaptionSource.TRIGGER and "filename_caption" in by_file["d.png"].note
    assert by_file["e.png"].caption == "ZXQ sitting"  # already names the trigger
    assert any("b.png" in w and "c.png" in w and "d.png" in w for w in report.warnings)
    # Without a trigger word, uncaptioned images are an error that names them.
    with pytest.raises(ValueError, match=r"b\.png.*--trigger"):
        prepare_dataset(folder, short_config(trigger=None, prior={"weight": 0}), resolution=32, multiple=8)
    assert without_word(f"{TRIGGER}, a dog on the beach", TRIGGER) == "a dog on the beach"
    assert without_word(f"a red circle on a {TRIGGER} background", TRIGGER) == "a red circle on a background"


def test_recaption_model_captions_images_without_a_caption_file(tmp_path):
    from schemas.scoring import RecaptionConfig
    from pipelines.testing.models import save_tiny_llava
    from trainer.lora_data import load_recaptioner

    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(5):
        draw_shape("square", (40, 170, 60), CONCEPT_RGB, 40, 40 + 5 * i, rng).save(folder / f"img{i}.png")
    (folder / "img0.txt").write_text("a green square")
    model = save_tiny_llava(tmp_path / "llava", seed=0)
    # Gates off except `empty`: the random model's words are accepted as they come.
    lenient = load_recaptioner(RecaptionConfig(model=str(model), max_new_tokens=6, device="cpu", min_words=0, max_repeats=0, max_prompt_overlap=None, reject_truncated=False))
    calls = []

    def counting(image):
        calls.append(image.size)
        return lenient(image)

    report = prepare_dataset(folder, short_config(holdout={"images": 0}), resolution=32, multiple=8, recaptioner=counting)
    by_file = {i.file: i for i in report.images}
    assert by_file["img0.png"].caption_source is CaptionSource.TXT and len(calls) == 4
    for name in ("img1.png", "img2.png", "img3.png", "img4.png"):
        image = by_file[name]
        assert image.caption_source is CaptionSource.RECAPTION and image.recaption_status is RecaptionStatus.OK
        assert image.caption == f"{TRIGGER}, {image.generated_caption}" and image.generated_caption
    # A resumed run reuses what the model wrote instead of asking it again.
    known = {i.sha256: (i.generated_caption, i.recaption_status) for i in report.images if i.recaption_status}

    def must_not_run(image):
        raise AssertionError("the recaption model was asked again")

    again = prepare_dataset(folder, short_config(holdout={"images": 0}), resolution=32, multiple=8, recaptioner=must_not_run, known_captions=known)
    assert [i.caption for i in again.images] == [i.caption for i in report.images]
    # With the stage's default gate, 6 tokens without an end-of-sequence is `truncated`: the trigger stands in.
    strict = load_recaptioner(RecaptionConfig(model=str(model), max_new_tokens=6, device="cpu"))
    report = prepare_dataset(folder, short_config(holdout={"images": 0}), resolution=32, multiple=8, recaptioner=strict)
    fallback = {i.file: i for i in report.images}["img1.png"]
    assert fallback.caption == TRIGGER and fallback.recaption_status is RecaptionStatus.TRUNCATED
    assert fallback.caption_source is CaptionSource.TRIGGER and "truncated" in fallback.note and fallback.generated_caption


# ---- buckets and batches -----------------------------------------------------------------------


def test_buckets_cover_aspect_ratios_within_the_area():
    buckets = make_buckets(64, 8, 2.0)
    assert (64, 64) in buckets
    for width, height in buckets:
        assert width % 8 == 0 and height % 8 == 0 and width * height <= 64 * 64
        assert max(width / height, height / width) <= 2.0
    assert {b for b in buckets if b[0] > b[1]} == {(h, w) for w, h in buckets if h > w}
    assert nearest_bucket(300, 100, buckets)[0] > nearest_bucket(300, 100, buckets)[1]
    assert nearest_bucket(100, 100, buckets) == (64, 64)
    assert nearest_bucket(1000, 100, buckets) == max(buckets, key=lambda b: b[0] / b[1])  # wider than any: widest


def test_batch_plan_covers_every_image_each_epoch_and_resumes_by_position():
    plan = BatchPlan({(8, 8): [0, 1, 2, 3, 4], (16, 8): [5, 6], (8, 16): [7]}, batch_size=2, seed=3)
    assert plan.batches_per_epoch == 3 + 1 + 1
    for e in range(3):
        batches = plan.epoch(e)
        assert sorted({i for b in batches for i in b}) == list(range(8))
        assert all(len(b) == 2 for b in batches)
        assert [7, 7] in batches  # a one-image bucket repeats its image
    assert plan.epoch(0) != plan.epoch(1)
    stream = plan.stream()
    full = [next(stream) for _ in range(13)]
    resumed = plan.stream(start=7)
    assert [next(resumed) for _ in range(6)] == full[7:]

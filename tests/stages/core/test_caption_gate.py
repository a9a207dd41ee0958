"""stages.core.caption_gate: the recaption quality gate on crafted captions, and the record a
generation turns into."""

from __future__ import annotations

import pytest

from schemas import ImageRef, Provenance, RecaptionStatus, SampleRecord
from schemas.scoring import RecaptionConfig
from stages.core.caption_gate import Generation, apply_generation, gate_caption


S = RecaptionStatus
PROMPT = "Describe this image in one sentence."


def _record(i: int, ref: ImageRef | None) -> SampleRecord:
    return SampleRecord(
        key=f"{i:014d}", url=f"http://example.com/{i}.png", caption_original=f"alt text number {i}",
        provenance=Provenance(source_file="in.parquet", source_row=i), image_ref=ref, image_format="png",
    )


def _config(model: str, **overrides) -> RecaptionConfig:
    return RecaptionConfig(model=model, max_new_tokens=overrides.pop("max_new_tokens", 8), **overrides)


@pytest.mark.parametrize(
    ("text", "truncated", "expected"),
    [
        ("A brown dog running on a sunny beach.", False, S.OK),
        ("An image of a dog in a field", False, S.OK),  # 2 of 8 words are prompt words
        ("a very very good dog", False, S.OK),  # two in a row is not a loop
        ("", False, S.EMPTY),
        ("   \n ", False, S.EMPTY),
        ("... !?", False, S.EMPTY),
        ("Describe this image in one sentence.", False, S.PROMPT_ECHO),
        ("Sure. Describe this image in one sentence: a dog.", False, S.PROMPT_ECHO),  # contains the prompt
        ("this image, one sentence", False, S.PROMPT_ECHO),  # all words from the prompt
        ("a dog", False, S.TOO_SHORT),
        ("a cat on a mat on a mat on a mat", False, S.LOOPING),
        ("a dog dog dog in the park", False, S.LOOPING),
        ("hahahahahahaha a laughing child", False, S.LOOPING),  # character-level loop
        ("a red car parked near a house", True, S.TRUNCATED),
    ],
)
def test_gate_on_crafted_captions(text, truncated, expected):
    config = RecaptionConfig(model="unused")
    assert gate_caption(text, prompt=PROMPT, truncated=truncated, config=config) is expected


def test_each_gate_check_can_be_disabled():
    lenient = RecaptionConfig(
        model="unused", min_words=0, max_repeats=0, max_prompt_overlap=None, reject_truncated=False
    )
    for text in ["a dog", "a cat on a mat on a mat on a mat", "Describe this image in one sentence."]:
        assert gate_caption(text, prompt=PROMPT, truncated=True, config=lenient) is S.OK, text
    assert gate_caption(" ", prompt=PROMPT, truncated=False, config=lenient) is S.EMPTY  # never disabled


def test_gate_thresholds_are_the_configured_ones():
    five_repeats = "a cat cat cat cat cat here"
    assert gate_caption(five_repeats, prompt=PROMPT, truncated=False, config=RecaptionConfig(model="m", max_repeats=6)) is S.OK
    assert gate_caption(five_repeats, prompt=PROMPT, truncated=False, config=RecaptionConfig(model="m", max_repeats=5)) is S.LOOPING
    half_prompt = "this image shows a dog"  # 2 of 5 words from the prompt
    assert gate_caption(half_prompt, prompt=PROMPT, truncated=False, config=RecaptionConfig(model="m", max_prompt_overlap=0.5)) is S.OK
    assert gate_caption(half_prompt, prompt=PROMPT, truncated=False, config=RecaptionConfig(model="m", max_prompt_overlap=0.4)) is S.PROMPT_ECHO
    assert gate_caption("a dog runs", prompt=PROMPT, truncated=False, config=RecaptionConfig(model="m", min_words=4)) is S.TOO_SHORT


def test_gate_reports_the_first_failing_check():
    config = RecaptionConfig(model="unused")
    # Echo beats looping and truncation; looping beats truncation.
    assert gate_caption("describe this image " * 3, prompt=PROMPT, truncated=True, config=config) is S.PROMPT_ECHO
    assert gate_caption("a dog a dog a dog", prompt=PROMPT, truncated=True, config=config) is S.LOOPING


def test_config_rejects_unusable_gate_settings():
    with pytest.raises(ValueError, match="max_repeats"):
        RecaptionConfig(model="m", max_repeats=1)
    with pytest.raises(ValueError, match="placeholder"):
        RecaptionConfig(model="m", prompt_template="USER: <image> ASSISTANT:")


def test_apply_generation_keeps_the_alt_text_and_sets_synthetic_only_when_accepted():
    record = _record(1, None)
    config = RecaptionConfig(model="unused")
    good = apply_generation(record, Generation(" A dog on a beach. ", num_tokens=6, finished=True), config)
    assert (good.caption_synthetic, good.recaption_status, good.caption_original) == (
        "A dog on a beach.", S.OK, record.caption_original
    )
    cut = apply_generation(record, Generation("A dog on a beach", num_tokens=8, finished=False), config)
    assert (cut.caption_synthetic, cut.recaption_status, cut.caption_original) == (None, S.TRUNCATED, record.caption_original)

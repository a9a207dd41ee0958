"""stages.core.select: thresholds on stored scores and the reason a drop gets."""

from __future__ import annotations

import pytest

from schemas import Provenance, RejectReason, SampleRecord, Stage
from schemas.scoring import SelectConfig
from stages.core.select import CHECKS, MissingScoreError, drop_would_pass, select
from stages.core.verdict import Drop

SCORES = dict(clip_similarity=0.30, nsfw_score=0.05, punsafe=0.10, pwatermark=0.20, aesthetic_score=5.5)


def record(key="k", **scores) -> SampleRecord:
    return SampleRecord(
        key=key,
        url=f"http://x/{key}.jpg",
        caption_original="a cat on a mat",
        provenance=Provenance(source_file="in.parquet", source_row=0),
        **{**SCORES, **scores},
    )


def test_no_thresholds_keeps_everything_even_unscored():
    bare = SampleRecord(key="b", url="http://x", caption_original="c", provenance=Provenance(source_file="f", source_row=0))
    assert select(bare, SelectConfig()) is bare


@pytest.mark.parametrize(
    "threshold, value, field, reason",
    [
        ("min_clip_similarity", 0.30, "clip_similarity", RejectReason.LOW_CLIP_SIMILARITY),
        ("max_nsfw_score", 0.05, "nsfw_score", RejectReason.UNSAFE),
        ("max_punsafe", 0.10, "punsafe", RejectReason.UNSAFE),
        ("max_pwatermark", 0.20, "pwatermark", RejectReason.WATERMARK),
        ("min_aesthetic_score", 5.5, "aesthetic_score", RejectReason.LOW_AESTHETIC),
    ],
)
def test_each_check_is_inclusive_and_names_its_reason(threshold, value, field, reason):
    config = SelectConfig(**{threshold: value})
    assert isinstance(select(record(), config), SampleRecord)  # equal to the threshold: kept
    worse = value + 0.01 if threshold.startswith("max") else value - 0.01
    result = select(record(**{field: worse}), config)
    assert result == Drop(reason, result.detail, score=pytest.approx(worse))
    assert result.detail.startswith(field)


def test_first_failed_check_names_the_reason_and_detail_lists_all():
    config = SelectConfig(min_clip_similarity=0.28, max_pwatermark=0.5, max_punsafe=0.5, min_aesthetic_score=5)
    result = select(record(clip_similarity=0.1, pwatermark=0.9, aesthetic_score=4.0), config)
    assert result.reason is RejectReason.WATERMARK and result.score == pytest.approx(0.9)
    assert result.detail == "pwatermark 0.9000 > 0.5; clip_similarity 0.1000 < 0.28; aesthetic_score 4.0000 < 5"
    unsafe_first = select(record(clip_similarity=0.1, punsafe=0.7), config)
    assert unsafe_first.reason is RejectReason.UNSAFE
    assert [c.reason for c in CHECKS][:2] == [RejectReason.UNSAFE, RejectReason.UNSAFE]


def test_missing_score_is_an_error_not_a_pass():
    with pytest.raises(MissingScoreError, match="k: select.min_aesthetic_score is set but the record has no aesthetic_score"):
        select(record(aesthetic_score=None), SelectConfig(min_aesthetic_score=5))


def test_drop_would_pass_judges_the_check_that_dropped_it():
    from stages.core.verdict import rejection

    config = SelectConfig(min_clip_similarity=0.2, max_punsafe=0.5, max_nsfw_score=0.3)

    def dropped(**scores):
        return rejection(record(**scores), Stage.SELECT, select(record(**scores), SelectConfig(
            min_clip_similarity=0.28, max_punsafe=0.1, max_nsfw_score=0.1, max_pwatermark=0.5)))

    assert drop_would_pass(dropped(clip_similarity=0.25), config)
    assert not drop_would_pass(dropped(clip_similarity=0.15), config)
    assert drop_would_pass(dropped(punsafe=0.4), config)
    # nsfw_score 0.4 failed max_nsfw_score; it passes max_punsafe 0.5 but that is not its check.
    assert not drop_would_pass(dropped(nsfw_score=0.4), config)
    assert drop_would_pass(dropped(pwatermark=0.9), config)  # watermark check now disabled
    staging_lost = rejection(record(), Stage.SELECT, Drop(RejectReason.STAGING_LOST, "gone"))
    assert not drop_would_pass(staging_lost, config)
    earlier_stage = rejection(record(), Stage.DEDUP, Drop(RejectReason.EXACT_DUPLICATE, "dup", score=0.0))
    assert not drop_would_pass(earlier_stage, config)

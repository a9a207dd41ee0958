"""stages.select: selection in Beam, and the pieces `beam run select` uses to
read a finished output back."""

from __future__ import annotations

import io
import tarfile

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.util import assert_that, equal_to

from schemas import RejectReason, Stage
from schemas.scoring import ScoringConfig, SelectConfig
from stages.core.tario import index_tar
from stages.select import ReadShardRecordsDoFn, apply_select
from tests.stages.core.test_select import record


def test_thresholds_need_their_scorer():
    from pipelines.scoring import ScoringConfigError, check_thresholds, computed_scores

    nudenet_only = ScoringConfig(safety={})
    assert computed_scores(nudenet_only) == {"nsfw_score"}
    check_thresholds(SelectConfig(max_nsfw_score=0.5), computed_scores(nudenet_only))
    with pytest.raises(ScoringConfigError, match="select.min_clip_similarity needs clip_similarity"):
        check_thresholds(SelectConfig(min_clip_similarity=0.28), computed_scores(nudenet_only))


def test_select_in_beam_counts_and_emits_unselected():
    records = [record("a"), record("b", clip_similarity=0.1), record("c", punsafe=0.9), record("d")]
    config = SelectConfig(min_clip_similarity=0.2, max_punsafe=0.5)
    p = beam.Pipeline(runner=FnApiRunner())
    kept, rejects, unselected = apply_select(p | beam.Create(records), "Select", config, emit_unselected=True)
    assert_that(kept | beam.Map(lambda r: r.key), equal_to(["a", "d"]))
    assert_that(
        rejects | beam.Map(lambda r: (r.key, r.stage, r.reason)),
        equal_to([("b", Stage.SELECT, RejectReason.LOW_CLIP_SIMILARITY), ("c", Stage.SELECT, RejectReason.UNSAFE)]),
        label="rejects",
    )
    assert_that(unselected | beam.Map(lambda r: (r.key, r.punsafe)), equal_to([("b", 0.1), ("c", 0.9)]), label="unsel")
    result = p.run()
    result.wait_until_finish()
    counters = {
        c.key.metric.name: c.committed
        for c in result.metrics().query(MetricsFilter().with_namespace("select"))["counters"]
    }
    assert counters == {"kept": 2, "dropped_low_clip_similarity": 1, "dropped_unsafe": 1}


@pytest.mark.parametrize("variant", range(4))
def test_kept_and_unselected_batches_are_all_flushed(variant):
    """Beam 2.77's FnApiRunner fires the end-of-window timers of only one of two
    GroupIntoBatches fused in the same stage (which one depends on string
    hashing), losing the other's last partial batches. Both selection outputs
    feed shard writers (GroupIntoBatches), so apply_select separates them;
    varying the labels varies the hashing."""
    records = [record(f"k{i:02d}", clip_similarity=0.1 if i % 3 == 0 else 0.5) for i in range(20)]
    p = beam.Pipeline(runner=FnApiRunner())
    kept, _, unselected = apply_select(
        p | beam.Create(records), f"Select{variant}", SelectConfig(min_clip_similarity=0.2), emit_unselected=True
    )

    def batched_keys(pcoll, name):
        return (
            pcoll
            | f"{name}Key{variant}" >> beam.Map(lambda r: (hash(r.key) % 2, r.key))
            | f"{name}Batch{variant}" >> beam.GroupIntoBatches(4)  # 4 never divides a branch evenly
            | f"{name}Flat{variant}" >> beam.FlatMap(lambda kv: kv[1])
        )

    assert_that(batched_keys(kept, "Kept"), equal_to([r.key for r in records if r.clip_similarity > 0.2]))
    assert_that(
        batched_keys(unselected, "Unselected"),
        equal_to([r.key for r in records if r.clip_similarity < 0.2]),
        label="unselected",
    )
    p.run().wait_until_finish()


def _tar(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for key, members in samples:
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_tar_index_groups_by_key_prefix():
    data = _tar([("a.b", {"jpg": b"1", "json": b"{}"}), ("c", {"PNG": b"22", "txt": b"t", "json": b"{}"})])
    # WebDataset's key is the name up to the first dot: "a.b.jpg" is key "a", extension "b.jpg";
    # extensions are lower-cased.
    got = [(s.key, sorted(s.members)) for s in index_tar(io.BytesIO(data), "t.tar")]
    assert got == [("a", ["b.jpg", "b.json"]), ("c", ["json", "png", "txt"])]


def test_read_shard_records_points_into_the_tar(tmp_path):
    records = [record("s1", clip_similarity=0.4), record("s2", clip_similarity=0.5)]
    images = {"s1": b"\xff\xd8jpeg-bytes-1", "s2": b"\x89PNG-bytes-two"}
    kept = [r.model_copy(update={"status": "kept", "shard": "000000.tar", "caption": r.caption_original}) for r in records]
    path = tmp_path / "000000.tar"
    path.write_bytes(
        _tar([
            ("s1", {"jpg": images["s1"], "txt": b"a cat", "json": kept[0].model_dump_json().encode()}),
            ("s2", {"png": images["s2"], "txt": b"a cat", "json": kept[1].model_dump_json().encode()}),
        ])
    )
    got = list(ReadShardRecordsDoFn().process(str(path)))
    assert [r.key for r in got] == ["s1", "s2"]
    for r in got:
        assert r.status == "pending" and r.shard is None
        assert r.clip_similarity == {"s1": 0.4, "s2": 0.5}[r.key]
        with open(r.image_ref.path, "rb") as f:
            f.seek(r.image_ref.offset)
            assert f.read(r.image_ref.length) == images[r.key]
    bad = tmp_path / "bad.tar"
    bad.write_bytes(_tar([("x", {"jpg": b"1"})]))
    with pytest.raises(ValueError, match="bad.tar: sample x has no .json member"):
        list(ReadShardRecordsDoFn().process(str(bad)))

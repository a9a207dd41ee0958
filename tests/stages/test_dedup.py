"""stages.dedup: the Beam transform matches the in-memory plan; DoFns pickle."""

from __future__ import annotations

import pickle

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.internal import pickler
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from schemas import DedupConfig, Provenance, SampleRecord, Stage
from stages import dedup
from stages.core.dedup_plan import plan_dedup
from stages.dedup import Deduplicate
from tests.stages.dedup_helpers import BASE, chain_items, item, random_items, record


@pytest.mark.parametrize(
    "config",
    [
        DedupConfig(hamming_threshold=6, partitions_per_band=4, batch_size=97, key_partitions=7, max_survivor_rounds=3),
        DedupConfig(exact=False, hamming_threshold=4, partitions_per_band=2, batch_size=500, key_partitions=1),
        DedupConfig(near=False, batch_size=50, key_partitions=3),
    ],
    ids=["exact+near", "near-only", "exact-only"],
)
def test_deduplicate_transform_matches_plan(config):
    rng = np.random.default_rng(5)
    items = random_items(rng, 1200, config.hamming_threshold)
    records = [record(i) for i in items]
    plan = plan_dedup(items, config)
    assert plan, "the data must contain duplicates"
    expected_rejects = sorted((k, d.reason, d.survivor, d.detail) for k, d in plan.items())
    expected_kept = [r for r in records if r.key not in plan]
    with BeamTestPipeline(runner=FnApiRunner()) as p:
        out = p | beam.Create(records) | Deduplicate(config)
        assert_that(out.kept, equal_to(expected_kept), label="Kept")
        rows = out.rejects | beam.Map(lambda r: (r.key, r.reason.value, r.duplicate_of, r.detail))
        assert_that(rows, equal_to(expected_rejects), label="Rejects")
        meta = out.rejects | beam.Map(lambda r: (r.stage, r.source_file, r.url == f"https://example.com/{r.key}.jpg"))
        assert_that(meta | beam.Distinct(), equal_to([(Stage.DEDUP, "part-0.parquet", True)]), label="Meta")


def test_deduplicate_in_separate_worker_processes():
    # The DoFns are pickled to SDK worker subprocesses, as on a portable runner.
    rng = np.random.default_rng(9)
    items = random_items(rng, 300, 6)
    config = DedupConfig(batch_size=50, key_partitions=5, partitions_per_band=4)
    expected = sorted((k, d.reason, d.survivor) for k, d in plan_dedup(items, config).items())
    options = PipelineOptions(flags=[], direct_num_workers=2, direct_running_mode="multi_processing")
    with BeamTestPipeline(runner=FnApiRunner(), options=options) as p:
        out = p | beam.Create([record(i) for i in items]) | Deduplicate(config)
        assert_that(out.rejects | beam.Map(lambda r: (r.key, r.reason.value, r.duplicate_of)), equal_to(expected))


def test_deduplicate_disabled_passes_everything():
    items = [item("a", 100, "s", BASE), item("b", 100, "s", BASE)]
    records = [record(i) for i in items]
    with BeamTestPipeline(runner=FnApiRunner()) as p:
        out = p | beam.Create(records) | Deduplicate(DedupConfig(exact=False, near=False))
        assert_that(out.kept, equal_to(records), label="Kept")
        assert_that(out.rejects, equal_to([]), label="Rejects")


def test_long_chain_resolves_to_its_root_in_beam():
    items = chain_items(15)  # 14 links: 4 rounds resolve up to 15
    config = DedupConfig(hamming_threshold=6, max_survivor_rounds=4, batch_size=4, key_partitions=3)
    assert {d.survivor for d in plan_dedup(items, config).values()} == {"k00"}
    with BeamTestPipeline(runner=FnApiRunner()) as p:
        out = p | beam.Create([record(i) for i in items]) | Deduplicate(config)
        rows = out.rejects | beam.Map(lambda r: (r.key, r.duplicate_of))
        assert_that(rows, equal_to([(i.key, "k00") for i in items[1:]]))


def test_unresolved_chain_is_rejected_without_a_survivor():
    items = chain_items(5)
    config = DedupConfig(hamming_threshold=6, max_survivor_rounds=1)
    plan = plan_dedup(items, config)
    assert plan["k01"].survivor == "k00" and plan["k04"].survivor is None
    with BeamTestPipeline(runner=FnApiRunner()) as p:
        out = p | beam.Create([record(i) for i in items]) | Deduplicate(config)
        rows = out.rejects | beam.Map(lambda r: (r.key, r.duplicate_of, "raise max_survivor_rounds" in r.detail))
        expected = [("k01", "k00", False), ("k02", None, True), ("k03", None, True), ("k04", None, True)]
        assert_that(rows, equal_to(expected))


def test_duplicate_keys_fail_loudly():
    records = [record(item("k1", 100, "s1", BASE)), record(item("k1", 100, "s2", "0f0f0f0f0f0f0f0f"))]
    with pytest.raises(Exception, match="keys must be unique"):
        with BeamTestPipeline(runner=FnApiRunner()) as p:
            _ = p | beam.Create(records) | Deduplicate(DedupConfig())


def test_records_travel_as_exact_json():
    full = SampleRecord(
        key="000003-0000017",
        url="https://example.com/a.jpg",
        caption_original="a red kite over a beach",
        caption_synthetic="a kite",
        caption="a kite",
        declared_width=800,
        declared_height=600,
        original_width=1600,
        original_height=1200,
        width=512,
        height=384,
        image_format="jpg",
        image_bytes=12345,
        image_sha256="ab" * 32,
        phash=BASE,
        clip_similarity=0.3141592653589793,
        nsfw_score=1e-7,
        aesthetic_score=5.5,
        provenance=Provenance(
            source_file="s3://bucket/part-00003.parquet",
            source_row=17,
            final_url="https://cdn.example.com/a.jpg",
            http_status=200,
            content_type="image/jpeg",
            fetched_at="2024-05-01T12:34:56.789+02:00",
            pipeline_version="0.1.0",
        ),
        image_ref={"path": "/staging/0.bin", "offset": 10, "length": 99},
    )
    sparse = record(item("k7", 100, None, None))
    for original in (full, sparse):
        key, record_json, sha, neg_pixels, phash = dedup._row(original)
        assert SampleRecord.model_validate_json(record_json) == original
        assert (key, sha, neg_pixels, phash) == (original.key, original.image_sha256, -original.pixels, original.phash)
    with pytest.raises(ValueError, match="'k7'.*not 16 hex digits"):
        dedup._row(sparse.model_copy(update={"phash": "xyz"}))


def test_dofns_pickle():
    config = DedupConfig()
    dofns = [
        dedup._Split(True, True, config.key_partitions),
        dedup._Chunk("record", 0, config.key_partitions),
        dedup._ExactSurvivors(),
        dedup._BandChunks(config.hamming_threshold, config.partitions_per_band),
        dedup._NearPairs(config.hamming_threshold, config.partitions_per_band),
        dedup._NearLink(config.hamming_threshold),
        dedup._Jump(),
        dedup._Unresolved(3),
        dedup._Join(),
    ]
    for dofn in dofns:
        assert type(pickle.loads(pickle.dumps(dofn))) is type(dofn)
        assert type(pickler.loads(pickler.dumps(dofn))) is type(dofn)
    assert pickler.loads(pickler.dumps(Deduplicate(config))).config == config

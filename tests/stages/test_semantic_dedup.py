"""Semantic dedup and the embeddings output, end to end through the real CLIP
path (open_clip's `create_model_and_transforms` on a tiny model the test
builds): planted groups of copies are found, the survivor rule holds, every
drop is a reject row naming its survivor, nothing is lost, and the embeddings
read back with numpy, pyarrow and faiss."""

from __future__ import annotations

import json
import sys

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
import pytest
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.test_pipeline import TestPipeline

from schemas import CurateConfig, Rejection, SampleRecord
from schemas.scoring import ClipConfig, ScoringConfig
from stages.core.semantic_groups import rank
from stages.embeddings import EMBEDDINGS_DIR, TEXT_DIR
from tests.portable import portable_services, service_logs  # noqa: F401  (fixture)
from tests.stages.semantic_fixtures import PIXEL_CLIP_NAME, planted, reference_embeddings, save_pixel_clip, stage

THRESHOLD = 0.9
# Scores only: selection thresholds are not what this tests.
SCORE_ONLY = {"min_clip_similarity": None, "max_nsfw_score": None, "max_punsafe": None}


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    config_path, weights = save_pixel_clip(tmp_path_factory.mktemp("pixel_clip"))
    return ClipConfig(model=PIXEL_CLIP_NAME, pretrained=str(weights), model_config_path=str(config_path))


@pytest.fixture(scope="module")
def items():
    return planted(groups=4, singles=4, seed=0)


@pytest.fixture(scope="module")
def reference(clip, items):
    """open_clip directly: per key (clip_similarity, image embedding, text embedding)."""
    captions = [f"a picture called {key}" for key, _, _ in items]
    similarity, image, text = reference_embeddings(clip, [im for _, im, _ in items], captions)
    return {key: (float(similarity[i]), image[i], text[i]) for i, (key, _, _) in enumerate(items)}


def expected_drops(items, reference) -> dict[str, str]:
    """key -> survivor for every planted copy but the best of its group, after
    checking that the reference embeddings put exactly the planted groups
    above the threshold (so a failure below is the pipeline's, not the fixture's)."""
    keys = [k for k, _, _ in items]
    group_of = {k: g for k, _, g in items}
    x = np.stack([reference[k][1] for k in keys])
    sims = x @ x.T
    for i, a in enumerate(keys):
        for j in range(i):
            b = keys[j]
            planted_pair = group_of[a] is not None and group_of[a] == group_of[b]
            assert (sims[i, j] >= THRESHOLD) == planted_pair, (a, b, sims[i, j])
    pixels = {k: im.width * im.height for k, im, _ in items}
    drops = {}
    for g in {g for g in group_of.values() if g is not None}:
        members = [k for k in keys if group_of[k] == g]
        survivor = min(members, key=lambda k: rank(reference[k][0], pixels[k], k))
        drops.update({k: survivor for k in members if k != survivor})
    return drops


def semantic_config(clip, **dedup) -> CurateConfig:
    return CurateConfig(
        scoring=ScoringConfig(clip=clip),
        select=SCORE_ONLY,
        dedup={"semantic": {"threshold": THRESHOLD, "clusters": 3, "sample_size": 100, **dedup}},
        embeddings={"text": True, "partitions": 3},
    )


def run_stages(p, records, config, out):
    from pipelines.scoring import ModelStages
    from stages.embeddings import WriteEmbeddings
    from stages.shards import WriteShards

    stages = ModelStages(config, str(out))
    kept, rejects = p | beam.Create(records) | stages
    written, _, _ = kept | WriteShards(str(out), config.shards, {"curate": {}})
    (written, stages.embeddings) | WriteEmbeddings(str(out), config.embeddings)
    return written, rejects


def test_planted_groups_survivors_rejects_and_embeddings_layout(clip, items, reference, tmp_path):
    records = stage(tmp_path / "staging", items)
    drops = expected_drops(items, reference)
    assert len(drops) == 4 * 4  # four copies per group lose
    out = tmp_path / "out"
    config = semantic_config(clip)
    with TestPipeline(runner=FnApiRunner()) as p:
        written, rejects = run_stages(p, records, config, out)
        written | "Kept" >> beam.Map(lambda r: r.key) | "WriteKept" >> beam.io.WriteToText(str(tmp_path / "kept"), shard_name_template="")
        rejects | "Json" >> beam.Map(lambda r: r.model_dump_json()) | beam.io.WriteToText(str(tmp_path / "rejects"), shard_name_template="")

    kept = set((tmp_path / "kept").read_text().split())
    rejected = {r.key: r for r in map(Rejection.model_validate_json, (tmp_path / "rejects").read_text().splitlines())}
    # Accounting: every input row is kept or rejected, once.
    assert kept.isdisjoint(rejected) and kept | set(rejected) == {r.key for r in records}
    assert {k: r.duplicate_of for k, r in rejected.items()} == drops
    survivors = set(drops.values())
    assert survivors <= kept and len(survivors) == 4
    assert {k for k, _, g in items if g is None} <= kept  # unrelated, same colours included
    for key, reject in rejected.items():
        assert (reject.stage.value, reject.reason.value) == ("dedup", "semantic_duplicate")
        assert reject.score >= THRESHOLD and f">= {THRESHOLD:g} to " in reject.detail
        neighbour = reject.detail.split(" to ", 1)[1].split(";")[0]
        want = float(reference[key][1] @ reference[neighbour][1])
        assert reject.score == pytest.approx(want, abs=2e-3)  # float16 embeddings
        assert reject.source_file == "input.parquet"

    # Centroids saved for a later run; embeddings in the autofaiss / clip-retrieval layout.
    centroids = np.load(out / "semantic" / "centroids.npy")
    assert centroids.shape == (3, 64)
    folder = out / EMBEDDINGS_DIR
    npys = sorted(folder.glob("img_emb_*.npy"))
    assert npys and not list(folder.glob("*.partial"))
    keys, vectors = [], []
    for npy in npys:
        number = npy.stem.rsplit("_", 1)[1]
        image = np.load(npy)
        table = pq.read_table(folder / f"metadata_{number}.parquet")
        text = np.load(folder / TEXT_DIR / f"text_emb_{number}.npy")
        assert image.dtype == np.float16 and image.shape == text.shape == (table.num_rows, 64)
        rows = table.to_pylist()
        for row, vector, text_vector in zip(rows, image, text):
            key = row["key"]
            np.testing.assert_allclose(vector, reference[key][1], atol=2e-3)  # row order matches the metadata
            np.testing.assert_allclose(text_vector, reference[key][2], atol=2e-3)
            assert row["url"] == f"http://example.test/{key}.png" and row["caption"] == f"a picture called {key}"
            assert row["clip_similarity"] == pytest.approx(reference[key][0], abs=1e-5)
            assert row["shard"].endswith(".tar")
        np.testing.assert_allclose(np.linalg.norm(image.astype(np.float32), axis=1), 1.0, atol=2e-3)
        keys += [r["key"] for r in rows]
        vectors.append(image)
    assert sorted(keys) == sorted(kept)

    import faiss

    matrix = np.concatenate(vectors).astype(np.float32)
    index = faiss.IndexFlatIP(matrix.shape[1])
    index.add(matrix)
    _, nearest = index.search(matrix, 1)
    assert nearest[:, 0].tolist() == list(range(len(matrix)))


def test_oversized_clusters_are_split_with_the_same_result(items, reference, tmp_path):
    """The reference embeddings in one cluster with a bound of 8 embeddings per
    worker: blocks of 2 on average, every block pair compared, the same drops.
    (With blocks this small their spread is large: the bound itself is checked
    at scale in tests/stages/core/test_semantic.py and the benchmark.)"""
    from apache_beam.metrics.metric import MetricsFilter
    from apache_beam.testing.util import assert_that, equal_to

    from schemas.config import SemanticDedupConfig
    from stages.semantic_dedup import SemanticDecisions

    drops = expected_drops(items, reference)
    rows = [
        (key, reference[key][0], image.width * image.height, reference[key][1].astype(np.float16).tobytes(), b"")
        for key, image, _ in items
    ]
    config = SemanticDedupConfig(threshold=THRESHOLD, clusters=1, max_cluster_size=8, batch_rows=3)
    p = TestPipeline(runner=FnApiRunner())
    decisions = p | beam.Create(rows) | SemanticDecisions(config)
    assert_that(decisions | beam.Map(lambda kv: (kv[0], kv[1][1])), equal_to(sorted(drops.items())))
    result = p.run()
    result.wait_until_finish()
    metrics = result.metrics().query(MetricsFilter().with_namespace("semantic_dedup"))
    block_rows = [d.committed for d in metrics["distributions"] if d.key.metric.name == "block_rows"][0]
    assert 16 < block_rows.count <= 16 * 17 // 2  # 32 embeddings in 16 blocks: at most 136 block pairs
    assert block_rows.mean <= 8
    compared = sum(c.committed for c in metrics["counters"] if c.key.metric.name == "pairs_compared")
    n = len(rows)
    assert compared == n * (n - 1) // 2  # split, yet every pair of the cluster compared exactly once


def test_semantic_dedup_needs_clip():
    from pipelines.scoring import ModelStages, ScoringConfigError

    with pytest.raises(ScoringConfigError, match="dedup.semantic needs the CLIP embeddings"):
        ModelStages(CurateConfig(dedup={"semantic": {}}, scoring={"safety": {"nsfw_head": None}}))


@pytest.mark.portable
@pytest.mark.slow  # ~1 min of worker start-up; the FnApiRunner test above covers the same code in-process
def test_semantic_dedup_on_the_portable_runner(portable_services, clip, items, reference, tmp_path):  # noqa: F811
    from apache_beam.internal.cloudpickle import cloudpickle
    from apache_beam.runners.runner import PipelineState
    from apache_beam.testing.util import assert_that

    from pipelines.runner import create_runner, make_pipeline_options

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    small = [item for item in items if item[0].startswith(("g0", "u0", "s0"))]
    records = stage(tmp_path / "staging", small)
    drops = expected_drops(small, reference)
    assert len(drops) == 4

    def check(rejections):
        got = {r.key: r.duplicate_of for r in rejections}
        assert got == drops, got

    options = make_pipeline_options(portable_services.argv)
    p = beam.Pipeline(runner=create_runner(options), options=options)
    written, rejects = run_stages(p, records, semantic_config(clip, clusters=2), tmp_path / "out")
    assert_that(rejects, check)
    state = p.run().wait_until_finish(duration=300_000)
    assert state == PipelineState.DONE, service_logs(portable_services.workdir)
    keys = [k for npy in (tmp_path / "out" / EMBEDDINGS_DIR).glob("metadata_*.parquet") for k in pq.read_table(npy)["key"].to_pylist()]
    assert sorted(keys) == sorted(set(r.key for r in records) - set(drops))


def test_a_group_across_a_cluster_boundary_on_beam(tmp_path):
    """The chain g1 ~ g2 ~ g3 ~ g4 of tests/stages/core/test_semantic.py,
    whose middle pair k-means splits (saved centroids e0 and e1): the stage
    finds the whole group of four across both clusters, with one survivor."""
    from apache_beam.metrics.metric import MetricsFilter
    from apache_beam.testing.util import assert_that, equal_to

    from schemas.config import SemanticDedupConfig
    from stages.semantic_dedup import SemanticDecisions
    from tests.stages.core.test_semantic import _chain_across_the_boundary

    keys, x, clip, pixels, centroids = _chain_across_the_boundary()
    np.save(tmp_path / "centroids.npy", centroids)
    rows = [(k, c, p, v.astype(np.float16).tobytes(), b"") for k, v, c, p in zip(keys, x, clip, pixels)]
    config = SemanticDedupConfig(threshold=0.95, centroids=str(tmp_path / "centroids.npy"))
    p = TestPipeline(runner=FnApiRunner())
    decisions = p | beam.Create(rows) | SemanticDecisions(config)
    assert_that(
        decisions | beam.Map(lambda kv: (kv[0], kv[1][1], kv[1][2], kv[1][4])),
        equal_to([("g1", "g4", "g2", 4), ("g2", "g4", "g3", 4), ("g3", "g4", "g2", 4)]),
    )
    result = p.run()
    result.wait_until_finish()
    counters = {
        c.key.metric.name: c.committed
        for c in result.metrics().query(MetricsFilter().with_namespace("semantic_dedup"))["counters"]
    }
    assert counters["boundary_assignments"] == 2  # g2 joins e1's cluster, g3 joins e0's
    # Cluster e0 groups {g1, g2, g3}, cluster e1 {g2, g3, g4}: g2 and g3 join the two.
    assert counters["members_in_several_clusters"] == 2


def test_the_k_means_sample_does_not_depend_on_bundles():
    """The `size` rows with the smallest key hashes, sorted by key, however
    the batches are split into accumulators and merged."""
    from stages.embeddings import partition_of
    from stages.semantic_dedup import _Sample

    rng = np.random.default_rng(0)
    keys = [f"key{i:04d}" for i in range(300)]
    x = rng.standard_normal((300, 4)).astype(np.float16)
    batches = [(keys[i : i + 17], [None] * 17, np.ones(17), x[i : i + 17]) for i in range(0, 300, 17)]
    want = sorted(sorted(range(300), key=lambda i: (partition_of(keys[i], 2**32), keys[i]))[:40], key=keys.__getitem__)
    sample = _Sample(40)

    def combined(groups):
        accumulators = []
        for group in groups:
            acc = sample.create_accumulator()
            for batch in group:
                acc = sample.add_input(acc, batch)
            accumulators.append(acc)
        return sample.extract_output(sample.merge_accumulators(accumulators))

    for groups in ([batches], [batches[::-1]], [[b] for b in batches], [batches[:3], batches[3:9], batches[9:]]):
        got_keys, got_x = combined(groups)
        assert got_keys == [keys[i] for i in want]
        np.testing.assert_array_equal(got_x, x[want])
    assert combined([[]])[0] == []

"""Decontamination: crawl samples that are re-encoded, resized or cropped
copies of evaluation images are rejected `eval_overlap` naming the set and
item, and nothing else is; evaluation sets as a folder, a WebDataset tar and
a parquet file; the broadcast and the join give the same answer."""

from __future__ import annotations

import io
import tarfile

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.test_pipeline import TestPipeline

from schemas import CurateConfig, Rejection
from schemas.config import DedupConfig
from schemas.scoring import ClipConfig, ScoringConfig
from stages.core.eval_sets import EvalSetError, list_items, parse_spec
from stages.decontaminate import DecontaminateByPhash, eval_items
from stages.core.phash import compute_phash, hamming
from tests.stages.semantic_fixtures import (
    PIXEL_CLIP_NAME,
    cropped,
    planted,
    reencoded,
    reference_embeddings,
    resized,
    save_pixel_clip,
    stage,
)

COSINE = 0.9  # the threshold that separates the planted groups of this tiny model (see test_semantic_dedup)
SCORE_ONLY = {"min_clip_similarity": None, "max_nsfw_score": None, "max_punsafe": None}


def _bytes(image, fmt):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(eval set specs, crawl items, {crawl key: expected eval item})."""
    root = tmp_path_factory.mktemp("eval")
    pool = {key: image for key, image, _ in planted(groups=4, singles=4, seed=0)}
    # Three evaluation sets: a folder, a WebDataset tar, a parquet file.
    (root / "folder" / "sub").mkdir(parents=True)
    (root / "folder" / "sub" / "a.jpg").write_bytes(_bytes(pool["g0-original"], "JPEG"))
    (root / "folder" / "b.png").write_bytes(_bytes(pool["s0"], "PNG"))
    (root / "folder" / "notes.txt").write_text("not an image")
    with tarfile.open(root / "wds.tar", "w") as tar:
        for key, image in [("000001", pool["g1-original"]), ("000002", pool["s1"])]:
            for name, data in [(f"{key}.png", _bytes(image, "PNG")), (f"{key}.txt", b"a caption")]:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    pq.write_table(
        pa.table({"id": ["x7"], "image": [{"bytes": _bytes(pool["g2-original"], "PNG"), "path": "x7.png"}]}),
        root / "hf.parquet",
    )
    specs = [f"bench={root / 'folder'}", str(root / "wds.tar"), f"hf={root / 'hf.parquet'}"]
    crawl = [
        ("c-g0-reencoded", reencoded(pool["g0-original"], 60)),
        ("c-g0-resized", resized(pool["g0-original"], 0.8)),
        ("c-s0-resized", resized(pool["s0"], 0.7)),
        ("c-g1-cropped", cropped(pool["g1-original"], 0.03)),
        ("c-g2-reencoded", reencoded(pool["g2-original"], 80)),
        # Not in any evaluation set: same colours as g0..g2, and other pictures.
        ("c-u0", pool["u0"]),
        ("c-u1", pool["u1"]),
        ("c-u2", pool["u2"]),
        ("c-g3", pool["g3-original"]),
        ("c-s2", pool["s2"]),
        ("c-s3", pool["s3"]),
    ]
    expected = {
        "c-g0-reencoded": "bench/sub/a.jpg",
        "c-g0-resized": "bench/sub/a.jpg",
        "c-s0-resized": "bench/b.png",
        "c-g1-cropped": "wds/000001",
        "c-g2-reencoded": "hf/x7",
    }
    return specs, [(k, im, None) for k, im in crawl], expected


def test_eval_sets_are_listed_from_folders_tars_and_parquet(world):
    specs, _, _ = world
    assert parse_spec("/data/coco-val.tar") == ("coco-val", "/data/coco-val.tar")
    assert parse_spec("coco=/data/x") == ("coco", "/data/x")
    items = [(i.set_name, i.item) for spec in specs for i in list_items(spec)]
    assert items == [("bench", "b.png"), ("bench", "sub/a.jpg"), ("wds", "000001"), ("wds", "000002"), ("hf", "x7")]
    with pytest.raises(EvalSetError, match="not a folder, a .tar or a .parquet"):
        list_items("/nonexistent/eval.csv")
    with pytest.raises(EvalSetError, match="share a name"):
        eval_items(DedupConfig(eval_sets=[specs[1], specs[1]]))


def _run_phash(records, config):
    with TestPipeline(runner=FnApiRunner()) as p:
        kept, rejects = p | beam.Create(records) | DecontaminateByPhash(config, eval_items(config))
        out = (kept | "K" >> beam.Map(lambda r: ("kept", r.key, "")), rejects | "R" >> beam.Map(lambda r: ("rejected", r.key, r.model_dump_json())))
        results = []
        (out | beam.Flatten() | beam.Map(lambda t: "\t".join(t))
         | beam.io.WriteToText(str(records[0].image_ref.path) + ".out", shard_name_template=""))
    lines = open(str(records[0].image_ref.path) + ".out").read().splitlines()
    for line in lines:
        status, key, payload = line.split("\t", 2)
        results.append((status, key, payload))
    return results


def test_phash_broadcast_and_join_agree(world, tmp_path):
    specs, crawl, _ = world
    records = stage(tmp_path, crawl)
    from stages.core.eval_sets import read_item

    eval_hashes = {f"{i.set_name}/{i.item}": compute_phash(read_item(i)) for spec in specs for i in list_items(spec)}
    broadcast = _run_phash(records, DedupConfig(eval_sets=specs))
    joined = _run_phash(records, DedupConfig(eval_sets=specs, eval_broadcast_max=0))
    assert sorted(broadcast) == sorted(joined)
    rejected = {key: Rejection.model_validate_json(payload) for status, key, payload in broadcast if status == "rejected"}
    assert len(broadcast) == len(records)
    # What the hashes say, computed here pair by pair:
    threshold = DedupConfig().eval_hamming_threshold
    close = {
        record.key: min((hamming(record.phash, h), n) for n, h in eval_hashes.items())
        for record in records
        if any(hamming(record.phash, h) <= threshold for h in eval_hashes.values())
    }
    assert set(rejected) == set(close) and {"c-g0-reencoded", "c-g2-reencoded"} <= set(close)
    for key, (distance, name) in close.items():
        assert rejected[key].score == distance and rejected[key].detail.startswith(f"evaluation item {name}: ")
    for key, reject in rejected.items():
        assert (reject.stage.value, reject.reason.value) == ("dedup", "eval_overlap")
        assert reject.detail.startswith("evaluation item ") and "pHash Hamming distance" in reject.detail
        assert reject.score <= threshold


def test_copies_of_eval_images_are_rejected_and_nothing_else(world, tmp_path):
    """pHash right after dedup, then CLIP cosine after scoring, as in curate."""
    from pipelines.scoring import ModelStages

    specs, crawl, expected = world
    config_path, weights = save_pixel_clip(tmp_path / "clip")
    clip = ClipConfig(model=PIXEL_CLIP_NAME, pretrained=str(weights), model_config_path=str(config_path))
    config = CurateConfig(
        scoring=ScoringConfig(clip=clip),
        select=SCORE_ONLY,
        dedup={"eval_sets": specs, "eval_cosine_threshold": COSINE},
    )
    # Precondition, from open_clip directly: exactly the planted copies are above the cosine threshold.
    items = eval_items(config.dedup)
    from stages.core.decode import decode_rgb
    from stages.core.eval_sets import read_item

    eval_images = [decode_rgb(read_item(i)) for i in items]
    _, eval_emb, _ = reference_embeddings(clip, eval_images, ["x"] * len(items))
    _, crawl_emb, _ = reference_embeddings(clip, [im for _, im, _ in crawl], ["x"] * len(crawl))
    names = [f"{i.set_name}/{i.item}" for i in items]
    cosines = crawl_emb @ eval_emb.T
    for row, (key, _, _) in enumerate(crawl):
        above = {names[j] for j in np.flatnonzero(cosines[row] >= COSINE)}
        assert above == ({expected[key]} if key in expected else set()), (key, cosines[row].round(3))

    records = stage(tmp_path / "staging", crawl)
    out = tmp_path / "out"
    with TestPipeline(runner=FnApiRunner()) as p:
        kept, phash_rejects = p | beam.Create(records) | DecontaminateByPhash(config.dedup, items)
        kept, model_rejects = kept | ModelStages(config, str(out))
        kept | "Kept" >> beam.Map(lambda r: r.key) | "WK" >> beam.io.WriteToText(str(tmp_path / "kept"), shard_name_template="")
        (
            (phash_rejects, model_rejects)
            | beam.Flatten()
            | beam.Map(lambda r: r.model_dump_json())
            | "WR" >> beam.io.WriteToText(str(tmp_path / "rejects"), shard_name_template="")
        )
    kept = set((tmp_path / "kept").read_text().split())
    rejected = {r.key: r for r in map(Rejection.model_validate_json, (tmp_path / "rejects").read_text().splitlines())}
    assert kept | set(rejected) == {r.key for r in records} and kept.isdisjoint(rejected)
    assert set(rejected) == set(expected)
    for key, reject in rejected.items():
        assert reject.reason.value == "eval_overlap" and reject.stage.value == "dedup"
        assert reject.detail.startswith(f"evaluation item {expected[key]}: ")

"""`beam run select` on a real scored curate output (tiny CLIP, NudeNet, an
aesthetic head; a generated web on 127.0.0.1): same thresholds reproduce it,
stricter ones drop more, looser ones can only re-admit samples whose bytes were
kept, and no model is ever constructed."""

from __future__ import annotations

import collections
import json
import logging
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipelines.testing import webcorpus
from pipelines.cli import main
from pipelines.testing.localweb import LocalWeb
from pipelines.testing.models import TINY_CLIP_NAME, save_embedding_head, save_tiny_clip

N_IMAGES = 12
MIN_CLIP = 0.3  # the tiny random CLIP scores these images about 0.15 .. 0.55


@pytest.fixture(scope="module")
def curated(tmp_path_factory) -> Path:
    return _curate(tmp_path_factory.mktemp("curated"), keep_unselected=False)


@pytest.fixture(scope="module")
def curated_keeping_unselected(tmp_path_factory) -> Path:
    return _curate(tmp_path_factory.mktemp("curated_unselected"), keep_unselected=True)


def _curate(tmp: Path, keep_unselected: bool) -> Path:
    config_path, weights = save_tiny_clip(tmp / "models", seed=0)
    save_embedding_head(tmp / "models" / "aesthetic.safetensors", [32, 1], seed=1, bias=5.0)
    with LocalWeb() as web:
        rows = []
        for i in range(N_IMAGES):
            web.add(f"/img/{i}.jpg", webcorpus.jpeg(webcorpus.render(1000 + i, (512 + 16 * i, 512))))
            rows.append({"url": web.url(f"/img/{i}.jpg"), "caption": f"a picture with shapes number {i}"})
        pq.write_table(pa.Table.from_pylist(rows), tmp / "urls.parquet")
        config = {
            "shards": {"samples_per_shard": 4, "writers": 2},
            "scoring": {
                "clip": {"model": TINY_CLIP_NAME, "pretrained": str(weights), "model_config_path": str(config_path)},
                "safety": {},
                "aesthetic": {"head": {"path": str(tmp / "models" / "aesthetic.safetensors"), "output": "identity"}},
            },
            "select": {"min_clip_similarity": MIN_CLIP, "max_nsfw_score": 0.5, "keep_unselected": keep_unselected},
        }
        (tmp / "curate.yaml").write_text(yaml.safe_dump(config))
        code = main([
            "run", "curate", "--input", str(tmp / "urls.parquet"), "--output", str(tmp / "out"),
            "--config", str(tmp / "curate.yaml"), "--allow-private-network",
        ])  # fmt: skip
    assert code == 0
    out = tmp / "out"
    index = pq.read_table(out / "index.parquet").to_pylist()
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    # The fixture is only useful if selection both kept and dropped something.
    assert len(index) >= 6 and any(r["reason"] == "low_clip_similarity" for r in rejects)
    assert all(r["nsfw_score"] is not None and r["aesthetic_score"] is not None for r in index)
    return out


@pytest.fixture
def no_models(monkeypatch):
    """Every way a scorer could build a model raises."""
    import onnxruntime
    import open_clip

    from stages.models.heads import EmbeddingHead

    def refuse(*args, **kwargs):
        raise AssertionError("beam run select must not construct a model")

    for target, name in [
        (open_clip, "create_model_and_transforms"),
        (open_clip, "create_model"),
        (open_clip.factory, "create_model"),
        (onnxruntime, "InferenceSession"),
        (EmbeddingHead, "load"),
    ]:
        monkeypatch.setattr(target, name, refuse)


def run_select(src: Path, dst: Path, *flags: str) -> None:
    assert main(["run", "select", "--input", str(src), "--output", str(dst), *flags]) == 0


def table(out: Path, name: str) -> list[dict]:
    return pq.read_table(out / name).to_pylist()


def index_rows(out: Path) -> dict[str, dict]:
    return {row["key"]: {k: v for k, v in row.items() if k != "shard"} for row in table(out, "index.parquet")}


def reject_rows(out: Path) -> list[dict]:
    return sorted(table(out, "rejects.parquet"), key=lambda r: r["key"])


def shard_samples(out: Path) -> dict[str, dict]:
    """key -> {extension: bytes} over all shards, with `shard` removed from the json."""
    samples: dict[str, dict] = collections.defaultdict(dict)
    for path in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, extension = member.name.split(".", 1)
                data = tar.extractfile(member).read()
                if extension == "json":
                    record = json.loads(data)
                    assert record["shard"] == path.name
                    record.pop("shard")
                    data = record
                samples[key][extension] = data
    return dict(samples)


def report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def test_same_thresholds_reproduce_the_curate_output_without_models(curated, tmp_path, no_models):
    again = tmp_path / "again"
    run_select(curated, again)  # thresholds default to the input's
    assert index_rows(again) == index_rows(curated)
    assert reject_rows(again) == reject_rows(curated)
    assert shard_samples(again) == shard_samples(curated)
    assert {k: v for k, v in report(again).items() if k != "shards"} == {
        k: v for k, v in report(curated).items() if k != "shards"
    }
    written = json.loads((again / "config.json").read_text())
    assert written["curate"]["select"]["min_clip_similarity"] == MIN_CLIP
    assert written["selected_from"]["input_dir"] == str(curated)
    manifest = json.loads(next((again / "shards").glob("*.json")).read_text())
    assert manifest["config"] == written


def test_stricter_thresholds_drop_exactly_the_samples_below_them(curated, tmp_path, no_models):
    before = index_rows(curated)
    similarities = sorted(r["clip_similarity"] for r in before.values())
    stricter = similarities[len(similarities) // 2]  # about half of the kept samples fail it
    out = tmp_path / "strict"
    run_select(curated, out, "--min-clip-similarity", str(stricter))

    after = index_rows(out)
    assert set(after) == {k for k, r in before.items() if r["clip_similarity"] >= stricter}
    assert 0 < len(after) < len(before)
    assert all(after[k] == before[k] for k in after)
    new_rejects = {r["key"]: r for r in reject_rows(out)}
    for key in set(before) - set(after):
        assert new_rejects[key]["stage"] == "select" and new_rejects[key]["reason"] == "low_clip_similarity"
        assert new_rejects[key]["score"] == pytest.approx(before[key]["clip_similarity"])
    old = {r["key"]: r for r in reject_rows(curated)}
    assert all(new_rejects[k] == old[k] for k in old)  # earlier rejections carried over unchanged
    assert report(out)["accounting_ok"] and report(out)["input_rows"] == report(curated)["input_rows"]


def test_looser_thresholds_cannot_readmit_without_unselected(curated, tmp_path, no_models, caplog):
    out = tmp_path / "loose"
    with caplog.at_level(logging.WARNING, logger="pipelines.select"):
        run_select(curated, out, "--min-clip-similarity", "none")
    assert index_rows(out) == index_rows(curated)
    assert reject_rows(out) == reject_rows(curated)
    dropped = sum(r["reason"] == "low_clip_similarity" for r in reject_rows(curated))
    assert f"{dropped} sample(s) dropped by selection" in caplog.text


def test_unselected_samples_make_thresholds_reversible(curated, tmp_path, no_models):
    """Tighten with --keep-unselected, then select again with the original
    thresholds: the samples the tighter run dropped come back from unselected/."""
    before = index_rows(curated)
    stricter = sorted(r["clip_similarity"] for r in before.values())[len(before) // 2]
    strict = tmp_path / "strict"
    run_select(curated, strict, "--min-clip-similarity", str(stricter), "--keep-unselected")
    dropped = set(before) - set(index_rows(strict))
    assert dropped and set(shard_samples(strict / "unselected")) == dropped

    restored = tmp_path / "restored"
    run_select(strict, restored, "--min-clip-similarity", str(MIN_CLIP))
    assert index_rows(restored) == before
    assert reject_rows(restored) == reject_rows(curated)
    assert shard_samples(restored) == shard_samples(curated)


def test_curate_keeps_unselected_images_so_select_can_loosen(curated_keeping_unselected, tmp_path, no_models):
    out = curated_keeping_unselected
    unselected = {r["key"] for r in reject_rows(out) if r["stage"] == "select"}
    assert unselected and set(shard_samples(out / "unselected")) == unselected
    assert not (out / "_staging").exists() and not list((out / "unselected" / "shards").glob(".tmp*"))

    loose = tmp_path / "loose"
    run_select(out, loose, "--min-clip-similarity", "none", "--max-nsfw-score", "none")
    assert set(index_rows(loose)) == set(index_rows(out)) | unselected
    assert report(loose)["accounting_ok"]


def test_bad_requests_fail_before_running(curated, tmp_path, capsys):
    assert main(["run", "select", "--input", str(curated), "--output", str(curated)]) == 2
    assert "must differ from --input" in capsys.readouterr().err
    # The curate run computed no punsafe: a threshold on it is an error, not a silent pass.
    assert main(["run", "select", "--input", str(curated), "--output", str(tmp_path / "x"), "--max-punsafe", "0.5"]) == 2
    assert "select.max_punsafe needs punsafe" in capsys.readouterr().err
    assert main(["run", "select", "--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "y")]) == 2
    assert "config.json: cannot read" in capsys.readouterr().err


def test_semantic_dedup_reruns_from_the_saved_embeddings_without_models(curated, tmp_path, no_models):
    """The curate output has its CLIP embeddings (DIR/embeddings/); select
    re-runs semantic dedup on them at a new threshold, with no model: the drops
    equal the in-memory method on the same files, the funnel still adds up,
    and DIR2/embeddings/ holds exactly the samples DIR2 keeps."""
    import numpy as np

    from schemas.config import SemanticDedupConfig
    from stages.core.semantic import kmeans, semantic_duplicates
    from stages.embeddings import embedding_files, read_embedding_file

    rows = [row for paths in embedding_files(str(curated)) for row in read_embedding_file(paths)]
    before = index_rows(curated)
    assert sorted(r[0] for r in rows) == sorted(before)  # one embedding per kept sample
    keys = [r[0] for r in rows]
    x = np.stack([np.frombuffer(r[3], dtype=np.float16) for r in rows]).astype(np.float32)
    # A threshold between the images' nearest-neighbour cosines, so some go and some stay.
    sims = x @ x.T
    np.fill_diagonal(sims, -1)
    threshold = float(np.round(np.median(sims.max(axis=1)), 4))
    cfg = SemanticDedupConfig(clusters=2)
    order = np.argsort(keys)  # the stage fits its k-means on the sample sorted by key
    centroids = kmeans(x[order], cfg.clusters, iterations=cfg.iterations, seed=cfg.seed)
    want = {d.key: d.survivor for d in semantic_duplicates(keys, x, [r[1] for r in rows], [r[2] for r in rows], threshold, centroids)}
    assert 0 < len(want) < len(keys)

    out = tmp_path / "semantic"
    run_select(curated, out, "--semantic-threshold", str(threshold), "--semantic-clusters", "2")
    after = index_rows(out)
    assert set(after) == set(before) - set(want)
    new = {r["key"]: r for r in reject_rows(out) if r["reason"] == "semantic_duplicate"}
    assert {k: r["duplicate_of"] for k, r in new.items()} == want
    assert all(r["stage"] == "dedup" and r["score"] >= threshold - 1e-3 for r in new.values())
    assert report(out)["accounting_ok"] and report(out)["input_rows"] == report(curated)["input_rows"]
    written = [row[0] for paths in embedding_files(str(out)) for row in read_embedding_file(paths)]
    assert sorted(written) == sorted(after)
    assert (out / "semantic" / "centroids.npy").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["curate"]["dedup"]["semantic"]["threshold"] == threshold


def test_semantic_rerun_needs_embeddings(curated, tmp_path, capsys):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(curated, bare)
    shutil.rmtree(bare / "embeddings")
    code = main(["run", "select", "--input", str(bare), "--output", str(tmp_path / "x"), "--semantic-threshold", "0.9"])
    assert code == 2 and "needs" in capsys.readouterr().err

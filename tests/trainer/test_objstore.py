"""The trainer on object storage: `trainer cache` from s3:// shards to an s3:// cache and
`trainer fit` from it, against moto's S3 server on 127.0.0.1 (tests/objstore.py), equal
to the local-disk run; damaged and vanishing shards and cache files are reported by name
and the run goes on."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load as load_safetensors

from schemas.records import ShardManifest
from tests.objstore import environment, object_store
from tests.trainer.conftest import tiny_config
from trainer.cache import build_cache, read_manifest
from trainer.data import CachedLatents


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with object_store("s3", tmp_path_factory.mktemp("s3")) as store, environment(store.env):
        yield store


def _upload_shards(store, shard_paths: list[str], prefix: str) -> str:
    for path in shard_paths:
        store.fs.put(path, f"data/{prefix}/{Path(path).name}")
    return store.url(f"{prefix}/{{000000..{len(shard_paths) - 1:06d}}}.tar")


def _tensors(data: bytes) -> dict[str, torch.Tensor]:
    return load_safetensors(data)


def _config_file(components_dir, tmp_path, **sections) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_config(components_dir, **sections).model_dump(mode="json")))
    return str(path)


def test_cache_from_s3_to_s3_equals_the_local_cache(s3, shard_paths, cache_dir, components_dir, tmp_path, capsys):
    from trainer.cli import main

    spec = _upload_shards(s3, shard_paths, "clean/shards")
    assert main(["cache", "--shards", spec, "--config", _config_file(components_dir, tmp_path), "--output", s3.url("clean/cache")]) == 0
    assert f"latent cache {s3.url('clean/cache')}: 48 samples" in capsys.readouterr().out
    manifest = read_manifest(s3.url("clean/cache"))
    local = read_manifest(cache_dir)
    assert manifest.spec == local.spec and manifest.num_samples == local.num_samples == 48
    assert [(f.file, f.num_samples) for f in manifest.files] == [(f.file, f.num_samples) for f in local.files]
    assert [(s.size_bytes, s.sha256, s.num_samples, s.lost, s.problem) for s in manifest.sources] == [
        (s.size_bytes, s.sha256, s.num_samples, 0, None) for s in local.sources
    ]
    assert [s.path for s in manifest.sources] == [s3.url(f"clean/shards/{Path(p).name}") for p in shard_paths]
    for entry in local.files + [type(local.files[0])(file=local.null_text_file, source="-", num_samples=1)]:
        remote = _tensors(s3.read(f"clean/cache/{entry.file}"))
        here = _tensors((cache_dir / entry.file).read_bytes())
        assert remote.keys() == here.keys()
        for name in here:
            assert torch.equal(remote[name], here[name]), (entry.file, name)
    # Only the cache's own files: nothing temporary left in the bucket.
    names = set(s3.objects("clean/cache"))
    assert names == {f"clean/cache/{n}" for n in ["manifest.json", "spec.json", local.null_text_file, *(f.file for f in local.files), *(f"parts/{Path(p).stem}.json" for p in shard_paths)]}
    assert s3.open_uploads() == []


def _metrics(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def test_fit_from_an_s3_cache_equals_fit_from_the_local_one(s3, shard_paths, cache_dir, components_dir, tmp_path):
    from trainer.cli import main

    if not s3.fs.exists("data/clean/cache/manifest.json"):
        build_cache(tiny_config(components_dir), _upload_shards(s3, shard_paths, "clean/shards"), s3.url("clean/cache"))
    runs = {}
    config = _config_file(components_dir, tmp_path, max_steps=5, data={"num_workers": 2, "batch_size": 3}, checkpoint={"every_steps": 100})
    for name, cache in (("local", str(cache_dir)), ("s3", s3.url("clean/cache"))):
        assert main(["fit", "--config", config, "--cache", cache, "--output", str(tmp_path / name)]) == 0
        runs[name] = _metrics(tmp_path / name)
    assert sorted(runs["s3"]) == sorted(runs["local"]) == [1, 2, 3, 4, 5]
    for step, row in runs["local"].items():
        assert runs["s3"][step]["loss"] == row["loss"], step
        assert runs["s3"][step]["grad_norm"] == row["grad_norm"], step


def _manifest_for(shard: str, count: int) -> bytes:
    """A curate-style manifest `NNNNNN.json` beside a shard (what says how many it held)."""
    return ShardManifest(
        shard=shard, num_samples=count, keys=[f"k{i}" for i in range(count)], tar_bytes=1, sha256="0" * 64,
        created_at="2026-01-01T00:00:00Z", config_sha256="0" * 64, config={},
    ).model_dump_json().encode()


def test_truncated_and_vanishing_shards_are_reported_and_the_cache_goes_on(s3, shard_paths, components_dir, tmp_path, caplog, monkeypatch):
    import trainer.shard_reader

    for i, path in enumerate(shard_paths):
        data = Path(path).read_bytes()
        if i == 1:
            data = data[: len(data) // 2]  # an interrupted copy
        s3.fs.pipe_file(f"data/damaged/shards/{i:06d}.tar", data)
        s3.fs.pipe_file(f"data/damaged/shards/{i:06d}.json", _manifest_for(f"{i:06d}.tar", 12))
    spec = s3.url("damaged/shards/{000000..000003}.tar")
    vanishing = "data/damaged/shards/000003.tar"

    # Shard 3 is deleted by someone else while shard 2 is being read.
    opened = []
    real_open = trainer.shard_reader.open_for_index

    def open_and_delete(url):
        opened.append(url)
        if url.endswith("000002.tar") and s3.fs.exists(vanishing):
            s3.fs.rm(vanishing)
        return real_open(url)

    monkeypatch.setattr(trainer.shard_reader, "open_for_index", open_and_delete)
    with caplog.at_level(logging.ERROR):
        manifest = build_cache(tiny_config(components_dir), spec, s3.url("damaged/cache"))
    sources = {Path(s.path).name: s for s in manifest.sources}
    truncated, vanished = sources["000001.tar"], sources["000003.tar"]
    assert truncated.problem.startswith("truncated") and 0 < truncated.num_samples < 12
    assert truncated.lost == 12 - truncated.num_samples
    assert vanished.problem.startswith("vanished") and (vanished.num_samples, vanished.lost) == (0, 12)
    assert sources["000000.tar"].problem is None and sources["000002.tar"].problem is None
    assert manifest.num_samples == 24 + truncated.num_samples
    errors = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    assert f"{s3.url('damaged/shards/000001.tar')} is truncated" in errors and f"{truncated.lost} sample(s) lost" in errors
    assert f"{s3.url('damaged/shards/000003.tar')} is vanished" in errors and "12 sample(s) lost" in errors

    # fit trains on what is left, with one more cache file gone before it starts.
    from trainer.train import fit

    gone = manifest.files[0].file
    s3.fs.rm(f"data/damaged/cache/{gone}")
    caplog.clear()
    config = tiny_config(components_dir, max_steps=3, data={"cache": s3.url("damaged/cache"), "num_workers": 0, "batch_size": 3}, checkpoint={"every_steps": 100})
    with caplog.at_level(logging.ERROR):
        fit(config, tmp_path / "run")
    assert sorted(_metrics(tmp_path / "run")) == [1, 2, 3]
    assert any(f"cache file {s3.url('damaged/cache/' + gone)} is missing" in r.getMessage() for r in caplog.records)


def test_a_cache_file_vanishing_mid_run_is_replaced_deterministically(s3, shard_paths, components_dir, caplog):
    """Rows of a file that disappears are replaced by rows of the next readable file, so
    a run resumed after the loss reads exactly what the uninterrupted run reads."""
    if not s3.fs.exists("data/clean/cache/manifest.json"):
        build_cache(tiny_config(components_dir), _upload_shards(s3, shard_paths, "clean/shards"), s3.url("clean/cache"))
    s3.fs.copy("data/clean/cache/", "data/vanish/cache/", recursive=True)
    cache = s3.url("vanish/cache")
    manifest = read_manifest(cache)

    def dataset(start: int = 0) -> CachedLatents:
        return CachedLatents(cache, manifest, synthetic_prob=0.5, batch_size=4, seed=3, span=2, start_batches=start)

    stream = iter(dataset())
    before = [next(stream) for _ in range(3)]
    assert before
    s3.fs.rm(f"data/vanish/cache/{manifest.files[5].file}")
    with caplog.at_level(logging.ERROR):
        after = [next(stream) for _ in range(12)]
    assert any(manifest.files[5].file in r.getMessage() and "cannot be read" in r.getMessage() for r in caplog.records)
    resumed = iter(dataset(start=3))
    for i, batch in enumerate(after):
        again = next(resumed)
        for name in batch:
            assert torch.equal(batch[name], again[name]), (i, name)

"""The latent cache: what it stores, that it equals on-the-fly encoding, and that `fit`
refuses a cache made with something else (or from other shards)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from tests.trainer.conftest import TEXT_LENGTH, shard_spec, tiny_config, write_shards
from trainer.cache import CacheMismatch, build_cache, cache_spec, check_cache, read_manifest
from trainer.components import load_components
from trainer.buckets import load_rgb
from trainer.data import index_tar, read_member
from trainer.shard_reader import file_sha256


def test_manifest_records_what_made_the_cache(cache_dir, shard_paths, components_dir):
    manifest = read_manifest(cache_dir)
    assert manifest.num_samples == 48 and manifest.skipped == 0
    assert [f.num_samples for f in manifest.files] == [8, 4] * 4  # samples_per_file 8, 12 per shard
    assert [s.path for s in manifest.sources] == shard_paths
    assert manifest.sources[2].sha256 == file_sha256(shard_paths[2])[0]
    spec = manifest.spec
    assert (spec.resolution, spec.dtype, spec.captions, spec.max_text_length) == (32, "float32", "both", TEXT_LENGTH)
    assert spec.vae.class_name == "AutoencoderKL" and spec.text_encoder.class_name == "CLIPTextModel"
    assert spec.vae_scaling_factor == json.loads((components_dir / "vae" / "config.json").read_text())["scaling_factor"]
    assert manifest.preview_captions and all(isinstance(c, str) for c in manifest.preview_captions)
    assert (cache_dir / manifest.null_text_file).is_file()


def test_cached_latents_and_captions_equal_on_the_fly_encoding(cache_dir, shard_paths, components_dir):
    """The cache path and the raw-shards path give the model the same inputs."""
    from schemas.records import SampleRecord

    components = load_components(tiny_config(components_dir).components)
    manifest = read_manifest(cache_dir)
    entry = manifest.files[3]  # the second file of shard 1
    with safe_open(str(cache_dir / entry.file), "pt") as handle:
        keys = json.loads(handle.metadata()["keys"])
        row = 2
        cached_latent = handle.get_slice("latents")[row]
        cached_text = handle.get_slice("text.synthetic")[row]
        has_synthetic = bool(handle.get_slice("has_synthetic")[row])
    sample = next(s for s in index_tar(entry.source) if s.key == keys[row])
    with open(entry.source, "rb") as f:
        pixels = load_rgb(read_member(f, *sample.members["png"]), 32)
        record = SampleRecord.model_validate_json(read_member(f, *sample.members["json"]))
    fresh = components.encode_images(torch.from_numpy(pixels).permute(2, 0, 1)[None])[0]
    torch.testing.assert_close(cached_latent, fresh, rtol=1e-5, atol=1e-5)
    caption = record.caption_synthetic or record.caption_original
    assert has_synthetic == (record.caption_synthetic is not None)
    torch.testing.assert_close(cached_text, components.encode_text([caption])[0][0], rtol=1e-5, atol=1e-5)


def test_fit_config_must_match_the_cache(cache_dir, components_dir, shard_paths, tmp_path):
    components = load_components(tiny_config(components_dir).components)
    manifest = read_manifest(cache_dir)
    good = tiny_config(components_dir)
    check_cache(manifest, cache_spec(good, components), good, cache_dir)  # no complaint

    other_resolution = tiny_config(components_dir, data={"resolution": 64})
    with pytest.raises(CacheMismatch, match="resolution: cache has 32, config gives 64"):
        check_cache(manifest, cache_spec(other_resolution, components), other_resolution, cache_dir)

    other_dtype = tiny_config(components_dir, cache={"dtype": "bfloat16"})
    with pytest.raises(CacheMismatch, match="dtype: cache has 'float32', config gives 'bfloat16'"):
        check_cache(manifest, cache_spec(other_dtype, components), other_dtype, cache_dir)

    # Same VAE path, different weights: the fingerprint catches it.
    changed = tmp_path / "components"
    shutil.copytree(components_dir, changed)
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(changed / "vae")
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(0.01)
    vae.save_pretrained(changed / "vae")
    retrained = tiny_config(changed)
    with pytest.raises(CacheMismatch, match=r"vae\.fingerprint"):
        check_cache(manifest, cache_spec(retrained, load_components(retrained.components)), retrained, cache_dir)

    original_only = manifest.model_copy(update={"spec": manifest.spec.model_copy(update={"captions": "original"})})
    wants_synthetic = tiny_config(components_dir, data={"synthetic_caption_prob": 0.3})
    with pytest.raises(CacheMismatch, match="holds only original captions"):
        check_cache(original_only, cache_spec(wants_synthetic, components).model_copy(update={"captions": "original"}), wants_synthetic, cache_dir)


def test_stale_cache_is_refused_when_the_shards_changed(cache_dir, components_dir, shard_paths, tmp_path):
    components = load_components(tiny_config(components_dir).components)
    manifest = read_manifest(cache_dir)
    same = tiny_config(components_dir, data={"shards": shard_spec(shard_paths)})
    check_cache(manifest, cache_spec(same, components), same, cache_dir)
    rewritten = write_shards(tmp_path / "shards", shards=4, per_shard=13)  # the curation ran again
    stale = tiny_config(components_dir, data={"shards": shard_spec(rewritten)})
    with pytest.raises(CacheMismatch, match="stale cache"):
        check_cache(manifest, cache_spec(stale, components), stale, cache_dir)


def test_rerun_skips_finished_shards_and_refuses_another_config(cache_dir, components_dir, shard_paths, tmp_path, caplog):
    copy = tmp_path / "cache"
    shutil.copytree(cache_dir, copy)
    (copy / "parts" / "000002.json").unlink()  # as if killed while shard 2 was being encoded
    before = {p.name: p.stat().st_mtime_ns for p in copy.glob("00000[013]-*.safetensors")}
    with caplog.at_level("INFO"):
        manifest = build_cache(tiny_config(components_dir), shard_spec(shard_paths), copy)
    assert "3 of its 4 shards are already cached" in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in copy.glob("00000[013]-*.safetensors")} == before
    assert manifest.files == read_manifest(cache_dir).files
    with pytest.raises(CacheMismatch, match="resolution"):
        build_cache(tiny_config(components_dir, data={"resolution": 16}), shard_spec(shard_paths), copy)

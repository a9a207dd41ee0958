"""Aspect-ratio buckets: the bucket set, the cache on a mixed-aspect corpus (every sample in
its bucket, crop offsets recorded, none dropped, histogram printed), bucketed batches
(one bucket per batch, per-bucket sizes, nothing dropped) and their exact resume."""

from __future__ import annotations

import io
import itertools
import json
import logging
import math

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from schemas.records import SampleRecord
from tests.trainer.conftest import ASPECT_SIZES, bucket_config, shard_spec, tiny_config
from trainer.buckets import (
    bucket_batch_sizes,
    bucket_batches,
    bucket_name,
    bucket_set,
    fit_to_bucket,
    nearest_bucket,
    parse_bucket,
)
from trainer.cache import CacheMismatch, cache_spec, check_cache, read_manifest
from trainer.components import load_components
from trainer.buckets import load_rgb
from trainer.data import CachedLatents, index_tar, make_loader, read_member
from trainer.stream import StreamSlot, epoch_files


@pytest.mark.parametrize("resolution,step,max_aspect", [(32, 8, 3.0), (256, 16, 3.0), (512, 16, 2.0), (1024, 64, 4.0)])
def test_bucket_set(resolution, step, max_aspect):
    buckets = bucket_set(resolution, step, max_aspect)
    assert (resolution, resolution) in buckets
    assert len(set(buckets)) == len(buckets)
    assert {(h, w) for w, h in buckets} == set(buckets)  # portrait mirrors landscape
    ratios = [w / h for w, h in buckets]
    assert ratios == sorted(ratios) and max(ratios) <= max_aspect + 1e-9
    for width, height in buckets:
        assert width % step == 0 and height % step == 0
        # About the square's pixel count: off by at most the rounding of one side to `step`.
        assert abs(width * height - resolution**2) <= step * max(width, height) / 2 + 1e-9
    if resolution >= 256:  # fine enough steps reach the widest ratio asked for
        assert max(ratios) >= 0.9 * max_aspect
    with pytest.raises(ValueError, match="not a multiple of 16"):
        bucket_set(100, 16, 2.0)


def test_nearest_bucket_and_minimal_crop():
    buckets = bucket_set(256, 16, 3.0)
    assert nearest_bucket(300, 300, buckets) == (256, 256)
    assert nearest_bucket(900, 300, buckets) == (432, 144)  # 3:1
    assert nearest_bucket(300, 900, buckets) == (144, 432)
    assert nearest_bucket(2000, 100, buckets) == (432, 144)  # wider than any bucket: the widest
    # Log-ratio distance: 1:2 and 2:1 are mirrored exactly.
    assert nearest_bucket(400, 200, buckets) == tuple(reversed(nearest_bucket(200, 400, buckets)))

    image = Image.new("RGB", (90, 30), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 3, 30))  # a thin blue strip at the left edge
    pixels, top, left = fit_to_bucket(image, (48, 16))
    assert pixels.shape == (16, 48, 3)
    # Cover scale max(48/90, 16/30) = 0.533: 48x16 exactly, so nothing is cropped and the strip stays.
    assert (top, left) == (0, 0) and pixels[:, 0, 2].min() > 150
    pixels, top, left = fit_to_bucket(image, (32, 32))  # square bucket: cover 96x32, crop 32 each side
    assert (top, left) == (0, 32) and pixels[:, 0, 2].max() < 60  # the strip is cropped away
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    assert (load_rgb(buffer.getvalue(), 32) == pixels).all()  # the square crop is the square bucket
    assert parse_bucket("384x192") == (384, 192) and bucket_name((384, 192)) == "384x192"
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        parse_bucket("384")


def test_cache_on_mixed_aspect_ratios(bucket_cache_dir, aspect_shard_paths, components_dir, caplog):
    manifest = read_manifest(bucket_cache_dir)
    buckets = [tuple(b) for b in manifest.spec.buckets]
    assert buckets == bucket_set(32, 8, 3.0)  # 4x VAE, patch 2: sides multiples of 8
    written = 4 * 15
    assert manifest.num_samples == written and manifest.skipped == 0  # no sample dropped
    assert sum(manifest.bucket_counts.values()) == written
    assert list(manifest.bucket_counts) == [bucket_name(b) for b in buckets]

    seen = {}
    for entry in manifest.files:
        assert entry.bucket is not None and bucket_name(entry.bucket) in entry.file
        width, height = entry.bucket
        with safe_open(str(bucket_cache_dir / entry.file), "pt") as handle:
            keys = json.loads(handle.metadata()["keys"])
            latents = handle.get_tensor("latents")
            original, crop, target = (handle.get_tensor(k) for k in ("original_size", "crop_top_left", "target_size"))
        assert latents.shape[-2:] == (height // 4, width // 4)
        assert (target == torch.tensor([height, width], dtype=torch.int32)).all()
        records = {s.key: s for s in index_tar(entry.source)}
        with open(entry.source, "rb") as shard:
            for row, key in enumerate(keys):
                record = SampleRecord.model_validate_json(read_member(shard, *records[key].members["json"]))
                assert nearest_bucket(record.width, record.height, buckets) == (width, height), key
                image = Image.open(io.BytesIO(read_member(shard, *records[key].members["png"]))).convert("RGB")
                _, top, left = fit_to_bucket(image, (width, height))
                assert original[row].tolist() == [record.height, record.width]
                assert crop[row].tolist() == [top, left]
                seen[key] = (width, height)
    assert len(seen) == written
    # The corpus spans 1:3 to 3:1; at 32 px the widest buckets are 2:1, and all five are used.
    assert {w / h for w, h in ASPECT_SIZES} >= {1 / 3, 3.0}
    assert set(seen.values()) == set(buckets)
    # A wide source is cropped only along its width, a tall one only along its height.
    assert all(count > 0 for count in manifest.bucket_counts.values())


def test_cache_prints_the_bucket_histogram(tmp_path, components_dir, aspect_shard_paths, caplog, capsys):
    from trainer.cli import main

    config = tmp_path / "config.yaml"
    config.write_text(bucket_config(components_dir, cache={"samples_per_file": 16}).model_dump_json())
    with caplog.at_level(logging.INFO):
        assert main(["cache", "--shards", shard_spec(aspect_shard_paths[:1]), "--config", str(config), "--output", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    manifest = read_manifest(tmp_path / "cache")
    for name, count in manifest.bucket_counts.items():
        assert any(line.split()[:2] == [name, str(count)] for line in out.splitlines()), out
    assert "samples per bucket" in caplog.text


def test_fit_refuses_a_cache_with_another_bucket_set(bucket_cache_dir, cache_dir, components_dir):
    components = load_components(tiny_config(components_dir).components)
    manifest = read_manifest(bucket_cache_dir)
    same = bucket_config(components_dir)
    check_cache(manifest, cache_spec(same, components), same, bucket_cache_dir)
    narrower = bucket_config(components_dir, data={"max_aspect": 1.5})
    with pytest.raises(CacheMismatch, match=r"buckets: cache has \[\[24, 48\]"):
        check_cache(manifest, cache_spec(narrower, components), narrower, bucket_cache_dir)
    square = tiny_config(components_dir)
    with pytest.raises(CacheMismatch, match="buckets: cache has .*config gives None"):
        check_cache(manifest, cache_spec(square, components), square, bucket_cache_dir)
    with pytest.raises(CacheMismatch, match="buckets: cache has None"):
        check_cache(read_manifest(cache_dir), cache_spec(same, components), same, cache_dir)


def test_bucket_batches_never_mix_and_drop_nothing():
    # 6 files, each one bucket; the stream visits every (file, row) once per epoch.
    sizes = [5, 3, 7, 2, 4, 6]
    bucket_of_file = [0, 1, 0, 2, 1, 2]
    stream = ((e, f, r) for e in range(1000) for f in range(6) for r in range(sizes[f]))
    batch_sizes = [3, 2, 4]
    emitted = list(itertools.islice(bucket_batches(stream, bucket_of_file, batch_sizes), 200))
    for bucket, rows in emitted:
        assert len(rows) == batch_sizes[bucket]
        assert {bucket_of_file[f] for _, f, _ in rows} == {bucket}
    # Nothing dropped: every sample of epoch 0 is in some batch, each exactly once.
    first_epoch = [(f, r) for _, rows in emitted for e, f, r in rows if e == 0]
    assert sorted(first_epoch) == [(f, r) for f in range(6) for r in range(sizes[f])]
    # One bucket: consecutive slices of the stream.
    single = list(itertools.islice(bucket_batches(iter(range(100)) and ((0, 0, r) for r in range(100)), [0], [7]), 3))
    assert [rows for _, rows in single] == [[(0, 0, r) for r in range(i * 7, i * 7 + 7)] for i in range(3)]


def test_per_bucket_batch_sizes_keep_tokens_about_equal():
    buckets = bucket_set(256, 16, 3.0)
    sizes = bucket_batch_sizes(buckets, 64, 256, 16)
    square_tokens = 64 * (256 // 16) ** 2
    for (width, height), size in sizes.items():
        tokens = size * (width // 16) * (height // 16)
        assert tokens <= square_tokens  # never more memory than the square batch
        assert tokens > square_tokens - (width // 16) * (height // 16)  # and less than one image short
    assert sizes[(256, 256)] == 64 and sizes[(432, 144)] == 64 * 256 // (27 * 9)


def test_bucketed_loader_batches_are_one_bucket_and_resume_exactly(bucket_cache_dir):
    manifest = read_manifest(bucket_cache_dir)
    buckets = [tuple(b) for b in manifest.spec.buckets]
    sizes = {b: 2 + i % 2 for i, b in enumerate(buckets)}  # differing sizes per bucket

    def batches(start, count, workers):
        dataset = CachedLatents(bucket_cache_dir, manifest, synthetic_prob=0.5, batch_size=3, seed=4, num_workers=workers, span=2, start_batches=start, batch_sizes=sizes, micro=True)
        return list(itertools.islice(iter(make_loader(dataset, workers, 2, pin_memory=False)), count))

    full = batches(0, 14, 2)
    for batch in full:
        height, width = batch["latents"].shape[-2:]
        bucket = (width * 4, height * 4)
        assert bucket in buckets and batch["latents"].shape[0] == sizes[bucket]
        # Every sample's conditions name the batch's bucket as its target.
        assert (batch["micro"][:, 4:] == torch.tensor([bucket[1], bucket[0]], dtype=torch.int32)).all()
    assert len({b["latents"].shape[-2:] for b in full}) > 1  # several buckets in the stream
    resumed = batches(5, 9, 2)
    for a, b in zip(full[5:], resumed):
        for key in ("latents", "text", "pooled", "micro"):
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    # Single process: the same arithmetic.
    alone = batches(0, 8, 0)
    assert all(torch.equal(a["latents"], b["latents"]) for a, b in zip(alone[3:], batches(3, 5, 0)))


def test_ranks_and_workers_split_the_bucketed_files(bucket_cache_dir):
    """Two ranks x two workers: every sample of epoch 0 lands in exactly one batch of one
    reader, and every batch holds one bucket (index arithmetic only: nothing is read)."""
    manifest = read_manifest(bucket_cache_dir)
    sizes = {tuple(b): 3 for b in manifest.spec.buckets}
    epoch0 = []
    for rank in range(2):
        dataset = CachedLatents(bucket_cache_dir, manifest, synthetic_prob=0.0, batch_size=3, seed=0, rank=rank, world_size=2, num_workers=2, span=2, batch_sizes=sizes)
        for worker in range(2):
            slot = StreamSlot(rank, 2, worker, 2)
            mine = sum(manifest.files[f].num_samples for f in epoch_files(len(manifest.files), 0, 0, slot))
            found = []
            # A bucket's queue may wait epochs to fill, but it does fill: every row comes out.
            for rows in itertools.islice(dataset.batches(slot, 0), 2000):
                assert len({dataset.bucket_of_file[f] for _, f, _ in rows}) == 1
                found += [(f, r) for e, f, r in rows if e == 0]
                if len(found) == mine:
                    break
            assert len(found) == mine
            epoch0 += found
    assert sorted(epoch0) == [(f, r) for f, entry in enumerate(manifest.files) for r in range(entry.num_samples)]

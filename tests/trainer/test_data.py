"""The data layer: reading curated shards, the split across ranks and workers, exact skipping."""

from __future__ import annotations

import io
import itertools
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from tests.trainer.conftest import TEXT_LENGTH, shard_spec, write_shards
from trainer.buckets import load_rgb
from trainer.data import CachedLatents, RawShards, captions_of, expand_shards, index_tar, make_loader, read_member
from trainer.stream import StreamSlot, batches_before, check_split, epoch_files, sample_order


def test_expand_shards(shard_paths, tmp_path):
    assert expand_shards(shard_spec(shard_paths)) == shard_paths
    directory = shard_paths[0].rsplit("/", 1)[0]
    with pytest.raises(FileNotFoundError, match="3 of the 7 shards"):
        expand_shards(directory + "/{000000..000006}.tar")


def test_index_and_read_a_curated_shard(shard_paths):
    samples = index_tar(shard_paths[1])
    assert len(samples) == 12
    sample = samples[0]
    assert set(sample.members) == {"png", "txt", "json"} and sample.image_extension == "png"
    with open(shard_paths[1], "rb") as handle:
        def read(ext):
            return read_member(handle, *sample.members[ext])

        image = Image.open(io.BytesIO(read("png")))
        assert image.size == (48, 40)
        original, synthetic = captions_of(sample, read, shard_paths[1])
    assert "," in original  # the terse alt text
    assert synthetic is None or synthetic.startswith("a ")


def test_captions_fall_back_to_txt_without_a_record(caplog):
    from trainer.data import TarSample

    members = {"txt": b"a caption", "json": b'{"not": "a record"}'}
    sample = TarSample("k", {ext: (0, 0) for ext in members})
    with caplog.at_level(logging.WARNING):
        assert captions_of(sample, lambda ext: members[ext], "x.tar") == ("a caption", None)
    assert "not a SampleRecord" in caplog.text


def test_load_rgb_resizes_the_short_side_and_center_crops():
    image = Image.new("RGB", (60, 30), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 15, 30))  # left quarter blue: cropped away
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    pixels = load_rgb(buffer.getvalue(), 16)
    assert pixels.shape == (16, 16, 3) and pixels.dtype == np.uint8
    assert (pixels[..., 0] > 200).all() and (pixels[..., 2] < 60).all()


def test_files_are_split_across_ranks_and_workers_once_per_epoch():
    files, world, workers = 11, 2, 3
    for epoch in range(3):
        slots = [StreamSlot(r, world, w, workers) for r in range(world) for w in range(workers)]
        assigned = [epoch_files(files, 7, epoch, slot) for slot in slots]
        flat = [f for part in assigned for f in part]
        assert sorted(flat) == list(range(files))  # every file read once, by one reader
        assert all(part for part in assigned)
    first = [epoch_files(files, 7, 0, StreamSlot(0, world, 0, workers))]
    assert first != [epoch_files(files, 7, 1, StreamSlot(0, world, 0, workers))]  # reshuffled per epoch


def test_fewer_files_than_readers_fails_fast(components_dir, cache_dir):
    with pytest.raises(ValueError, match=r"8 cache files cannot be split across 3 rank\(s\) x 3 data-loader worker\(s\)"):
        check_split(8, 3, 3, "cache files")
    from trainer.cache import read_manifest

    manifest = read_manifest(cache_dir)
    with pytest.raises(ValueError, match="every reader needs at least one file"):
        CachedLatents(cache_dir, manifest, synthetic_prob=0.5, batch_size=2, seed=0, world_size=4, rank=1, num_workers=3)


@pytest.mark.parametrize("skip", [0, 1, 5, 12, 13, 29, 61])
def test_skipping_equals_dropping_the_head_of_the_stream(skip):
    sizes = [5, 0, 7, 3, 9, 4]
    slot = StreamSlot(1, 2, 0, 1)
    full = list(itertools.islice(sample_order(sizes.__getitem__, len(sizes), 3, slot, span=2), 80))
    skipped = list(itertools.islice(sample_order(sizes.__getitem__, len(sizes), 3, slot, span=2, skip=skip), 80 - skip))
    assert skipped == full[skip:]
    # Within an epoch each of the reader's samples comes exactly once.
    mine = epoch_files(len(sizes), 3, 0, slot)
    per_epoch = sum(sizes[f] for f in mine)
    first_epoch = [(f, r) for e, f, r in full[:per_epoch]]
    assert len(set(first_epoch)) == per_epoch and {f for f, _ in first_epoch} <= set(mine)


def test_batches_before_matches_round_robin():
    for workers in (1, 2, 3):
        for consumed in range(10):
            produced = [0] * workers
            for i in range(consumed):
                produced[i % workers] += 1
            assert [batches_before(consumed, w, workers) for w in range(workers)] == produced


def test_cache_epoch_visits_every_sample_once(cache_dir):
    from trainer.cache import read_manifest

    manifest = read_manifest(cache_dir)
    dataset = CachedLatents(cache_dir, manifest, synthetic_prob=0.0, batch_size=4, seed=1, span=3)
    batches = list(itertools.islice(iter(dataset), manifest.num_samples // 4))
    latents = torch.cat([b["latents"] for b in batches]).flatten(1)
    assert latents.shape[0] == manifest.num_samples
    assert torch.unique(latents, dim=0).shape[0] == manifest.num_samples


def test_loader_with_workers_resumes_mid_stream(cache_dir):
    """Two worker processes, round-robin batches: restarting at micro-batch 5 yields exactly
    the batches an uninterrupted loader yields from there on."""
    from trainer.cache import read_manifest

    manifest = read_manifest(cache_dir)

    def batches(start, count):
        dataset = CachedLatents(cache_dir, manifest, synthetic_prob=0.5, batch_size=3, seed=2, num_workers=2, span=2, start_batches=start)
        return list(itertools.islice(iter(make_loader(dataset, 2, 2, pin_memory=False)), count))

    full = batches(0, 11)
    resumed = batches(5, 6)
    for a, b in zip(full[5:], resumed):
        for key in ("latents", "text", "pooled"):
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    # The two workers read different files: batches 0 and 1 share no latent.
    assert not set(map(tuple, full[0]["latents"].flatten(1).tolist())) & set(map(tuple, full[1]["latents"].flatten(1).tolist()))


def test_raw_shards_batches_and_caption_mix(components_dir, shard_paths):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(components_dir / "tokenizer")
    decoded = {}
    for prob in (0.0, 1.0):
        dataset = RawShards(shard_paths, resolution=32, tokenizer=tokenizer, max_text_length=TEXT_LENGTH, synthetic_prob=prob, batch_size=6, seed=0)
        batch = next(iter(dataset))
        assert batch["pixels"].shape == (6, 3, 32, 32) and batch["pixels"].dtype == torch.uint8
        assert batch["input_ids"].shape == (6, TEXT_LENGTH)
        decoded[prob] = tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
    assert all("background" not in c for c in decoded[0.0])  # originals only: "red circle, blue"
    assert any("background" in c for c in decoded[1.0])  # synthetic where the record has one


def test_undecodable_image_is_replaced_by_the_next_row(components_dir, tmp_path, caplog):
    import webdataset as wds
    from transformers import AutoTokenizer

    paths = write_shards(tmp_path / "good", shards=1, per_shard=3)
    broken = tmp_path / "000000.tar"
    samples = index_tar(paths[0])
    with open(paths[0], "rb") as handle, wds.TarWriter(str(broken)) as writer:
        for i, sample in enumerate(samples):
            fields = {ext: read_member(handle, *span) for ext, span in sample.members.items()}
            if i == 0:
                fields["png"] = b"not an image"
            writer.write({"__key__": sample.key, **fields})
    tokenizer = AutoTokenizer.from_pretrained(components_dir / "tokenizer")
    dataset = RawShards([str(broken)], resolution=32, tokenizer=tokenizer, max_text_length=TEXT_LENGTH, synthetic_prob=0.0, batch_size=3, seed=0)
    with caplog.at_level(logging.WARNING):
        batch = next(iter(dataset))
    assert batch["pixels"].shape[0] == 3
    assert "cannot decode" in caplog.text

"""Resolution stages with aspect buckets: kill-and-resume is exact within a bucketed stage and
across a stage boundary; `trainer sample --width W --height H` draws any trained bucket,
pixel for pixel what the exported diffusers pipeline draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.trainer.conftest import bucket_config, shard_spec
from tests.trainer.test_train import metrics, run_cli, run_ddp
from trainer.cache import build_cache
from trainer.checkpoint import latest_checkpoint, list_checkpoints, read_state
from trainer.cli import main
from trainer.export import grid
from trainer.train import StagedSchedule, WarmupCosine, stage_at


@pytest.fixture(scope="module")
def cache_48(tmp_path_factory, components_dir, aspect_shard_paths):
    directory = tmp_path_factory.mktemp("bucket-cache-48")
    build_cache(bucket_config(components_dir, data={"resolution": 48}, cache={"samples_per_file": 4}), shard_spec(aspect_shard_paths), directory)
    return directory


def staged_config(components_dir, bucket_cache_dir, cache_48, **data):
    return bucket_config(
        components_dir,
        max_steps=8,
        stages=[
            {"resolution": 32, "steps": 4, "cache": str(bucket_cache_dir)},
            {"resolution": 48, "steps": 4, "cache": str(cache_48), "batch_size": 2, "lr": 5e-4},
        ],
        data={"batch_size": 3, **data},
        optim={"warmup_steps": 2},
        checkpoint={"every_steps": 2, "keep_last": 10},
    )


def test_staged_schedule():
    stages = StagedSchedule([0, 10], [10, 20], [1.0, 0.5], warmup_steps=4, min_ratio=0.1)
    first = WarmupCosine(4, 10, 0.1)
    second = WarmupCosine(4, 20, 0.1)
    assert [stages(s) for s in range(10)] == [first(s) for s in range(10)]
    assert [stages(s) for s in range(10, 30)] == [0.5 * second(s) for s in range(20)]  # warms up anew


def test_kill_and_resume_across_a_stage_boundary(tmp_path, components_dir, bucket_cache_dir, cache_48):
    config = staged_config(components_dir, bucket_cache_dir, cache_48, num_workers=2)
    assert [stage_at(config.resolved_stages(), s) for s in range(9)] == [0, 0, 0, 0, 1, 1, 1, 1, 1]
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    fit = ["fit", "--config", str(config_file), "--output"]

    done = run_cli([*fit, str(straight)])
    assert done.returncode == 0, done.stderr[-3000:]
    # Killed after step 5: the last checkpoint is step 4, the last step of stage 0.
    assert run_cli([*fit, str(interrupted)], kill_at=5).returncode != 0
    boundary = latest_checkpoint(interrupted)
    assert read_state(boundary).step == 4 and read_state(boundary).data.stage == 0
    # Resumed there (it must open stage 1's cache at its first batch), killed again mid-stage 1.
    assert run_cli([*fit, str(interrupted), "--resume"], kill_at=7).returncode != 0
    mid = latest_checkpoint(interrupted)
    assert read_state(mid).step == 6 and read_state(mid).data.stage == 1 and read_state(mid).data.micro_batches == 2
    resumed = run_cli([*fit, str(interrupted), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    a, b = metrics(straight), metrics(interrupted)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in range(1, 9):
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-6, abs=1e-7), step
        assert b[step]["lr"] == pytest.approx(a[step]["lr"], rel=1e-9)
        assert b[step]["stage"] == a[step]["stage"] == (0 if step <= 4 else 1)
        assert b[step]["samples_seen"] == a[step]["samples_seen"]
    # The logged lr is the next step's: stage 1 (peak 5e-4) warms up over 2 steps from step 4.
    assert (a[4]["lr"], a[5]["lr"]) == (pytest.approx(5e-4 / 2), pytest.approx(5e-4))
    final_a, final_b = latest_checkpoint(straight), latest_checkpoint(interrupted)
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        ta, tb = load_file(str(final_a / name)), load_file(str(final_b / name))
        for key in ta:
            torch.testing.assert_close(ta[key], tb[key], rtol=1e-6, atol=1e-7, msg=f"{name}:{key}")
    assert "size_embedder.0.weight" in load_file(str(final_a / "model.safetensors"))  # size conditioning on with buckets
    assert [read_state(c).data.stage for c in list_checkpoints(straight)] == [0, 0, 1, 1]


@pytest.mark.slow  # the single-process test above covers the same code; this adds two ranks
def test_two_rank_kill_and_resume_across_a_stage_boundary(tmp_path, components_dir, bucket_cache_dir, cache_48):
    config = staged_config(components_dir, bucket_cache_dir, cache_48, num_workers=1)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    fit = ["fit", "--config", str(config_file), "--output"]
    done = run_ddp([*fit, str(straight)])
    assert done.returncode == 0, done.stderr[-3000:]
    run_ddp([*fit, str(interrupted)], kill_at=5)
    assert read_state(latest_checkpoint(interrupted)).step == 4
    resumed = run_ddp([*fit, str(interrupted), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = metrics(straight), metrics(interrupted)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in range(1, 9):
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-6, abs=1e-7), step
    for name in ("model.safetensors", "ema.safetensors"):
        ta, tb = load_file(str(latest_checkpoint(straight) / name)), load_file(str(latest_checkpoint(interrupted) / name))
        for key in ta:
            torch.testing.assert_close(ta[key], tb[key], rtol=1e-6, atol=1e-7)


def test_sample_a_bucket_equals_the_exported_pipeline(tmp_path, components_dir, bucket_cache_dir, aspect_shard_paths):
    """A run whose last stage is 272 px (its buckets include 384x192): `trainer sample
    --width 384 --height 192` and DiffusionPipeline(..., width=384, height=192) agree."""
    from diffusers import DiffusionPipeline

    from trainer.train import fit

    cache_272 = tmp_path / "cache-272"
    build_cache(bucket_config(components_dir, data={"resolution": 272}, cache={"samples_per_file": 8}), shard_spec(aspect_shard_paths[:1]), cache_272)
    prompt = "a red circle on a blue background"
    config = bucket_config(
        components_dir,
        max_steps=3,
        stages=[{"resolution": 32, "steps": 2, "cache": str(bucket_cache_dir)}, {"resolution": 272, "steps": 1, "cache": str(cache_272), "batch_size": 1}],
        validation={"prompts": [prompt], "steps": 3, "guidance": 2.0},
        checkpoint={"every_steps": 10},
    )
    run = tmp_path / "run"
    fit(config, run)

    out = tmp_path / "wide.png"
    args = ["sample", "--run", str(run), "--prompt", prompt, "--steps", "3", "--guidance", "2", "--seed", "7", "--num-per-prompt", "2"]
    assert main([*args, "--width", "384", "--height", "192", "--out", str(out)]) == 0
    from PIL import Image

    sampled = np.asarray(Image.open(out).convert("RGB"))
    assert sampled.shape == (192, 2 * 384, 3) and sampled.std() > 1

    pipe = DiffusionPipeline.from_pretrained(str(run / "export"), trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    images = pipe([prompt], num_images_per_prompt=2, num_inference_steps=3, guidance_scale=2.0, width=384, height=192, generator=torch.Generator().manual_seed(7)).images
    assert np.array_equal(np.asarray(grid(images, 2)), sampled)
    # The conditions matter: another (cropped) original size gives other pixels.
    cropped = pipe([prompt], num_images_per_prompt=2, num_inference_steps=3, guidance_scale=2.0, width=384, height=192, original_size=(96, 384), crops_coords_top_left=(48, 0), generator=torch.Generator().manual_seed(7), output_type="np").images
    assert not np.array_equal((cropped * 255).round().astype(np.uint8), np.stack([np.asarray(i) for i in images]))

    with pytest.raises(SystemExit, match="not a bucket the run was trained on"):
        main([*args, "--width", "384", "--height", "200", "--out", str(tmp_path / "x.png")])

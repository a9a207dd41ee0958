"""`trainer lora`: training with held-out loss, previews, export formats, resume, the command
line (the folder checks, buckets and batches are in `test_lora_data.py`).

One base model (a `trainer fit` run on palette shapes, built once for the module) serves
every test; LoRA runs are short except the concept run, which shows the adapter binding a
colour the base never saw to the trigger word while prompts without it stay as they were.
(Over 500 lines on purpose: splitting it would train that base model once per module.)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from schemas.lora import CaptionSource, LoraDataReport, LoraRunSummary, LoraTrainConfig
from tests.trainer.lora_helpers import (
    CONCEPT_RGB,
    TRIGGER,
    color_fractions,
    comfyui_merged,
    reference_latents,
    sample_latents,
    short_config,
    write_concept_folder,
    write_odd_folder,
)
from trainer.lora_data import BatchPlan, make_buckets, nearest_bucket
from trainer.testing.shapes import PALETTE, SHAPES

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Several test processes share two cores: one intra-op thread each avoids oversubscription.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def base_run(lora_base_run) -> Path:
    # tests/trainer/conftest.py: built once per session (the UI tests use it too); its
    # components' VAE separates the palette colours and the concept's.
    return lora_base_run


def quiet(fn, *args, **kwargs):
    with contextlib.redirect_stderr(io.StringIO()):  # progress bars
        return fn(*args, **kwargs)


def base_prompts() -> tuple[list[str], list[str]]:
    """Prior-preservation prompts and (different) test prompts, both without the trigger."""
    colors = list(PALETTE)
    combos = [(s, c, b) for s in SHAPES for c in colors for b in colors if c != b]
    rng = np.random.default_rng(3)
    picked = [combos[i] for i in rng.permutation(len(combos))[:18]]
    prompts = [f"a {c} {s} on a {b} background" for s, c, b in picked]
    return prompts[:12], prompts[12:]


# ---- the concept run (must-show 1 and 2) --------------------------------------------------------


@pytest.fixture(scope="module")
def concept_run(tmp_path_factory, base_run):
    from trainer.lora import train_lora

    root = tmp_path_factory.mktemp("concept")
    images = write_concept_folder(root / "images", count=20)
    prior_prompts, _ = base_prompts()
    config = LoraTrainConfig.model_validate({
        "trigger": TRIGGER,
        "log_every_steps": 10,
        "adapter": {"rank": 4},
        "optim": {"steps": 300, "lr": 3e-3, "batch_size": 4, "warmup_steps": 10},
        "prior": {"prompts": prior_prompts, "images": 48, "sample_steps": 10, "weight": 3.0},
        "holdout": {"images": 2, "every_steps": 50},
        "preview": {"every_steps": 150, "steps": 6, "images_per_prompt": 2},
        "checkpoint": {"every_steps": 150},
        "output": {"comfyui": True},
    })
    printed = []
    summary = quiet(train_lora, images, base_run, root / "run", config, announce=printed.append)
    return {"run": root / "run", "images": images, "summary": summary, "config": config, "announced": printed}


def test_trigger_word_brings_the_new_concept_and_other_prompts_stay_as_the_base_draws_them(concept_run, base_run):
    from trainer.export import load_exported_pipeline
    from trainer.lora import components_of, load_lora

    base = load_exported_pipeline(base_run)
    base.set_progress_bar_config(disable=True)
    adapted = load_exported_pipeline(base_run)
    adapted.set_progress_bar_config(disable=True)
    load_lora(adapted, concept_run["run"])
    components = components_of(base)
    names, references = reference_latents(components, {**PALETTE, "concept": CONCEPT_RGB})
    colors = list(PALETTE)
    trigger_prompts = [f"a {colors[i]} {SHAPES[i % 3]} on a {TRIGGER} background" for i in range(3)]
    _, plain_prompts = base_prompts()

    def measure(prompts):
        """Concept share (base, LoRA), colour-histogram total variation LoRA vs base, RMS latent change."""
        concept, tv, shift = {"base": [], "lora": []}, [], []
        for prompt in prompts:
            before = sample_latents(base, prompt, components, count=8)
            after = sample_latents(adapted, prompt, components, count=8)  # same seeds: same starting noise
            hist_before, hist_after = color_fractions(before, names, references), color_fractions(after, names, references)
            concept["base"].append(hist_before["concept"])
            concept["lora"].append(hist_after["concept"])
            tv.append(0.5 * sum(abs(hist_before[n] - hist_after[n]) for n in names))
            shift.append(float((after - before).pow(2).mean().sqrt()))
        return float(np.mean(concept["base"])), float(np.mean(concept["lora"])), float(np.mean(tv)), float(np.mean(shift))

    trig_base, trig_lora, trig_tv, trig_shift = measure(trigger_prompts)
    plain_base, plain_lora, plain_tv, plain_shift = measure(plain_prompts)
    print(
        f"concept share of latent pixels: with '{TRIGGER}' base {trig_base:.2f} -> LoRA {trig_lora:.2f}; "
        f"without base {plain_base:.2f} -> LoRA {plain_lora:.2f}. Change vs base (colour histogram TV, RMS latent): "
        f"with {trig_tv:.2f}, {trig_shift:.2f}; without {plain_tv:.2f}, {plain_shift:.2f}"
    )
    # Measured over several base models (the demo tokenizer's ids vary between builds): the gain
    # with the trigger was 0.46-0.66, the concept share without it moved by -0.03..+0.02, and the
    # change without the trigger was at most 0.54x (latent RMS) and 0.48x (TV) the change with it.
    assert trig_lora - trig_base >= 0.3
    assert plain_lora <= plain_base + 0.05
    assert plain_tv < 0.75 * trig_tv and plain_shift < 0.75 * trig_shift


def test_adapter_loads_in_a_stock_diffusers_pipeline_and_matches_trainer_sample(concept_run, base_run):
    from diffusers import DiffusionPipeline

    from trainer.export import sample_grid
    from trainer.lora import LORA_FILE, sample_with_lora

    run = concept_run["run"]
    prompts = [f"a red circle on a {TRIGGER} background", "a blue square on a green background"]
    stock = DiffusionPipeline.from_pretrained(str(base_run / "export"), trust_remote_code=True)
    stock.set_progress_bar_config(disable=True)
    stock.load_lora_weights(str(run), adapter_name="subject")  # finds pytorch_lora_weights.safetensors
    stock.set_adapters(["subject"], adapter_weights=[0.8])
    expected = np.asarray(sample_grid(stock, prompts, images_per_prompt=2, steps=6, guidance=4.0, seed=11))
    ours = np.asarray(quiet(sample_with_lora, base_run, run, prompts, scales=0.8, images_per_prompt=2, steps=6, guidance=4.0, seed=11))
    assert np.array_equal(expected, ours)
    # The scale is applied: full strength draws something else.
    full = np.asarray(quiet(sample_with_lora, base_run, run / LORA_FILE, prompts, scales=1.0, images_per_prompt=2, steps=6, guidance=4.0, seed=11))
    assert not np.array_equal(full, ours)

    with safe_open(str(run / LORA_FILE), "pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
    assert keys and all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    peft_config = json.loads(metadata["lora_adapter_metadata"])
    assert peft_config["transformer.r"] == 4 and sorted(peft_config["transformer.target_modules"]) == ["to_k", "to_out", "to_q", "to_v"]


def test_load_lora_without_diffusers_lora_loader_matches_load_lora_weights(concept_run, base_run):
    """Pipelines exported before the LoRA mixins (no `load_lora_weights`) get the same
    adapter through `load_lora`'s own path."""
    import types

    from trainer.export import load_exported_pipeline
    from trainer.lora import load_lora, unload_lora

    stock = load_exported_pipeline(base_run)
    assert hasattr(stock, "load_lora_weights")
    load_lora(stock, concept_run["run"], 0.8)
    bare = types.SimpleNamespace(transformer=load_exported_pipeline(base_run).transformer)  # no loader methods
    names = load_lora(bare, concept_run["run"], 0.8)

    generator = torch.Generator().manual_seed(0)
    x, t = torch.randn((2, 4, 8, 8), generator=generator), torch.tensor([0.3, 0.8])
    text = torch.randn((2, 12, bare.transformer.config.text_dim), generator=generator)
    pooled = torch.randn((2, bare.transformer.config.pooled_dim), generator=generator)
    with torch.no_grad():
        expected = stock.transformer(x, t, text, pooled)
        got = bare.transformer(x, t, text, pooled)
        unload_lora(bare, names)
        base = bare.transformer(x, t, text, pooled)
        plain = load_exported_pipeline(base_run).transformer(x, t, text, pooled)
    assert torch.equal(got, expected)
    assert torch.equal(base, plain) and not torch.allclose(base, expected, atol=1e-3)


def test_previews_are_what_the_saved_adapter_draws(concept_run, base_run):
    from safetensors.torch import load_model

    from trainer.export import load_exported_pipeline, sample_grid
    from trainer.lora import adapter_weights, add_adapter, default_preview_prompts, load_lora, save_adapter

    run, config = concept_run["run"], concept_run["config"]
    report = LoraDataReport.model_validate_json((run / "data_report.json").read_text())
    prompts = default_preview_prompts(report, TRIGGER)
    p = config.preview

    def render(adapter_dir: Path) -> np.ndarray:
        pipe = load_exported_pipeline(base_run)
        load_lora(pipe, adapter_dir)
        return np.asarray(sample_grid(pipe, prompts, images_per_prompt=p.images_per_prompt, steps=p.steps, guidance=p.guidance, seed=p.seed))

    # Mid-run preview: rebuild the adapter from the step-150 checkpoint and draw it as a user would.
    trained = load_exported_pipeline(base_run).transformer
    add_adapter(trained, config.adapter)
    load_model(adapter_weights(trained), str(run / "checkpoints" / "step-00000150" / "model.safetensors"))
    save_adapter(run.parent / "adapter-150", trained)
    assert np.array_equal(np.asarray(Image.open(run / "samples" / "step-000150.png")), render(run.parent / "adapter-150"))
    # Final preview: the exported file.
    assert np.array_equal(np.asarray(Image.open(run / "samples" / "final.png")), render(run))


def test_comfyui_file_merges_to_the_same_model(concept_run, base_run):
    from trainer.export import load_exported_pipeline
    from trainer.lora import COMFYUI_FILE, load_lora

    run = concept_run["run"]
    comfy = load_file(str(run / COMFYUI_FILE))
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in comfy)
    base = load_exported_pipeline(base_run).transformer
    merged = load_exported_pipeline(base_run).transformer
    merged.load_state_dict(comfyui_merged(base.state_dict(), comfy, strength=0.8))
    adapted = load_exported_pipeline(base_run)
    load_lora(adapted, run, 0.8)

    generator = torch.Generator().manual_seed(0)
    x = torch.randn((2, 4, 8, 8), generator=generator)
    t = torch.tensor([0.3, 0.8])
    text = torch.randn((2, 12, merged.config.text_dim), generator=generator)
    pooled = torch.randn((2, merged.config.pooled_dim), generator=generator)
    with torch.no_grad():
        expected = adapted.transformer(x, t, text, pooled)
        got = merged(x, t, text, pooled)
        unchanged = base(x, t, text, pooled)
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    assert not torch.allclose(unchanged, expected, atol=1e-3)


def test_run_folder_reports_data_curve_and_usage(concept_run):
    run, summary = concept_run["run"], concept_run["summary"]
    saved = LoraRunSummary.model_validate_json((run / "summary.json").read_text())
    assert saved.trigger == TRIGGER and saved.steps_done == 300 and saved.adapter_file == "pytorch_lora_weights.safetensors"
    readme = (run / "README.md").read_text()
    assert f"Trigger word: **{TRIGGER}**" in readme
    assert "40 files" in readme and "--lora-scale" in readme and "load_lora_weights" in readme
    assert (run / "curve.png").is_file() and Image.open(run / "curve.png").size == (640, 320)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == list(range(0, 301, 50))
    assert all(len([k for k in r if k.startswith("heldout_t")]) == 5 for r in evals)
    assert evals[-1]["train_probe_loss"] < evals[0]["train_probe_loss"]
    trains = [r for r in records if r["kind"] == "train"]
    assert len(trains) == 30 and all("prior_loss" in r for r in trains)
    # What was printed before training started.
    announced = concept_run["announced"][0]
    assert len(announced.images) == 20 and len(announced.holdout) == 2 and not announced.set_aside
    assert summary.best_heldout_step is not None


# ---- data: sizes, corrupt files, duplicates, captions -------------------------------------------


ODD_SIZES = [(37, 53), (120, 40), (64, 64), (23, 90), (200, 91), (48, 33), (33, 48), (91, 91), (140, 60), (60, 140),
             (17, 65), (256, 100), (100, 256), (45, 44), (70, 35)]


def test_fifteen_odd_images_are_all_bucketed_and_trained_on(tmp_path, base_run):
    from trainer.lora import train_lora

    images = write_odd_folder(tmp_path / "odd", ODD_SIZES)
    config = short_config(holdout={"images": 0}, optim={"steps": 6, "batch_size": 3}, data={"min_side": 16, "bucket_max_aspect": 3.0})
    summary = quiet(train_lora, images, base_run, tmp_path / "run", config)
    report = LoraDataReport.model_validate_json((tmp_path / "run" / "data_report.json").read_text())
    assert len(report.images) == 15 and not report.set_aside
    assert {(i.width, i.height) for i in report.images} == set(ODD_SIZES)
    # Several buckets, each image in the one nearest its shape, every side a multiple of 8 (VAE 4 x patch 2).
    assert len(report.buckets) >= 4
    buckets = make_buckets(report.resolution, 8, config.data.bucket_max_aspect)
    for image in report.images:
        assert image.bucket_width % 8 == 0 and image.bucket_height % 8 == 0
        assert (image.bucket_width, image.bucket_height) == nearest_bucket(image.width, image.height, buckets)
    # One epoch of the plan the run used covers every image; short batches are padded with repeats of their bucket.
    by_bucket = {}
    for i, image in enumerate(report.images):
        by_bucket.setdefault((image.bucket_width, image.bucket_height), []).append(i)
    plan = BatchPlan(by_bucket, 3, config.seed)
    epoch = plan.epoch(0)
    assert sorted({i for batch in epoch for i in batch}) == list(range(15))
    for batch in epoch:
        assert len(batch) == 3 and len({(report.images[i].bucket_width, report.images[i].bucket_height) for i in batch}) == 1
    assert sum(b.padding_per_epoch for b in report.buckets) == 3 * len(epoch) - 15
    assert summary.steps_done == 6
    # Captionless images got the trigger word, and the report says so.
    assert {i.caption_source for i in report.images} == {CaptionSource.TXT, CaptionSource.TRIGGER}
    assert any("no usable caption" in w for w in report.warnings)


def test_corrupt_file_and_duplicates_are_reported_and_the_rest_trains(tmp_path, base_run):
    from trainer.lora import train_lora

    images = write_concept_folder(tmp_path / "images", count=16)
    original = images / "concept03.png"
    # A near duplicate: the same picture re-encoded as JPEG at 95% size.
    with Image.open(original) as picture:
        picture.convert("RGB").resize((46, 46), Image.Resampling.BICUBIC).save(images / "copy_of_03.jpg", quality=90)
    shutil.copyfile(images / "concept05.png", images / "concept05_again.png")  # an exact duplicate
    data = (images / "concept07.png").read_bytes()
    (images / "broken.png").write_bytes(data[: len(data) // 2])  # truncated
    (images / "notes.md").write_text("shot on a phone")
    printed = []
    quiet(train_lora, images, base_run, tmp_path / "run", short_config(), announce=printed.append)

    report = printed[0]
    aside = {row.file: row for row in report.set_aside}
    assert set(aside) == {"copy_of_03.jpg", "concept05_again.png", "broken.png"}
    assert aside["copy_of_03.jpg"].reason == "near_duplicate" and aside["copy_of_03.jpg"].duplicate_of == "concept03.png"
    assert aside["concept05_again.png"].reason == "exact_duplicate" and aside["concept05_again.png"].duplicate_of == "concept05.png"
    assert aside["broken.png"].reason in ("truncated_image", "not_an_image")
    assert len(report.images) == 16 and {i.file for i in report.images} == {f"concept{i:02d}.png" for i in range(16)}
    assert any(name.startswith("notes.md") for name in report.ignored)
    readme = (tmp_path / "run" / "README.md").read_text()
    assert "copy_of_03.jpg: near_duplicate" in readme and "broken.png" in readme
    assert LoraRunSummary.model_validate_json((tmp_path / "run" / "summary.json").read_text()).steps_done == 6


# ---- training pieces ---------------------------------------------------------------------------


def test_overfit_monitor_flags_held_out_loss_rising_while_training_loss_falls():
    from trainer.lora import OverfitMonitor

    monitor = OverfitMonitor(tolerance=0.05, patience=2)
    for step, heldout, probe in [(0, 1.0, 1.0), (10, 0.8, 0.8), (20, 0.85, 0.7), (30, 0.9, 0.6), (40, 0.95, 0.5)]:
        monitor.update(step, heldout, probe)
    assert monitor.best_step == 10 and monitor.flagged_step == 30
    # Both rising (diverging, not overfitting), or held-out within the tolerance: no flag.
    diverging = OverfitMonitor(tolerance=0.05, patience=2)
    for step, heldout, probe in [(0, 1.0, 1.0), (10, 0.8, 0.8), (20, 0.9, 0.9), (30, 1.0, 1.0), (40, 1.1, 1.1)]:
        diverging.update(step, heldout, probe)
    flat = OverfitMonitor(tolerance=0.05, patience=2)
    for step, heldout, probe in [(0, 1.0, 1.0), (10, 0.8, 0.8), (20, 0.82, 0.7), (30, 0.83, 0.6), (40, 0.83, 0.5)]:
        flat.update(step, heldout, probe)
    assert diverging.flagged_step is None and flat.flagged_step is None
    # A new best resets the count.
    reset = OverfitMonitor(tolerance=0.05, patience=2)
    for step, heldout, probe in [(0, 1.0, 1.0), (10, 1.2, 0.9), (20, 0.9, 0.8), (30, 1.0, 0.7)]:
        reset.update(step, heldout, probe)
    assert reset.flagged_step is None and reset.best_step == 20


def test_gradient_checkpointing_gives_the_same_gradients():
    from schemas.lora import LoraAdapterConfig
    from trainer.lora import add_adapter, enable_gradient_checkpointing
    from trainer.model import build_transformer

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = build_transformer("tiny", sample_size=8, in_channels=4, text_dim=16, pooled_dim=16, hidden_size=32, depth=2, num_heads=2)
        for p in model.parameters():  # a base that is not the identity at init
            torch.nn.init.normal_(p, std=0.05)
        add_adapter(model, LoraAdapterConfig(rank=2, targets="attention_mlp"))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
        if checkpointing:
            enable_gradient_checkpointing(model)
        generator = torch.Generator().manual_seed(1)
        x = torch.randn((2, 4, 8, 16), generator=generator)  # non-square latents
        out = model(x, torch.tensor([0.2, 0.7]), torch.randn((2, 5, 16), generator=generator), torch.randn((2, 16), generator=generator))
        out.pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and any(".fc1.lora_A" in k for k in plain)
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6), name


def test_resume_after_a_kill_is_exact(tmp_path, base_run):
    from trainer.checkpoint import list_checkpoints
    from trainer.lora import LORA_FILE, train_lora
    from trainer.train import KILL_AT_STEP_ENV

    images = write_concept_folder(tmp_path / "images", count=12)
    config = short_config(optim={"steps": 8}, preview={"every_steps": 4})
    quiet(train_lora, images, base_run, tmp_path / "straight", config)

    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "trainer.lora", "--images", str(images), "--base", str(base_run), "--output", str(killed), "--config", str(config_file), "--device", "cpu"]
    env = {**os.environ, KILL_AT_STEP_ENV: "6", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == -9, result.stderr[-3000:]
    assert [p.name for p in list_checkpoints(killed)] == ["step-00000004"]
    assert max(json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()) == 6
    with pytest.raises(FileExistsError):
        quiet(train_lora, images, base_run, killed, config)
    quiet(train_lora, images, base_run, killed, config, resume=True)

    straight, resumed = load_file(str(tmp_path / "straight" / LORA_FILE)), load_file(str(killed / LORA_FILE))
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert (tmp_path / "straight" / "metrics.jsonl").read_text() == (killed / "metrics.jsonl").read_text()
    assert np.array_equal(np.asarray(Image.open(tmp_path / "straight" / "samples" / "step-000004.png")), np.asarray(Image.open(killed / "samples" / "step-000004.png")))
    # A changed folder or config cannot be resumed into.
    (images / "concept00.txt").write_text("a different caption")
    with pytest.raises(ValueError, match="changed"):
        quiet(train_lora, images, base_run, killed, config, resume=True)
    with pytest.raises(ValueError, match="different config"):
        quiet(train_lora, images, base_run, killed, short_config(optim={"steps": 9}), resume=True)
    # The one resume policy (trainer.resume), as `trainer fit --resume`: refuse, naming the fields.
    with pytest.raises(ValueError, match=r"different config \(optim\.steps differ\)"):
        quiet(train_lora, images, base_run, killed, short_config(optim={"steps": 9}, preview={"every_steps": 4}), resume=True)


# ---- command line ------------------------------------------------------------------------------


def test_cli_flags_build_the_config_and_dry_run_prints_the_folder(tmp_path, base_run, capsys):
    from trainer.lora import add_lora_arguments, config_from_args, lora_main

    parser = argparse.ArgumentParser()
    add_lora_arguments(parser)
    args = parser.parse_args(["--images", "x", "--base", "y", "--output", str(tmp_path / "run"), "--trigger", "sks", "--rank", "8",
                              "--steps", "20", "--lr", "2e-4", "--targets", "attention_mlp", "--comfyui", "--set", "holdout.patience=5",
                              "--preview-prompt", "sks on a beach", "--prior-prompt", "a photo of a dog", "--prior-weight", "2",
                              "--on-overfit", "stop"])
    config = config_from_args(args)
    assert (config.trigger, config.adapter.rank, config.optim.steps, config.optim.lr) == ("sks", 8, 20, 2e-4)
    assert config.adapter.targets == "attention_mlp" and config.output.comfyui and config.holdout.patience == 5
    assert config.preview.prompts == ["sks on a beach"] and config.prior.prompts == ["a photo of a dog"] and config.prior.weight == 2
    assert config.holdout.on_overfit == "stop"
    with pytest.raises(SystemExit):
        parser.parse_args(["--images", "x", "--base", "y", "--output", "z", "--on-overfit", "panic"])
    # --resume starts from the run's saved config; flags given again override it.
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(config.model_dump_json())
    resumed = config_from_args(parser.parse_args(["--images", "x", "--base", "y", "--output", str(tmp_path / "run"), "--resume", "--steps", "30"]))
    assert resumed.trigger == "sks" and resumed.adapter.rank == 8 and resumed.optim.steps == 30
    shutil.rmtree(tmp_path / "run")

    images = write_odd_folder(tmp_path / "odd", ODD_SIZES[:6])
    (images / "junk.jpg").write_bytes(b"<html>not an image</html>")
    assert lora_main(["--images", str(images), "--base", str(base_run), "--output", str(tmp_path / "run"), "--trigger", "sks", "--dry-run", "--set", "data.min_side=16"]) == 0
    out = capsys.readouterr().out
    assert "used: 6" in out and "junk.jpg: not_an_image" in out and "buckets at 32^2 px" in out
    assert not (tmp_path / "run").exists()


def test_sample_lora_options_load_stacked_adapters(concept_run, base_run):
    from trainer.export import load_exported_pipeline
    from trainer.lora import add_sample_lora_arguments, apply_sample_lora

    parser = argparse.ArgumentParser()
    add_sample_lora_arguments(parser)
    pipe = load_exported_pipeline(base_run)
    assert apply_sample_lora(pipe, parser.parse_args([])) == []
    names = apply_sample_lora(pipe, parser.parse_args(["--lora", str(concept_run["run"]), "--lora", str(concept_run["run"] / "pytorch_lora_weights.safetensors"), "--lora-scale", "0.5", "--lora-scale", "0.25"]))
    assert names == ["lora0", "lora1"]
    scales = {module.scaling[name] for module in pipe.transformer.modules() if hasattr(module, "scaling") for name in names}
    assert scales == {0.5, 0.25}  # alpha = rank: scaling is the strength
    with pytest.raises(FileNotFoundError, match="pytorch_lora_weights"):
        apply_sample_lora(load_exported_pipeline(base_run), parser.parse_args(["--lora", str(base_run)]))


class _FlagsAtStep4:
    """An OverfitMonitor whose verdicts are scripted: best held-out loss at step 2,
    overfitting flagged at step 4 (the real rule is tested on its own above)."""

    def __init__(self, tolerance, patience):
        self.best_step, self.best_loss, self.flagged_step = None, float("inf"), None

    def update(self, step, heldout, probe):
        if step == 4:
            self.flagged_step = step
        if step <= 2:
            self.best_step, self.best_loss = step, heldout
            return True
        return False


@pytest.mark.parametrize("action", ["stop", "warn"])
def test_overfitting_stops_or_keeps_the_best_adapter(tmp_path, base_run, monkeypatch, action):
    import trainer.lora.loop
    from trainer.lora import LORA_FILE, train_lora

    images = write_concept_folder(tmp_path / "images", count=12)
    # A constant LR after warmup: the weights after step 2 do not depend on the planned length.
    at_two = quiet(train_lora, images, base_run, tmp_path / "two", short_config(optim={"steps": 2}))
    assert at_two.steps_done == 2
    monkeypatch.setattr(trainer.lora.loop, "OverfitMonitor", _FlagsAtStep4)
    summary = quiet(train_lora, images, base_run, tmp_path / "run", short_config(optim={"steps": 8}, holdout={"on_overfit": action}))
    assert summary.overfit_step == 4 and summary.best_heldout_step == 2
    best_file = tmp_path / "run" / (LORA_FILE if action == "stop" else f"best/{LORA_FILE}")
    expected, got = load_file(str(tmp_path / "two" / LORA_FILE)), load_file(str(best_file))
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    readme = (tmp_path / "run" / "README.md").read_text()
    assert "Overfitting was flagged at step 4" in readme
    if action == "stop":
        assert summary.stopped_early and summary.steps_done == 4 and summary.exported_step == 2
    else:
        assert not summary.stopped_early and summary.steps_done == 8 and summary.exported_step == 8
        assert summary.best_adapter_file == f"best/{LORA_FILE}" and "best/" in readme
        final = load_file(str(tmp_path / "run" / LORA_FILE))
        assert not all(torch.equal(final[k], got[k]) for k in final)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")  # a marker: the base_run fixture is not built
def test_bf16_training_on_cuda(tmp_path, base_run):
    from trainer.export import load_exported_pipeline
    from trainer.lora import load_lora, train_lora

    images = write_concept_folder(tmp_path / "images", count=12)
    summary = quiet(train_lora, images, base_run, tmp_path / "run", short_config(gradient_checkpointing=True), device="cuda")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["mixed_precision"] == "auto"
    assert all(np.isfinite(r.get("loss", 0.0)) and np.isfinite(r.get("heldout_loss", 0.0)) for r in records)
    assert summary.steps_done == 6
    pipe = load_exported_pipeline(base_run)
    load_lora(pipe, tmp_path / "run")  # a CUDA-trained adapter loads on CPU


def test_option_builders_import_without_torch_or_diffusers():
    # `trainer --help` builds every subcommand's options: they must not import the heavy stack.
    code = "import sys, argparse, trainer.lora as l; l.add_lora_arguments(argparse.ArgumentParser()); l.add_sample_lora_arguments(argparse.ArgumentParser()); print(sorted(m for m in ('torch', 'diffusers', 'peft', 'apache_beam') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"

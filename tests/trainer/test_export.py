"""The export: DiffusionPipeline.from_pretrained loads it, `trainer sample` draws from it,
and both give exactly the preview images training drew from the EMA weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.trainer.conftest import tiny_config
from trainer.cli import main
from trainer.export import grid, load_exported_pipeline

PROMPTS = ["a red circle on a blue background", "a green square on a white background"]
VALIDATION = {"every_steps": 2, "prompts": PROMPTS, "images_per_prompt": 2, "steps": 4, "guidance": 3.0, "seed": 5}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, components_dir, cache_dir):
    from trainer.train import fit

    run = tmp_path_factory.mktemp("run")
    fit(tiny_config(components_dir, max_steps=4, data={"cache": str(cache_dir)}, validation=VALIDATION, checkpoint={"every_steps": 2}), run)
    return run


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_export_is_a_diffusers_folder_with_its_code(trained_run):
    export = trained_run / "export"
    index = json.loads((export / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "ImagemillPipeline"]
    assert index["transformer"] == ["modeling_imagemill", "DiffusionTransformer"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"] and index["scheduler"][1] == "FlowMatchEulerDiscreteScheduler"
    assert (export / "pipeline.py").is_file() and (export / "transformer" / "modeling_imagemill.py").is_file()
    weights = sorted(p.name for p in export.rglob("*") if p.suffix in (".safetensors", ".bin", ".pt"))
    assert weights and all(w.endswith(".safetensors") for w in weights)
    with pytest.raises(ValueError, match="trust_remote_code"):
        from diffusers import DiffusionPipeline

        DiffusionPipeline.from_pretrained(str(export))


def test_sample_matches_the_training_preview_and_diffusion_pipeline(trained_run, tmp_path):
    out = tmp_path / "grid.png"
    argv = ["sample", "--run", str(trained_run), "--steps", "4", "--guidance", "3", "--seed", "5", "--num-per-prompt", "2", "--out", str(out)]
    assert main(argv + [arg for p in PROMPTS for arg in ("--prompt", p)]) == 0
    sampled = pixels(out)
    preview = pixels(trained_run / "samples" / "step-00000004.png")  # drawn in training from the EMA model
    assert sampled.shape == preview.shape == (2 * 32, 2 * 32, 3)
    assert np.array_equal(sampled, preview)
    assert sampled.std() > 1  # not a blank image

    # The user's own call, with the same seed, gives the same images.
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(trained_run / "export"), trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(PROMPTS, num_images_per_prompt=2, num_inference_steps=4, guidance_scale=3.0, generator=torch.Generator().manual_seed(5)).images
    assert np.array_equal(np.asarray(grid(images, 2)), sampled)

    # Without --prompt, `trainer sample` uses the run's preview prompts and settings.
    default = tmp_path / "default.png"
    assert main(["sample", "--run", str(trained_run), "--num-per-prompt", "2", "--seed", "5", "--out", str(default)]) == 0
    assert np.array_equal(pixels(default), preview)


def test_export_from_a_checkpoint(trained_run, tmp_path):
    checkpoint = trained_run / "checkpoints" / "step-00000002"
    assert main(["export", "--run", str(trained_run), "--checkpoint", str(checkpoint), "--output", str(tmp_path / "at2")]) == 0
    exported = load_file(str(tmp_path / "at2" / "transformer" / "diffusion_pytorch_model.safetensors"))
    saved = load_file(str(checkpoint / "ema.safetensors"))
    assert exported.keys() == saved.keys()
    assert all(torch.equal(exported[k], saved[k]) for k in saved)
    final = load_file(str(trained_run / "export" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(final[k], saved[k]) for k in saved)  # step 4 differs from step 2
    pipe = load_exported_pipeline(tmp_path / "at2")
    assert type(pipe).__name__ == "ImagemillPipeline"

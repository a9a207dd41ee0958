"""Export a trained denoiser as a diffusers pipeline, load it back, and draw sample grids.

`RUN_DIR/export/` is a standard diffusers folder (`model_index.json`, one subfolder per
component, safetensors weights) plus the code that defines the two custom classes:
`pipeline.py` (a copy of `trainer/pipeline.py`) and `transformer/modeling_imagemill.py`
(a copy of `trainer/model.py`). `model_index.json` names them the way diffusers' custom
pipelines do, so

    DiffusionPipeline.from_pretrained("RUN_DIR/export", trust_remote_code=True)

works with diffusers alone. Training previews, `trainer sample` and that call all run the
same `ImagemillPipeline.__call__`; `sample_grid` draws the initial noise from a CPU
generator so a seed gives the same images on any device.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image

import trainer.model as model_module
import trainer.pipeline as pipeline_module
from trainer.pipeline import ImagemillPipeline

logger = logging.getLogger(__name__)

EXPORT = "export"
PIPELINE_MODULE = "pipeline"
MODEL_MODULE = "modeling_imagemill"


def make_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Euler on the rectified-flow ODE; shift 1 keeps the steps evenly spaced in t."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def make_pipeline(transformer, components) -> ImagemillPipeline:
    """The pipeline around a denoiser (the EMA model during training) and the frozen parts."""
    return ImagemillPipeline(
        transformer=transformer,
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        scheduler=make_scheduler(),
    )


def export_pipeline(pipe: ImagemillPipeline, output: str | Path) -> Path:
    """Save `pipe` to `output` (replaced atomically) in diffusers format with its code."""
    output = Path(output)
    tmp = output.with_name(output.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    shutil.copyfile(pipeline_module.__file__, tmp / f"{PIPELINE_MODULE}.py")
    shutil.copyfile(model_module.__file__, tmp / "transformer" / f"{MODEL_MODULE}.py")
    index_path = tmp / "model_index.json"
    index = json.loads(index_path.read_text())
    index["_class_name"] = [PIPELINE_MODULE, type(pipe).__name__]
    index["transformer"] = [MODEL_MODULE, type(pipe.transformer).__name__]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    if output.exists():
        shutil.rmtree(output)
    tmp.rename(output)
    logger.info("exported pipeline to %s", output)
    return output


def export_dir(run_or_export: str | Path) -> Path:
    path = Path(run_or_export)
    if (path / "model_index.json").is_file():
        return path
    if (path / EXPORT / "model_index.json").is_file():
        return path / EXPORT
    raise FileNotFoundError(
        f"{path} holds no exported pipeline (no model_index.json in it or in {path / EXPORT}); "
        "`trainer fit` exports when it finishes, or run `trainer export --run RUN_DIR`"
    )


def load_exported_pipeline(run_or_export: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """`DiffusionPipeline.from_pretrained` on an export (the user's code path), moved to `device`."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(export_dir(run_or_export)), trust_remote_code=True, dtype=dtype)
    return pipe.to(device)


def grid(images: list[Image.Image], columns: int) -> Image.Image:
    """Images laid out row by row, `columns` per row."""
    width, height = images[0].size
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * width, rows * height), (0, 0, 0))
    for i, image in enumerate(images):
        sheet.paste(image, ((i % columns) * width, (i // columns) * height))
    return sheet


def sample_grid(pipe, prompts: list[str], *, images_per_prompt: int, steps: int, guidance: float, seed: int, height: int | None = None, width: int | None = None) -> Image.Image:
    """One row per prompt, `images_per_prompt` columns, noise from a CPU generator seeded `seed`;
    images of `height` x `width` pixels (default: the pipeline's)."""
    generator = torch.Generator("cpu").manual_seed(seed)
    previous = getattr(pipe, "_progress_bar_config", {}).copy()
    pipe.set_progress_bar_config(disable=True)
    try:
        images = pipe(
            prompts,
            num_images_per_prompt=images_per_prompt,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generator,
            height=height,
            width=width,
        ).images
    finally:
        pipe.set_progress_bar_config(**previous)
    return grid(images, images_per_prompt)

"""`trainer lora`: teach a trained base model one subject or style from 15-200 images.

    trainer lora --images DIR --base MODEL --output RUN_DIR [--trigger WORD] [--rank R --steps N --lr LR ...]

MODEL is a diffusers-format pipeline folder as `trainer fit` exports it (`RUN_DIR/export`,
or the run folder itself). The command:

1. reads DIR with `trainer.lora_data.prepare_dataset` (the curation stages' decode and
   dedup checks, captions, aspect-ratio buckets, held-out split) and prints what it found
   before any training; the full report goes to `RUN_DIR/data_report.json`;
2. encodes every image once with the base pipeline's VAE (at its bucket size) and every
   caption with its text encoder (`trainer.pipeline.encode_prompt`, what sampling uses);
3. injects peft LoRA layers (rank, alpha, dropout) into the denoiser's attention
   projections `to_q`, `to_k`, `to_v`, `to_out` (optionally the MLP's `fc1`, `fc2`) and
   trains only them, in fp32 under bf16 autocast on CUDA, on the base trainer's
   rectified-flow loss (`trainer.train.training_loss`) plus a prior-preservation term:
   for prompts without the trigger word the adapted model is pulled towards what a frozen
   copy of the base predicts (`prior_loss`, `LoraPriorConfig`), so they keep drawing
   what the base drew;
4. every `holdout.every_steps` measures the held-out loss by timestep bucket and a train
   probe at fixed timesteps and noise (`HeldOutLoss`) and flags overfitting, held-out
   loss rising while training loss falls (`OverfitMonitor`): warn, or stop and export
   the best step;
5. every `preview.every_steps` saves the adapter exactly as it is exported, loads it into
   the frozen base pipeline with `load_lora` (what `trainer sample --lora` does) and draws
   fixed prompts and seeds (`Previews`), so a preview is what users will get;
6. checkpoints with the base trainer's `save_checkpoint` (safetensors, atomic, RNG and
   generator states, data position = batches consumed), so `--resume` continues exactly;
7. exports `RUN_DIR/pytorch_lora_weights.safetensors` in diffusers' LoRA format (keys
   `transformer.<module>.lora_A/B.weight`, the peft `LoraConfig` in the safetensors
   metadata, written by `save_lora_weights`), optionally `lora_comfyui.safetensors` with
   kohya/ComfyUI key names, and `summary.json`, `curve.png`, `README.md`.

Loading: `pipe.load_lora_weights(RUN_DIR)` on the exported pipeline (its class mixes in
`lora_loader_mixin()`, the denoiser `PeftAdapterMixin`). `load_lora` takes that route when
the pipeline has it and otherwise does the same steps with diffusers' and peft's
functions on `pipe.transformer` (pipelines exported before the mixins were added).

The package: `adapters` (create, save, load), `evaluation` (held-out loss, overfit
monitor, previews), `loop` (`train_lora`), `cli` (options and `python -m trainer.lora`).
The names other modules import stay importable from `trainer.lora`.
"""

from trainer.lora.adapters import (
    COMFYUI_FILE,
    LORA_FILE,
    adapter_weights,
    add_adapter,
    enable_gradient_checkpointing,
    load_lora,
    lora_loader_mixin,
    sample_with_lora,
    save_adapter,
    unload_lora,
)
from trainer.lora.cli import add_lora_arguments, add_sample_lora_arguments, apply_sample_lora, cmd_lora, config_from_args, lora_main
from trainer.lora.evaluation import HeldOutLoss, OverfitMonitor, Previews, default_preview_prompts
from trainer.lora.loop import components_of, train_lora

__all__ = [
    "COMFYUI_FILE",
    "LORA_FILE",
    "HeldOutLoss",
    "OverfitMonitor",
    "Previews",
    "adapter_weights",
    "add_adapter",
    "add_lora_arguments",
    "add_sample_lora_arguments",
    "apply_sample_lora",
    "cmd_lora",
    "components_of",
    "config_from_args",
    "default_preview_prompts",
    "enable_gradient_checkpointing",
    "load_lora",
    "lora_loader_mixin",
    "lora_main",
    "sample_with_lora",
    "save_adapter",
    "train_lora",
    "unload_lora",
]

"""The `trainer lora` command line: options (also a subparser of `trainer`), the
config they build (saved config.json when resuming, else --config, then --set
overrides, then flags), `python -m trainer.lora`, and the `--lora` options of
`trainer sample`."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path


from schemas.lora import LoraTrainConfig
from schemas.scoring import RecaptionConfig
from schemas.overrides import apply_set_overrides, set_dotted
from trainer.lora.adapters import load_lora
from trainer.lora.loop import train_lora

logger = logging.getLogger(__name__)

# torch, diffusers and peft are imported where they are used: `trainer --help` and the
# option builders must not pay for them (diffusers' LoRA loaders alone take seconds).


# ---- command line ----------------------------------------------------------------------------

# flag -> (config path, type, help, choices)
_FLAGS: dict[str, tuple[str, type, str, tuple | None]] = {
    "--trigger": ("trigger", str, "word bound to the subject or style (prefixed to captions; used for previews)", None),
    "--rank": ("adapter.rank", int, "LoRA rank (default 16)", None),
    "--alpha": ("adapter.alpha", float, "LoRA alpha (default: = rank)", None),
    "--targets": ("adapter.targets", str, "layers that get LoRA (default attention)", ("attention", "attention_mlp")),
    "--steps": ("optim.steps", int, "optimizer steps (default 1000)", None),
    "--lr": ("optim.lr", float, "learning rate (default 1e-4)", None),
    "--batch-size": ("optim.batch_size", int, "images per step (default 4)", None),
    "--resolution": ("data.resolution", int, "bucket area resolution^2 (default: the base model's size)", None),
    "--prior-weight": ("prior.weight", float, "weight of prior preservation (default 1; 0 disables)", None),
    "--holdout": ("holdout.images", int, "images held out for the overfitting check (default 2; 0 disables)", None),
    "--eval-every": ("holdout.every_steps", int, "steps between held-out evaluations (default 50)", None),
    "--on-overfit": ("holdout.on_overfit", str, "what to do when held-out loss rises while training loss falls (default warn)", ("warn", "stop")),
    "--preview-every": ("preview.every_steps", int, "steps between preview grids (default 250; 0: final only)", None),
    "--checkpoint-every": ("checkpoint.every_steps", int, "steps between checkpoints (default 250)", None),
    "--mixed-precision": ("mixed_precision", str, "default auto: bf16 on CUDA, fp32 on CPU", ("auto", "no", "bf16")),
    "--seed": ("seed", int, "seed of everything random (default 0)", None),
}


def add_lora_arguments(parser: argparse.ArgumentParser) -> None:
    """The `trainer lora` options (for a subparser of the `trainer` CLI); run with `cmd_lora`."""
    parser.add_argument("--images", required=True, help="folder of 15-200 images, with optional IMAGE.txt captions")
    parser.add_argument("--base", required=True, help="base model: a diffusers pipeline folder from `trainer fit` (RUN_DIR or RUN_DIR/export)")
    parser.add_argument("--output", required=True, help="run folder for the adapter, previews, checkpoints, README")
    parser.add_argument("--config", help="YAML file with LoraTrainConfig fields (flags override it)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any config field, e.g. --set holdout.patience=5")
    for flag, (_, kind, text, choices) in _FLAGS.items():
        parser.add_argument(flag, type=kind, help=text, choices=choices)
    parser.add_argument("--preview-prompt", action="append", help="preview prompt (repeat); default: a training caption and the trigger")
    parser.add_argument("--prior-prompt", action="append", help="prompt for prior preservation, e.g. 'a photo of a dog' (repeat); default: the captions without the trigger")
    parser.add_argument("--gradient-checkpointing", action="store_true", default=None, help="recompute blocks in backward (less memory)")
    parser.add_argument("--comfyui", action="store_true", default=None, help="also write lora_comfyui.safetensors (kohya/ComfyUI keys)")
    parser.add_argument("--recaption-model", help="caption images without a .txt with this VLM (the recaption stage's model)")
    parser.add_argument("--resume", action="store_true", help="continue the run folder from its latest checkpoint")
    parser.add_argument("--device", help="torch device (default: cuda when available)")
    parser.add_argument("--dry-run", action="store_true", help="check the folder and print what would be trained on, then stop")
    parser.set_defaults(func=cmd_lora)


def config_from_args(args: argparse.Namespace) -> LoraTrainConfig:
    """The config: the run's saved config.json when resuming, else the --config file or
    defaults; then --set overrides; then explicit flags."""
    import yaml

    tree: dict = {}
    saved = Path(args.output) / "config.json"
    if args.resume and saved.is_file():
        tree = json.loads(saved.read_text())
    elif args.config:
        tree = yaml.safe_load(Path(args.config).read_text()) or {}
    apply_set_overrides(tree, args.set or [])
    for flag, (path, _, _, _) in _FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            set_dotted(tree, path, value)
    if args.preview_prompt:
        set_dotted(tree, "preview.prompts", list(args.preview_prompt))
    if args.prior_prompt:
        set_dotted(tree, "prior.prompts", list(args.prior_prompt))
    if args.gradient_checkpointing:
        tree["gradient_checkpointing"] = True
    if args.comfyui:
        set_dotted(tree, "output.comfyui", True)
    if args.recaption_model:
        set_dotted(tree, "data.recaption", RecaptionConfig(model=args.recaption_model).model_dump(mode="json"))
    return LoraTrainConfig.model_validate(tree)


def cmd_lora(args: argparse.Namespace) -> int:
    from trainer.lora_report import format_data_report

    config = config_from_args(args)
    if args.dry_run:
        from trainer.export import export_dir, load_exported_pipeline
        from trainer.pipeline import vae_scale_factor
        from trainer.lora_data import load_recaptioner, prepare_dataset

        pipe = load_exported_pipeline(export_dir(args.base))
        factor = vae_scale_factor(pipe.vae)
        recaptioner = load_recaptioner(config.data.recaption) if config.data.recaption else None
        report = prepare_dataset(args.images, config, resolution=config.data.resolution or pipe.transformer.config.sample_size * factor, multiple=factor * pipe.transformer.config.patch_size, recaptioner=recaptioner)
        print(format_data_report(report))
        return 0
    summary = train_lora(
        args.images, args.base, args.output, config, resume=args.resume, device=args.device,
        announce=lambda report: print(format_data_report(report), flush=True),
    )
    run = Path(args.output)
    print(f"adapter: {run / summary.adapter_file} (step {summary.exported_step} of {summary.steps_planned})")
    if summary.comfyui_file:
        print(f"ComfyUI adapter: {run / summary.comfyui_file}")
    if summary.overfit_step is not None:
        print(f"overfitting flagged at step {summary.overfit_step} (best held-out loss at step {summary.best_heldout_step})")
    print(f"previews: {run / 'samples'}; report: {run / 'README.md'}")
    print(f"use it: trainer sample --run {args.base} --lora {run} --lora-scale 0.8 --prompt '{config.trigger or 'your prompt'} ...' --out out.png")
    return 0


def lora_main(argv: list[str] | None = None) -> int:
    """`python -m trainer.lora ...` (the same options as `trainer lora`)."""
    parser = argparse.ArgumentParser(prog="trainer lora", description="LoRA fine-tuning of a trained base model on a folder of images.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_lora_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


def add_sample_lora_arguments(parser: argparse.ArgumentParser) -> None:
    """`trainer sample` options: --lora RUN_DIR_OR_FILE (repeatable) and --lora-scale S (one per --lora)."""
    parser.add_argument("--lora", action="append", metavar="RUN_DIR_OR_FILE", help="LoRA adapter from `trainer lora` (repeat to stack)")
    parser.add_argument("--lora-scale", action="append", type=float, metavar="S", help="adapter strength, one per --lora (default 1.0)")


def apply_sample_lora(pipe, args: argparse.Namespace) -> list[str]:
    """Load the `--lora` adapters of `trainer sample` into `pipe` (no-op without --lora)."""
    sources = args.lora or []
    if not sources:
        return []
    scales = args.lora_scale or [1.0] * len(sources)
    if len(scales) == 1 and len(sources) > 1:
        scales = scales * len(sources)
    return load_lora(pipe, sources, scales)



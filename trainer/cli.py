"""The `trainer` command line.

    trainer init-components --output DIR                 tiny offline VAE + text encoder (demo/test aid)
    trainer cache  --shards SPEC --config CFG --output CACHE_DIR
    trainer fit    --config CFG --output RUN_DIR [--resume] [--cache DIR | --shards SPEC]
    trainer sample --run RUN_DIR [--prompt P ...] [--steps N --guidance G --seed S] [--width W --height H] --out FILE.png
    trainer bench  --config CFG [--steps N] [--cache DIR] [--peak-tflops T] [--bucket WxH ... | --all-buckets]
    trainer export --run RUN_DIR [--checkpoint DIR]
    trainer ui     --base RUN_DIR [--workdir DIR] [--host 127.0.0.1] [--port 7860]

CFG is a YAML file or the name of one in `trainer/configs/` (`demo`, `base-256`, ...).
`--set a.b=VALUE` overrides any config field (VALUE is parsed as YAML); `--components X`
points the VAE, text encoder and tokenizer at the `vae/`, `text_encoder/`, `tokenizer/`
subfolders of a folder or hub repo. Multi-GPU: `accelerate launch --config_file
infra/accelerate/multi_gpu.yaml -m trainer fit ...`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib import resources
from pathlib import Path

import yaml

from schemas.overrides import apply_set_overrides
from schemas.trainer import TrainConfig
from trainer.lora import add_lora_arguments, add_sample_lora_arguments

logger = logging.getLogger("trainer")


def named_configs() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in resources.files("trainer.configs").iterdir() if p.name.endswith(".yaml"))


def load_config(name_or_path: str | None, overrides: list[str] = ()) -> TrainConfig:
    """A `TrainConfig` from a YAML path or a named config, with `key.path=value` overrides."""
    tree: dict = {}
    if name_or_path:
        path = Path(name_or_path)
        if not path.is_file():
            bundled = resources.files("trainer.configs") / f"{name_or_path}.yaml"
            if not bundled.is_file():
                raise FileNotFoundError(f"config {name_or_path!r} is neither a file nor one of the named configs {named_configs()}")
            text = bundled.read_text()
        else:
            text = path.read_text()
        tree = yaml.safe_load(text) or {}
    apply_set_overrides(tree, overrides)
    return TrainConfig.model_validate(tree)


def _config_from_args(args) -> TrainConfig:
    from trainer.components import components_config_for

    config = load_config(args.config, args.set or [])
    updates = {}
    if getattr(args, "components", None):
        updates["components"] = components_config_for(args.components, config.components)
    data = {}
    if getattr(args, "cache", None):
        data["cache"] = args.cache
    if getattr(args, "shards", None):
        data["shards"] = args.shards
    if data:
        updates["data"] = config.data.model_copy(update=data)
    return TrainConfig.model_validate(config.model_copy(update=updates).model_dump()) if updates else config


def _add_config_args(parser: argparse.ArgumentParser, components: bool = True) -> None:
    parser.add_argument("--config", required=True, help="YAML file or named config (%s)" % ", ".join(named_configs()))
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field, e.g. --set optim.lr=3e-4")
    if components:
        parser.add_argument("--components", help="folder or hub id with vae/, text_encoder/, tokenizer/ subfolders")


def cmd_init_components(args) -> int:
    from trainer.testing.components import build_demo_components

    build_demo_components(Path(args.output), resolution=args.resolution, max_text_length=args.max_text_length, vae_steps=args.vae_steps, seed=args.seed)
    print(f"demo components (tiny, for demos and tests only) written to {args.output}; use them with --components {args.output}")
    return 0


def cmd_cache(args) -> int:
    from trainer.cache import build_cache

    config = _config_from_args(args)
    if args.stage is not None:  # one resolution stage's cache
        stages = config.resolved_stages()
        if not 0 <= args.stage < len(stages):
            raise SystemExit(f"trainer cache: --stage {args.stage}, but the config has {len(stages)} stage(s) (0-based)")
        config = TrainConfig.model_validate(config.model_copy(update={"data": config.data.model_copy(update={"resolution": stages[args.stage].resolution})}).model_dump())
    manifest = build_cache(config, args.shards, args.output)  # a path or any fsspec URL (s3://, gs://)
    lost = sum(s.lost for s in manifest.sources)
    damaged = f"; {lost} lost from {sum(1 for s in manifest.sources if s.problem)} damaged shard(s), named above" if lost else ""
    print(f"latent cache {args.output}: {manifest.num_samples} samples in {len(manifest.files)} files ({manifest.skipped} skipped{damaged})")
    if manifest.bucket_counts:
        from trainer.buckets import bucket_histogram

        print(f"samples per bucket (width x height, {len(manifest.bucket_counts)} buckets at {manifest.spec.resolution} px):")
        print(bucket_histogram(manifest.bucket_counts))
    return 0


def sample_size(saved: TrainConfig | None, pipe, width: int | None, height: int | None) -> tuple[int | None, int | None]:
    """(width, height) for `trainer sample`: a bucket of the run's last stage (default its
    square), or any multiple of the token size for a run without a saved config."""
    from trainer.buckets import bucket_name, bucket_set

    if (width is None) != (height is None):
        raise SystemExit("trainer sample: give both --width and --height, or neither")
    step = pipe.vae_scale_factor * pipe.transformer.config.patch_size
    if saved is None:
        if width is not None and (width % step or height % step):
            raise SystemExit(f"trainer sample: --width and --height must be multiples of {step} (VAE factor x patch size)")
        return width, height
    stage = saved.resolved_stages()[-1]
    if width is None:
        return stage.resolution, stage.resolution
    buckets = bucket_set(stage.resolution, saved.data.bucket_step or step, saved.data.max_aspect) if saved.data.buckets else [(stage.resolution, stage.resolution)]
    if (width, height) not in buckets:
        raise SystemExit(
            f"trainer sample: {width}x{height} is not a bucket the run was trained on ({stage.resolution} px stage): "
            + ", ".join(bucket_name(b) for b in buckets)
        )
    return width, height


def cmd_fit(args) -> int:
    from trainer.train import fit

    config = _config_from_args(args)
    export = fit(config, Path(args.output), resume=args.resume)
    print(f"trained model exported to {export}; preview grids in {Path(args.output) / 'samples'}")
    return 0


def cmd_sample(args) -> int:
    import torch

    from trainer.export import export_dir, load_exported_pipeline, sample_grid
    from trainer.lora import apply_sample_lora

    run = Path(args.run)
    saved = TrainConfig.model_validate_json((run / "config.json").read_text()) if (run / "config.json").is_file() else None
    validation = saved.validation if saved else None
    prompts = args.prompt or (validation.prompts if validation else [])
    if not prompts:
        raise SystemExit("trainer sample: give at least one --prompt (the run has no preview prompts to fall back on)")
    steps = args.steps or (validation.steps if validation else 30)
    guidance = args.guidance if args.guidance is not None else (validation.guidance if validation else 4.0)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_exported_pipeline(export_dir(run), device=device)
    apply_sample_lora(pipe, args)  # --lora adapters from `trainer lora`, before sampling
    width, height = sample_size(saved, pipe, args.width, args.height)
    image = sample_grid(pipe, prompts, images_per_prompt=args.num_per_prompt, steps=steps, guidance=guidance, seed=args.seed, height=height, width=width)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    print(f"{len(prompts)} prompt(s) x {args.num_per_prompt} image(s), {steps} steps, guidance {guidance}, seed {args.seed}: {out}")
    return 0


def cmd_bench(args) -> int:
    from trainer.bench import run_bench

    config = _config_from_args(args)
    buckets = [None]
    if args.all_buckets or args.bucket:
        from trainer.buckets import bucket_set, parse_bucket

        if args.all_buckets:
            buckets = bucket_set(config.data.resolution, config.data.bucket_step or args.vae_factor * config.model.patch_size, config.data.max_aspect)
        else:
            buckets = [parse_bucket(b) for b in args.bucket]
    results = [run_bench(
        config,
        steps=args.steps,
        warmup=args.warmup,
        cache=args.cache,
        latent_channels=args.latent_channels,
        vae_factor=args.vae_factor,
        text_dim=args.text_dim,
        pooled_dim=args.pooled_dim,
        text_len=args.text_len,
        peak=args.peak_tflops,
        profile_attention=not args.no_profile,
        bucket=bucket,
        batch_size=args.batch_size,
    ) for bucket in buckets]
    for result in results:
        print(result.report())
        print()
    if len(results) > 1:
        from trainer.bench import BUCKET_TABLE_HEADER

        print(f"per bucket ({results[0].device}, preset {config.model.preset}):")
        print(BUCKET_TABLE_HEADER)
        for result in results:
            print(result.row())
    if args.json:
        import json

        Path(args.json).write_text(json.dumps([r.as_dict() for r in results], indent=2) + "\n")
    return 0


def cmd_export(args) -> int:
    import torch
    from safetensors.torch import load_model

    from trainer.checkpoint import latest_checkpoint
    from trainer.components import load_components
    from trainer.export import EXPORT, export_pipeline, make_pipeline
    from trainer.train import build_denoiser

    run = Path(args.run)
    config = TrainConfig.model_validate_json((run / "config.json").read_text())
    checkpoint = Path(args.checkpoint) if args.checkpoint else latest_checkpoint(run)
    if checkpoint is None:
        raise SystemExit(f"trainer export: {run} has no checkpoint")
    components = load_components(config.components, "cpu", torch.float32)
    first = config.resolved_stages()[0].resolution  # the size the model was built for
    model = build_denoiser(config, components.latent_channels, first // components.vae_scale_factor, components.text_dim, components.pooled_dim, components.vae_scale_factor)
    load_model(model, str(checkpoint / "ema.safetensors"), strict=True)
    out = export_pipeline(make_pipeline(model.eval(), components), Path(args.output) if args.output else run / EXPORT)
    print(f"exported the EMA weights of {checkpoint} to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainer", description="Train a compact text-to-image latent diffusion model on curated shards.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init-components", help="write a tiny offline VAE, text encoder and tokenizer (demo and test aid)")
    p.add_argument("--output", required=True)
    p.add_argument("--resolution", type=int, default=64, help="image size the VAE is used at (it trains on <= 32 px images)")
    p.add_argument("--max-text-length", type=int, default=16)
    p.add_argument("--vae-steps", type=int, default=800, help="VAE training steps on synthetic shapes, ~30 s on one core (0: random VAE)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_init_components)

    p = sub.add_parser("cache", help="encode shards into a latent cache")
    p.add_argument("--shards", required=True, help="brace spec, e.g. 'out/shards/{000000..000009}.tar'")
    p.add_argument("--output", required=True)
    p.add_argument("--stage", type=int, help="cache for this resolution stage of the config (0-based; sets data.resolution)")
    _add_config_args(p)
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("fit", help="train (from a latent cache or raw shards)")
    p.add_argument("--output", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    p.add_argument("--cache", help="latent cache directory (sets data.cache)")
    p.add_argument("--shards", help="curated shards (sets data.shards)")
    _add_config_args(p)
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("sample", help="draw a grid from a run's exported model")
    p.add_argument("--run", required=True, help="run directory (or its export/ folder)")
    p.add_argument("--prompt", action="append", help="repeat for several rows; default: the run's preview prompts")
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-per-prompt", type=int, default=4)
    p.add_argument("--width", type=int, help="pixels; a bucket of the run's last stage (default: its square)")
    p.add_argument("--height", type=int, help="pixels; with --width")
    p.add_argument("--device")
    p.add_argument("--out", required=True, help="PNG file")
    add_sample_lora_arguments(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("lora", help="fine-tune a trained base model with LoRA on 15-200 images of one subject or style")
    add_lora_arguments(p)

    p = sub.add_parser("ui", help="a local web page to train a LoRA (runs `trainer lora`; binds 127.0.0.1)")
    from trainer.ui import add_ui_arguments

    add_ui_arguments(p)

    p = sub.add_parser("bench", help="training throughput: images/s, TFLOP/s, MFU, data-loader stall")
    _add_config_args(p, components=False)
    p.add_argument("--steps", type=int, default=200, help="timed steps")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--cache", help="read a real latent cache instead of synthetic latents")
    p.add_argument("--peak-tflops", type=float, help="device peak for MFU when it is not in the table (e.g. on CPU)")
    p.add_argument("--latent-channels", type=int, default=4)
    p.add_argument("--vae-factor", type=int, default=8, help="pixels per latent side")
    p.add_argument("--text-dim", type=int, default=768)
    p.add_argument("--pooled-dim", type=int, default=768)
    p.add_argument("--text-len", type=int, help="default: components.max_text_length")
    p.add_argument("--no-profile", action="store_true", help="skip listing the attention kernels")
    p.add_argument("--bucket", action="append", metavar="WxH", help="bench batches of this bucket (pixels); repeat for several")
    p.add_argument("--all-buckets", action="store_true", help="bench every bucket of data.resolution (data.max_aspect)")
    p.add_argument("--batch-size", type=int, help="images per batch; default: data.batch_size, token-scaled per bucket")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("export", help="export a checkpoint's EMA weights as a diffusers pipeline")
    p.add_argument("--run", required=True)
    p.add_argument("--checkpoint", help="default: the latest")
    p.add_argument("--output", help="default: RUN/export")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

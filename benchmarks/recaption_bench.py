"""Recaptioning throughput: images per second at several batch sizes, against
captioning one image at a time with transformers directly, in the same run.

    python -m benchmarks.recaption_bench [--model DIR_OR_HUB_ID] [--device auto|cpu|cuda]
        [--batch-sizes 1,4,8,16] [--images 64] [--max-new-tokens 32] [--precision auto]

Without `--model` it builds the tiny random LLaVA of the tests (CLIP-vision +
Llama, 32 px images); pass a real checkpoint (e.g. llava-hf/llava-1.5-7b-hf
with `--device cuda`) for real figures. Three measurements, same images:

- baseline: per image, `processor(...)` then `model.generate(...)` (greedy),
  the loop one writes without batching;
- model: `Captioner.generate` on pre-processed batches (the GPU/CPU part only);
- pipeline: the whole `Recaption` transform on Beam's FnApiRunner (read staged
  bytes, decode, preprocess, batched generate, quality gate), batches fixed at
  each size. Reported as steady-state images/s, (N - B) / (T(N) - T(B)) from a
  run over all N images and one over a single batch of B, so that pipeline
  start-up and model loading (reported as `startup_s`, about T(B)) cancel out.

Every timing is the best of `--repeats` runs (the machine may be shared; on a
busy CPU pass `--threads 1`, as torch's thread pool otherwise spins against the
other processes and the figures swing tenfold).
Figures: images/s and the ratio against the baseline. Generation stops at
end-of-sequence, so a batch runs as long as its longest caption; the tiny
random model rarely stops early, a real one does.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import tempfile
import time
from pathlib import Path

from PIL import Image

from pipelines.testing.images import colour_field_jpegs, staged_records


def bench_baseline(config, images: list[bytes], repeats: int) -> float:
    """Seconds to caption every image one at a time with transformers directly."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from stages.models.device import resolve_device, resolve_dtype
    from stages.models.captioner import format_prompt

    device = resolve_device(config.device)
    dtype = resolve_dtype(device, config.precision) or torch.float32
    model = AutoModelForImageTextToText.from_pretrained(config.model, dtype=dtype, device_map=str(device)).eval()
    processor = AutoProcessor.from_pretrained(config.model)
    prompt = format_prompt(processor, config)
    pad = processor.tokenizer.pad_token_id

    def caption_one(data: bytes, max_new_tokens: int) -> str:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        inputs = processor(images=image, text=prompt, return_tensors="pt").to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        # .tolist() copies to the host: the per-image device sync.
        return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :].tolist(), skip_special_tokens=True)

    def caption_all() -> float:
        started = time.perf_counter()
        for data in images:
            caption_one(data, config.max_new_tokens)
        return time.perf_counter() - started

    caption_one(images[0], 2)  # warm-up (CUDA kernels, allocator)
    return min(caption_all() for _ in range(repeats))


def bench_model(config, images: list[bytes], batch_size: int, repeats: int) -> tuple[float, float]:
    """(preprocess seconds, generate seconds) for every image in batches."""
    from stages.core.decode import decode_rgb
    from stages.models.captioner import Captioner, format_prompt, load_processor

    captioner = Captioner.load(config)
    processor = load_processor(config.model)
    prompt = format_prompt(processor, config)
    started = time.perf_counter()
    examples = [dict(processor(images=decode_rgb(data), text=prompt, return_tensors="np")) for data in images]
    preprocess_s = time.perf_counter() - started
    captioner.generate(examples[:batch_size])  # warm-up (CUDA kernels, allocator)

    def caption_all() -> float:
        started = time.perf_counter()
        for start in range(0, len(examples), batch_size):
            captioner.generate(examples[start : start + batch_size])  # ends with a device -> host copy
        return time.perf_counter() - started

    return preprocess_s, min(caption_all() for _ in range(repeats))


def bench_pipeline(config, records) -> float:
    """Seconds for the whole Recaption transform on FnApiRunner, start-up included."""
    import apache_beam as beam
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    from stages.recaption import Recaption

    started = time.perf_counter()
    with beam.Pipeline(runner=FnApiRunner()) as p:
        _ = p | beam.Create(records) | Recaption(config)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="Checkpoint dir or hub id; default: the tiny random LLaVA of the tests.")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--batch-sizes", default="1,4,8,16")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--image-side", type=int, default=384, help="Side of the generated JPEGs, px.")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="Each timing is the best of this many runs.")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (torch.set_num_threads); default: torch's choice."
    )
    parser.add_argument("--skip-pipeline", action="store_true", help="Only the baseline and model-only figures.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from schemas.scoring import BatchingConfig, RecaptionConfig

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="recaption-bench-") as tmp:
        model = args.model
        if model is None:
            from pipelines.testing.models import save_tiny_llava

            model = str(save_tiny_llava(Path(tmp) / "tiny-llava"))
        base = RecaptionConfig(
            model=model, device=args.device, precision=args.precision, max_new_tokens=args.max_new_tokens,
            min_ram=None, cpu_threads=args.threads,
        )
        images = colour_field_jpegs(args.images, args.image_side)
        records = staged_records(Path(tmp), images, [f"image {i}" for i in range(len(images))])

        baseline_s = bench_baseline(base, images, args.repeats)
        baseline_ips = len(images) / baseline_s
        from stages.models.device import resolve_device

        import torch

        print(f"model={model} device={resolve_device(args.device)} images={len(images)} "
              f"max_new_tokens={args.max_new_tokens} torch_threads={torch.get_num_threads()}")
        print(f"baseline (one image at a time, transformers directly): {baseline_ips:8.2f} images/s")
        header = f"{'batch':>5} {'model img/s':>12} {'x base':>7} {'prep ms/img':>12}"
        if not args.skip_pipeline:
            header += f" {'pipeline img/s':>15} {'x base':>7} {'startup_s':>9}"
        print(header)
        rows = []
        for batch_size in batch_sizes:
            config = base.model_copy(update={"batching": BatchingConfig(min_batch_size=batch_size, max_batch_size=batch_size)})
            preprocess_s, generate_s = bench_model(config, images, batch_size, args.repeats)
            row = {
                "batch_size": batch_size,
                "model_images_per_s": len(images) / generate_s,
                "preprocess_ms_per_image": 1000 * preprocess_s / len(images),
            }
            line = (f"{batch_size:>5} {row['model_images_per_s']:>12.2f} "
                    f"{row['model_images_per_s'] / baseline_ips:>7.2f} {row['preprocess_ms_per_image']:>12.2f}")
            if not args.skip_pipeline and batch_size < len(records):
                one_batch_s = min(bench_pipeline(config, records[:batch_size]) for _ in range(args.repeats))
                all_s = min(bench_pipeline(config, records) for _ in range(args.repeats))
                row["pipeline_images_per_s"] = (len(records) - batch_size) / max(all_s - one_batch_s, 1e-9)
                row["startup_s"] = one_batch_s
                line += (f" {row['pipeline_images_per_s']:>15.2f} {row['pipeline_images_per_s'] / baseline_ips:>7.2f}"
                         f" {one_batch_s:>9.2f}")
            print(line, flush=True)
            rows.append(row)
        print(json.dumps({"baseline_images_per_s": baseline_ips, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

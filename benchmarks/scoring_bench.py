"""Scoring throughput: CLIP (and NudeNet) images per second at several batch
sizes, against scoring one image at a time with the libraries directly, in the
same run.

    python -m benchmarks.scoring_bench [--model ViT-B-32|tiny] [--device auto|cpu|cuda]
        [--precision auto|fp32|bf16|fp16] [--batch-sizes 1,8,32,64] [--images 128]
        [--image-side 512] [--repeats 2] [--skip-pipeline] [--skip-nudenet]

The CLIP weights are random (no model hub here): the architecture, and so the
compute, is the real one (`ViT-B-32` by default, 151M parameters), saved to a
local checkpoint and loaded through `open_clip.create_model_and_transforms`
exactly as a run loads it. `--model tiny` uses the tests' tiny model, for a
smoke run. NudeNet is the real packaged 320n.onnx.

Measurements, same generated JPEGs:

- baseline: per image, decode + open_clip's `preprocess` + `encode_image` +
  `encode_text` in fp32: the loop one writes without batching (same for
  NudeNet: `nudenet.NudeDetector().detect(bytes)` per image);
- prepare: our CPU step per image (read, decode once, CLIP resize/crop to
  uint8, tokenize, NudeNet letterbox): it must keep up with the accelerator;
- model: `ClipScorer.score` / `NudeNetDetector.score` on prepared batches (the
  accelerator part: scaling, normalisation, both encoders, similarity;
  precision from `--precision`, bf16 on CUDA by default);
- pipeline: `ScoreImages` (CLIP + NudeNet) on Beam's FnApiRunner, batches fixed
  at each size, steady state (N - B) / (T(N) - T(B)) so start-up and model
  loading (`startup_s`, about T(B)) cancel out.

Every timing is the best of `--repeats` runs (the machine may be shared).
Figures: images/s and the ratio against the baseline.
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


def clip_config(model: str, folder: Path):
    """A ClipConfig for a random-weight checkpoint of `model` saved under `folder`."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    from schemas.scoring import ClipConfig

    if model == "tiny":
        from pipelines.testing.models import TINY_CLIP_NAME, save_tiny_clip

        config_path, weights = save_tiny_clip(folder)
        return ClipConfig(model=TINY_CLIP_NAME, pretrained=str(weights), model_config_path=str(config_path))
    torch.manual_seed(0)
    weights = folder / f"{model}-random.safetensors"
    save_file(open_clip.create_model(model).state_dict(), weights)
    return ClipConfig(model=model, pretrained=str(weights))


def best(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def bench_clip_baseline(clip, device, images: list[bytes], captions: list[str], repeats: int) -> float:
    """Seconds to score every image one at a time with open_clip directly (fp32)."""
    import open_clip
    import torch

    model, _, preprocess = open_clip.create_model_and_transforms(clip.model, pretrained=clip.pretrained, device=device)
    model.eval()
    tokenizer = open_clip.get_tokenizer(clip.model)

    def score_one(data: bytes, caption: str) -> float:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        with torch.inference_mode():
            image_emb = model.encode_image(preprocess(image).unsqueeze(0).to(device))
            text_emb = model.encode_text(tokenizer([caption]).to(device))
            similarity = torch.nn.functional.cosine_similarity(image_emb, text_emb)
        return similarity.item()  # device -> host: the per-image sync

    score_one(images[0], captions[0])  # warm-up
    return best(repeats, lambda: [score_one(d, c) for d, c in zip(images, captions)])


def bench_nudenet_baseline(images: list[bytes], repeats: int, threads: int | None) -> float:
    import onnxruntime
    from nudenet import NudeDetector

    from stages.models.nudenet import packaged_nudenet_model

    detector = NudeDetector()
    if threads:  # NudeDetector has no threads option: rebuild its session with ours
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        detector.onnx_session = onnxruntime.InferenceSession(
            packaged_nudenet_model(), sess_options=options, providers=["CPUExecutionProvider"]
        )
    detector.detect(images[0])
    return best(repeats, lambda: [detector.detect(data) for data in images])


def prepare_all(clip, preprocess, records):
    """Our CPU step for every record: ScoringExamples ready for both models."""
    from schemas.scoring import NudeNetConfig
    from stages.models.clip import ClipPreparer
    from stages.inference import PrepareImagesDoFn
    from stages.models.nudenet import NudeNetPreparer

    dofn = PrepareImagesDoFn([ClipPreparer(clip, preprocess), NudeNetPreparer(NudeNetConfig())])
    dofn.setup()
    return [example for record in records for example in dofn.process(record)]


def bench_models(handlers, examples, batch_size: int, repeats: int) -> dict[str, float]:
    """Seconds per handler to run every prepared example in batches of batch_size."""
    times = {}
    for name, (handler, model) in handlers.items():
        handler.run_inference(examples[:batch_size], model)  # warm-up (kernels, allocator)

        def run_all(handler=handler, model=model):
            for start in range(0, len(examples), batch_size):
                handler.run_inference(examples[start : start + batch_size], model)  # ends with a host copy

        times[name] = best(repeats, run_all)
    return times


def bench_pipeline(scoring, records) -> float:
    """Seconds for ScoreImages (CLIP + NudeNet) on FnApiRunner, start-up included."""
    import apache_beam as beam
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    from pipelines.scoring import ScoreImages

    started = time.perf_counter()
    with beam.Pipeline(runner=FnApiRunner()) as p:
        _ = p | beam.Create(records) | ScoreImages(scoring)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-32", help="open_clip architecture (random weights), or `tiny`.")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--batch-sizes", default="1,8,32,64")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--image-side", type=int, default=512, help="Width of the generated JPEGs (4:3), px.")
    parser.add_argument("--repeats", type=int, default=2, help="Each timing is the best of this many runs.")
    parser.add_argument("--threads", type=int, help="CPU threads per model (scoring.cpu_threads); default: all cores.")
    parser.add_argument("--skip-pipeline", action="store_true", help="Only baseline, prepare and model figures.")
    parser.add_argument("--skip-nudenet", action="store_true", help="CLIP only.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from schemas.scoring import BatchingConfig, NudeNetConfig, SafetyConfig, ScoringConfig
    from stages.clip_score import ClipModelHandler
    from stages.models.clip import preprocess_config
    from stages.models.device import resolve_device, resolve_dtype
    from stages.safety import NudeNetModelHandler

    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory(prefix="scoring-bench-") as tmp:
        clip = clip_config(args.model, Path(tmp))
        preprocess = preprocess_config(clip)
        images = colour_field_jpegs(args.images, args.image_side, args.image_side * 3 // 4)
        records = staged_records(Path(tmp), images, [f"a photograph of a colourful abstract pattern number {i}" for i in range(len(images))])
        captions = [r.caption_original for r in records]
        scoring = ScoringConfig(device=args.device, precision=args.precision, cpu_threads=args.threads)
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)  # the baselines too

        print(f"model={args.model} (random weights) device={device} "
              f"precision={resolve_dtype(device, args.precision) or 'fp32'} images={len(images)} "
              f"side={args.image_side}px threads={args.threads or 'default'}")
        baseline = {"clip": len(images) / bench_clip_baseline(clip, device, images, captions, args.repeats)}
        print(f"baseline clip    (one image at a time, open_clip fp32): {baseline['clip']:8.2f} images/s")
        if not args.skip_nudenet:
            baseline["nudenet"] = len(images) / bench_nudenet_baseline(images, args.repeats, args.threads)
            print(f"baseline nudenet (NudeDetector.detect per image):      {baseline['nudenet']:8.2f} images/s")
        prepare_s = best(args.repeats, lambda: prepare_all(clip, preprocess, records))
        examples = prepare_all(clip, preprocess, records)
        print(f"prepare (read + decode + resize + tokenize + letterbox, 1 core): "
              f"{len(images) / prepare_s:8.2f} images/s")

        handlers = {"clip": ClipModelHandler(clip, scoring, preprocess)}
        if not args.skip_nudenet:
            handlers["nudenet"] = NudeNetModelHandler(NudeNetConfig(), scoring)
        loaded = {name: (handler, handler.load_model()) for name, handler in handlers.items()}

        header = f"{'batch':>5}" + "".join(f" {name + ' img/s':>14} {'x base':>7}" for name in loaded)
        if not args.skip_pipeline:
            header += f" {'pipeline img/s':>15} {'startup_s':>9}"
        print(header)
        rows = []
        for batch_size in batch_sizes:
            times = bench_models(loaded, examples, batch_size, args.repeats)
            row = {"batch_size": batch_size}
            line = f"{batch_size:>5}"
            for name, seconds in times.items():
                row[f"{name}_images_per_s"] = len(examples) / seconds
                line += f" {row[f'{name}_images_per_s']:>14.2f} {row[f'{name}_images_per_s'] / baseline[name]:>7.2f}"
            if not args.skip_pipeline and batch_size < len(records):
                fixed = BatchingConfig(min_batch_size=batch_size, max_batch_size=batch_size)
                config = scoring.model_copy(
                    update={
                        "clip": clip.model_copy(update={"batching": fixed}),
                        "safety": None if args.skip_nudenet else SafetyConfig(nudenet=NudeNetConfig(batching=fixed)),
                    }
                )
                one_batch_s = best(args.repeats, lambda: bench_pipeline(config, records[:batch_size]))
                all_s = best(args.repeats, lambda: bench_pipeline(config, records))
                row["pipeline_images_per_s"] = (len(records) - batch_size) / max(all_s - one_batch_s, 1e-9)
                row["startup_s"] = one_batch_s
                line += f" {row['pipeline_images_per_s']:>15.2f} {one_batch_s:>9.2f}"
            print(line, flush=True)
            rows.append(row)
        print(json.dumps({
            "model": args.model, "device": str(device), "baseline_images_per_s": baseline,
            "prepare_images_per_s": len(images) / prepare_s, "rows": rows,
        }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

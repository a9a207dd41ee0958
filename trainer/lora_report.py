"""What `trainer lora` tells the user: the data summary printed before training, and the
run folder's README.md with the trigger word, the data summary and the training curve
(`curve.png`, drawn with PIL, and the evaluations as a table)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from PIL import Image, ImageDraw

from schemas.lora import LoraDataReport, LoraRunSummary, LoraTrainConfig

CURVE = "curve.png"


def format_data_report(report: LoraDataReport) -> str:
    """A plain-text summary of the image folder: counts, sizes, captions, buckets, what was
    set aside and why, warnings."""
    lines = [f"images in {report.directory}: {report.files_found} files"]
    train, holdout = report.train, report.holdout
    lines.append(f"  used: {len(report.images)} ({len(train)} for training, {len(holdout)} held out for the overfitting check)")
    if report.images:
        widths = [i.width for i in report.images]
        heights = [i.height for i in report.images]
        lines.append(f"  sizes: {min(widths)}-{max(widths)} x {min(heights)}-{max(heights)} px")
    sources = Counter(i.caption_source.value for i in report.images)
    lines.append("  captions: " + ", ".join(f"{n} from {source}" for source, n in sorted(sources.items())))
    for image in report.images[:5]:
        lines.append(f"    {image.file}: {image.caption!r} ({image.caption_source.value}{', held out' if image.role == 'holdout' else ''})")
    if len(report.images) > 5:
        lines.append(f"    ... ({len(report.images) - 5} more in data_report.json)")
    lines.append(f"  buckets at {report.resolution}^2 px, batch {report.batch_size}:")
    for bucket in report.buckets:
        pad = f", {bucket.padding_per_epoch} repeat(s) fill its last batch" if bucket.padding_per_epoch else ""
        lines.append(f"    {bucket.width}x{bucket.height}: {bucket.train_images} training, {bucket.holdout_images} held out{pad}")
    if report.set_aside:
        lines.append(f"  set aside: {len(report.set_aside)}")
        for row in report.set_aside:
            also = f" (kept instead: {row.duplicate_of})" if row.duplicate_of else ""
            lines.append(f"    {row.file}: {row.reason}{': ' + row.detail if row.detail else ''}{also}")
    else:
        lines.append("  set aside: none")
    for name in report.ignored:
        lines.append(f"  not read: {name}")
    for warning in report.warnings:
        lines.append(f"  WARNING: {warning}")
    return "\n".join(lines)


def draw_curve(records: list[dict], size: tuple[int, int] = (640, 320)) -> Image.Image:
    """Training loss (grey), train probe (blue) and held-out loss (red) against steps."""
    width, height = size
    margin = 40
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    series = {
        "train loss": ([(r["step"], r["loss"]) for r in records if r.get("kind") == "train"], (150, 150, 150)),
        "train probe": ([(r["step"], r["train_probe_loss"]) for r in records if r.get("kind") == "eval"], (40, 70, 220)),
        "held-out": ([(r["step"], r["heldout_loss"]) for r in records if r.get("kind") == "eval"], (220, 40, 40)),
    }
    points = [pt for values, _ in series.values() for pt in values]
    draw.rectangle((margin, margin // 2, width - margin // 2, height - margin), outline=(0, 0, 0))
    if not points:
        draw.text((margin + 10, height // 2), "no metrics", fill=(0, 0, 0))
        return image
    max_step = max(1, max(s for s, _ in points))
    low, high = min(v for _, v in points), max(v for _, v in points)
    span = (high - low) or 1.0

    def xy(step: float, value: float) -> tuple[float, float]:
        x = margin + (width - 1.5 * margin) * step / max_step
        y = (height - margin) - (height - 1.5 * margin) * (value - low) / span
        return x, y

    for row, (name, (values, colour)) in enumerate(series.items()):
        if len(values) > 1:
            draw.line([xy(s, v) for s, v in values], fill=colour, width=2)
        for s, v in values if len(values) == 1 else []:
            x, y = xy(s, v)
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
        draw.text((width - margin - 70, margin // 2 + 4 + 12 * row), name, fill=colour)  # losses fall: the top right is clear
    draw.text((4, margin // 2), f"{high:.3f}", fill=(0, 0, 0))
    draw.text((4, height - margin - 10), f"{low:.3f}", fill=(0, 0, 0))
    draw.text((width - margin - 30, height - margin + 6), f"step {max_step}", fill=(0, 0, 0))
    return image


def write_readme(run_dir: Path, config: LoraTrainConfig, report: LoraDataReport, summary: LoraRunSummary, records: list[dict]) -> Path:
    """`RUN_DIR/README.md` and `RUN_DIR/curve.png`."""
    run_dir = Path(run_dir)
    draw_curve(records).save(run_dir / CURVE)
    trigger = summary.trigger
    evals = [r for r in records if r.get("kind") == "eval"]
    lines = [
        f"# LoRA adapter{f' for `{trigger}`' if trigger else ''}",
        "",
        f"- Trigger word: **{trigger}**" if trigger else "- Trigger word: none (captions only)",
        f"- Base model: `{summary.base}` (denoiser fingerprint `{summary.base_transformer_fingerprint[:16]}`)",
        f"- Adapter: rank {summary.rank}, alpha {summary.alpha:g} on {', '.join(summary.targets)}; "
        f"{summary.steps_done} of {summary.steps_planned} steps, exported at step {summary.exported_step}",
        f"- Files: `{summary.adapter_file}` (diffusers LoRA format)"
        + (f", `{summary.comfyui_file}` (kohya/ComfyUI key names)" if summary.comfyui_file else "")
        + (f", `{summary.best_adapter_file}` (best held-out step {summary.best_heldout_step})" if summary.best_adapter_file else ""),
        "",
    ]
    if summary.overfit_step is not None:
        lines += [
            f"**Overfitting was flagged at step {summary.overfit_step}**: the held-out loss rose above its best "
            f"({summary.best_heldout_loss:.4f} at step {summary.best_heldout_step}) while the training loss kept falling."
            + (" Training stopped and the adapter of the best step was exported." if summary.stopped_early or summary.exported_step != summary.steps_done else " Consider the adapter in `best/`, fewer steps or a lower learning rate."),
            "",
        ]
    lines += [
        "## Use it",
        "",
        "```",
        f"trainer sample --run {summary.base} --lora {run_dir} --lora-scale 0.8 --prompt \"{trigger or 'a prompt'}\" --out out.png",
        "```",
        "",
        "```python",
        "from diffusers import DiffusionPipeline",
        f"pipe = DiffusionPipeline.from_pretrained(\"{summary.base}\", trust_remote_code=True)",
        f"pipe.load_lora_weights(\"{run_dir}\", adapter_name=\"lora\")",
        "pipe.set_adapters([\"lora\"], adapter_weights=[0.8])",
        "# or, with imagemill installed (also for pipelines exported before LoRA loading was added):",
        "# from trainer.lora import load_lora; load_lora(pipe, RUN_DIR, 0.8)",
        "```",
        "",
        "## Data",
        "",
        "```",
        format_data_report(report),
        "```",
        "",
        "## Training curve",
        "",
        f"![training curve]({CURVE})",
        "",
        "Held-out and train-probe losses use fixed timesteps and noise, so they move only when the weights do.",
        "",
    ]
    if evals:
        buckets = [k for k in evals[0] if k.startswith("heldout_t")]
        header = ["step", "held-out", "train probe"] + [k[len("heldout_") :] for k in buckets]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for r in evals:
            cells = [str(r["step"]), f"{r['heldout_loss']:.4f}", f"{r['train_probe_loss']:.4f}"] + [f"{r[k]:.4f}" for k in buckets]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Previews (rendered from the adapter as saved): `samples/`; final grid: `samples/final.png`.", ""]
    path = run_dir / "README.md"
    path.write_text("\n".join(lines))
    return path

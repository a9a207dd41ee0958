"""`trainer fit`: one training loop, top to bottom.

accelerate provides the device, bf16 autocast, DDP and gradient accumulation; the data
loader is ours (`trainer/data.py`) because it splits files across ranks and workers
itself and must resume at an exact position. Per optimizer step the host never waits
for the device: the loss, loss-by-timestep sums and the gradient norm stay on the device
and are read back only every `logging.every_steps` (the marked sync points below).

Resolution stages (`stages` in the config; one implicit stage without it): the loop
trains each stage's steps from that stage's cache, then opens the next stage's cache and
carries on with the same weights, optimizer, EMA and generators; each stage warms the
learning rate up to its own peak and decays it anew. The checkpoint records the stage and
the micro-batches consumed in it, so a resume lands in the right stage at the right batch,
including a checkpoint taken exactly at a stage boundary. The model's position table is
interpolated to each new token grid (`trainer.model.position_scale`).

Outputs in RUN_DIR: `config.json` (the resolved config), `metrics.jsonl` (one line per
log), `checkpoints/` (see `trainer/checkpoint.py`), `samples/step-NNNNNNNN.png` (preview
grids from the EMA weights, drawn by the export's pipeline class), `logs/` (tensorboard),
and `export/` (the final EMA model as a diffusers pipeline).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from tqdm import tqdm

from schemas.trainer import DataPosition, StageConfig, TrainConfig
from trainer.buckets import bucket_batch_sizes
from trainer.cache import Store, cache_spec, check_cache, read_manifest
from trainer.checkpoint import latest_checkpoint, load_checkpoint, new_state, read_state, save_checkpoint
from trainer.components import Components, cpu_threads_beside_workers, load_components
from trainer.data import CachedLatents, RawShards, check_cache_files, expand_shards, make_loader
from trainer.export import EXPORT, export_pipeline, make_pipeline, sample_grid
from trainer.flow import FlowLoss, RectifiedFlow, timestep_bucket
from trainer.model import DiffusionTransformer, build_transformer
from trainer.resume import append_metrics, check_resume_config, truncate_metrics

logger = logging.getLogger(__name__)

# Fault injection for the kill-and-resume test: SIGKILL this process right after the step
# with this number (and its checkpoint, if one is due) is done.
KILL_AT_STEP_ENV = "IMAGEMILL_FAULT_KILL_AT_STEP"
METRICS = "metrics.jsonl"


class WarmupCosine:
    """LR multiplier: linear warmup over `warmup_steps`, then cosine decay to `min_ratio` at
    `max_steps`. A plain object (not a closure) so the scheduler's state_dict stays JSON."""

    def __init__(self, warmup_steps: int, max_steps: int, min_ratio: float):
        self.warmup_steps = warmup_steps
        self.max_steps = max_steps
        self.min_ratio = min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class StagedSchedule:
    """LR multiplier over resolution stages: stage i (starting at step `starts[i]`, `steps[i]`
    long) runs `WarmupCosine(min(warmup_steps, steps[i]), steps[i], min_ratio)` scaled by
    `ratios[i]` (its lr / optim.lr). With one stage this is `WarmupCosine` itself. Plain lists,
    so the LR scheduler's state_dict stays JSON."""

    def __init__(self, starts: list[int], steps: list[int], ratios: list[float], warmup_steps: int, min_ratio: float):
        self.starts = starts
        self.steps = steps
        self.ratios = ratios
        self.warmup_steps = warmup_steps
        self.min_ratio = min_ratio

    def __call__(self, step: int) -> float:
        i = max(0, sum(1 for start in self.starts if start <= step) - 1)
        schedule = WarmupCosine(min(self.warmup_steps, self.steps[i]), self.steps[i], self.min_ratio)
        return self.ratios[i] * schedule(step - self.starts[i])


def stage_starts(stages: list[StageConfig]) -> list[int]:
    starts, total = [], 0
    for stage in stages:
        starts.append(total)
        total += stage.steps
    return starts


def stage_at(stages: list[StageConfig], step: int) -> int:
    """The stage that optimizer step `step + 1` belongs to (the last one past the end)."""
    starts = stage_starts(stages)
    return max(i for i, start in enumerate(starts) if start <= step)


class EMA:
    """Exponential moving average of the weights, kept as a second model (the one previews
    and the export use)."""

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool):
        self.model = copy.deepcopy(model).requires_grad_(False).eval()
        self.decay = decay
        self.warmup = warmup
        self._pairs: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        """One fused lerp over all parameters (a few kernels, no host sync)."""
        if self._pairs is None:  # the training parameters are the same tensors every step
            self._pairs = (list(self.model.parameters()), [p.detach() for p in model.parameters()])
        ema_params, params = self._pairs
        torch._foreach_lerp_(ema_params, params, 1.0 - self.decay_at(step))


def build_denoiser(config: TrainConfig, latent_channels: int, latent_size: int, text_dim: int, pooled_dim: int, pixels_per_latent: int = 8) -> DiffusionTransformer:
    m = config.model
    model = build_transformer(
        m.preset,
        sample_size=latent_size,
        in_channels=latent_channels,
        text_dim=text_dim,
        pooled_dim=pooled_dim,
        patch_size=m.patch_size,
        hidden_size=m.hidden_size,
        depth=m.depth,
        num_heads=m.num_heads,
        mlp_ratio=m.mlp_ratio,
        qk_norm=m.qk_norm,
        micro_conditioning=config.uses_micro_conditioning(),
        pixels_per_latent=pixels_per_latent,
    )
    model.use_attention(m.attention)
    if m.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model


def build_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not biases, norms); fused kernel on CUDA."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    o = config.optim
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=o.lr,
        betas=o.betas,
        eps=o.eps,
        fused=device.type == "cuda" or None,
    )


def training_loss(model, flow: RectifiedFlow, latents, text, pooled, null_text, null_pooled, generator, caption_dropout: float, micro=None) -> FlowLoss:
    """Replace a `caption_dropout` share of the captions by the empty caption (for
    classifier-free guidance), then the rectified-flow loss. All draws come from `generator`.
    `micro` (B, 6): the size and crop conditions, for a size-conditioned model."""
    keep = torch.rand(latents.shape[0], generator=generator, device=latents.device) >= caption_dropout  # (B,)
    text = torch.where(keep[:, None, None], text, null_text)  # (B, L, D)
    pooled = torch.where(keep[:, None], pooled, null_pooled)  # (B, P)
    return flow.loss(model, latents, text, pooled, generator, micro=micro)


@dataclass
class DataSource:
    """The dataset and how its batches become model inputs on the device."""

    dataset: torch.utils.data.IterableDataset
    num_files: int
    null_text: torch.Tensor  # (1, L, D)
    null_pooled: torch.Tensor  # (1, P)
    latent_size: int
    preview_captions: list[str]
    components: Components
    from_cache: bool
    micro: bool = False  # the model takes size and crop conditions

    def model_inputs(self, batch: dict, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(latents, text, pooled, micro or None) on the device."""
        if self.from_cache:
            micro = batch["micro"].to(device, non_blocking=True).float() if self.micro else None
            return (
                batch["latents"].to(device, non_blocking=True).float(),
                batch["text"].to(device, non_blocking=True).float(),
                batch["pooled"].to(device, non_blocking=True).float(),
                micro,
            )
        # Raw shards: the frozen encoders run here, on the device, without gradients.
        latents = self.components.encode_images(batch["pixels"].to(device, non_blocking=True))
        text, pooled = self.components.encode_tokens(batch["input_ids"], batch["attention_mask"])
        return latents, text, pooled, None


def open_source(config: TrainConfig, components: Components, rank: int, world_size: int, start_batches: int, device: torch.device, stage: StageConfig | None = None) -> DataSource:
    """The data of one resolution stage (default: the first)."""
    d = config.data
    stage = stage or config.resolved_stages()[0]
    common = dict(batch_size=stage.batch_size, seed=config.seed, rank=rank, world_size=world_size, num_workers=d.num_workers, span=d.shuffle_span, start_batches=start_batches)
    micro = config.uses_micro_conditioning()
    if stage.cache:
        manifest = read_manifest(stage.cache)
        check_cache(manifest, cache_spec(config, components, stage.resolution), config, stage.cache)
        if micro and manifest.files and "original_size" not in _tensor_names(stage.cache, manifest):
            raise ValueError(f"latent cache {stage.cache} has no size/crop conditions (made by an older `trainer cache`); rebuild it, or set model.micro_conditioning=false")
        null = load_safetensors(Store(stage.cache).read(manifest.null_text_file))  # any fsspec URL
        unreadable = check_cache_files(stage.cache, manifest)  # named in the log; raises if none is left
        sizes = None
        if manifest.spec.buckets and d.bucket_batch_sizes:
            step = components.vae_scale_factor * config.model.patch_size
            sizes = bucket_batch_sizes([tuple(b) for b in manifest.spec.buckets], stage.batch_size, stage.resolution, step)
        dataset = CachedLatents(stage.cache, manifest, synthetic_prob=d.synthetic_caption_prob, unreadable=unreadable, batch_sizes=sizes, micro=micro, **common)
        return DataSource(
            dataset=dataset,
            num_files=len(manifest.files),
            null_text=null["text"].to(device).float(),
            null_pooled=null["pooled"].to(device).float(),
            latent_size=stage.resolution // components.vae_scale_factor,
            preview_captions=manifest.preview_captions,
            components=components,
            from_cache=True,
            micro=micro,
        )
    if d.buckets or micro:
        raise ValueError("aspect buckets and size conditioning train from a latent cache: run `trainer cache` and set data.cache")
    if len(config.resolved_stages()) > 1:
        raise ValueError("resolution stages train from latent caches: give each stage its `cache`")
    if not d.shards:
        raise ValueError("set data.cache (a latent cache from `trainer cache`) or data.shards (curated shards) to train on")
    paths = expand_shards(d.shards)
    dataset = RawShards(paths, resolution=stage.resolution, tokenizer=components.tokenizer, max_text_length=components.max_text_length, synthetic_prob=d.synthetic_caption_prob, **common)
    null_text, null_pooled = components.encode_text([""])
    previews = []
    for row in range(min(4, dataset.size_of(0))):
        _, original, synthetic = dataset.read_sample(0, row)
        previews.append(synthetic or original)
    return DataSource(dataset, len(paths), null_text, null_pooled, stage.resolution // components.vae_scale_factor, previews, components, False)


def _tensor_names(cache: str, manifest) -> set[str]:
    """Tensor names of the cache's first file (from its safetensors header alone)."""
    from stages.core.tario import open_url
    from trainer.data import SafetensorsRows, join_url

    path = join_url(str(cache), manifest.files[0].file)
    with open_url(path) as handle:
        return set(SafetensorsRows(path, handle).tensors)


def fit(config: TrainConfig, run_dir: str | Path, resume: bool = False) -> Path:
    """Train per `config` into `run_dir`; with `resume`, continue from its latest checkpoint
    (exactly: same losses and weights as an uninterrupted run). Returns the export folder."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    run_dir = Path(run_dir)
    tracker = None if config.logging.tracker == "none" else config.logging.tracker
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.optim.grad_accum,
        log_with=tracker,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
    )
    device = accelerator.device
    rank, world_size = accelerator.process_index, accelerator.num_processes
    cpu_threads_beside_workers(device, config.data.num_workers)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    # ---- where we start: fresh, or from the latest checkpoint --------------------------------
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if resume and checkpoint is None:
        logger.info("--resume: no checkpoint in %s yet; starting from step 0", run_dir)
    if not resume and latest_checkpoint(run_dir) is not None:
        raise FileExistsError(f"{run_dir} already has checkpoints: pass --resume to continue it, or choose a new --output")
    resumed = read_state(checkpoint) if checkpoint else None
    if resumed:
        check_resume_config(resumed.config, config.model_dump(mode="json"), checkpoint)
    set_seed(config.seed, device_specific=True)  # overwritten from the checkpoint when resuming

    # ---- frozen components, data, model, optimizer ----------------------------------------
    components = load_components(config.components, device, torch.float32)
    stages = config.resolved_stages()
    starts = stage_starts(stages)
    stage_index = stage_at(stages, resumed.step) if resumed else 0
    # A checkpoint taken at the last step of a stage resumes at the first batch of the next.
    start_batches = resumed.data.micro_batches if resumed and resumed.data.stage == stage_index else 0
    source = open_source(config, components, rank, world_size, start_batches, device, stages[stage_index])

    def data_position(micro_batches: int) -> DataPosition:
        return DataPosition(micro_batches=micro_batches, world_size=world_size, num_workers=config.data.num_workers, batch_size=stages[stage_index].batch_size, files=source.num_files, stage=stage_index)

    if resumed:
        ignore = {"micro_batches"} if resumed.data.stage == stage_index else {"micro_batches", "batch_size", "files", "stage"}
        layout, now = resumed.data.model_dump(exclude=ignore), data_position(start_batches).model_dump(exclude=ignore)
        if layout != now:
            raise ValueError(
                f"{checkpoint} was written with data layout {layout}; this run has {now}. "
                "An exact resume needs the same number of processes, data.num_workers, data.batch_size and data files."
            )

    # The model is built for the first stage's latent size; later stages interpolate positions.
    first_latent = stages[0].resolution // components.vae_scale_factor
    model = build_denoiser(config, components.latent_channels, first_latent, components.text_dim, components.pooled_dim, components.vae_scale_factor).to(device)
    ema = EMA(model, config.optim.ema_decay, config.optim.ema_warmup)
    optimizer = build_optimizer(model, config, device)
    if len(stages) == 1 and stages[0].lr == config.optim.lr:
        schedule = WarmupCosine(config.optim.warmup_steps, config.max_steps, config.optim.min_lr_ratio)
    else:
        schedule = StagedSchedule(starts, [s.steps for s in stages], [s.lr / config.optim.lr for s in stages], config.optim.warmup_steps, config.optim.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    # Noise, timesteps and caption dropout: one generator per rank on the device, saved in checkpoints.
    generator = torch.Generator(device).manual_seed(config.seed * 1_000_003 + rank)
    flow = RectifiedFlow(config.objective.logit_normal_mean, config.objective.logit_normal_std)
    step = 0
    samples_before = 0  # images seen, all ranks, before this process started
    if checkpoint:
        resumed = load_checkpoint(checkpoint, accelerator=accelerator, model=model, ema_model=ema.model, optimizer=optimizer, generator=generator)
        scheduler.load_state_dict(resumed.scheduler)
        step, samples_before = resumed.step, resumed.samples_seen
        logger.info("resumed from %s (step %d, stage %d, %d micro-batches consumed in it)", checkpoint, step, stage_index, start_batches)
    if config.model.compile:
        model.compile()
    model, optimizer = accelerator.prepare(model, optimizer)
    parameters = sum(p.numel() for p in model.parameters())

    def open_loader():
        return make_loader(source.dataset, config.data.num_workers, config.data.prefetch_factor, pin_memory=device.type == "cuda")

    prompts = config.validation.prompts or source.preview_captions
    metrics_path = run_dir / METRICS
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        # The resolved config: with the preview prompts actually used (`trainer sample`'s default).
        resolved = config.model_copy(update={"validation": config.validation.model_copy(update={"prompts": prompts})})
        (run_dir / "config.json").write_text(resolved.model_dump_json(indent=2))
        (run_dir / "samples").mkdir(exist_ok=True)
        truncate_metrics(metrics_path, step)
    if tracker:
        accelerator.init_trackers("imagemill", config={"preset": config.model.preset, "lr": config.optim.lr, "batch_size": config.data.batch_size, "world_size": world_size, "params": parameters})
    logger.info("training %s (%.1fM parameters) on %s x%d from step %d to %d", config.model.preset, parameters / 1e6, device, world_size, step, config.max_steps)

    def preview(at_step: int) -> None:
        side = stages[stage_index].resolution  # the square bucket of the current stage
        image = sample_grid(make_pipeline(ema.model, components), prompts, images_per_prompt=config.validation.images_per_prompt, steps=config.validation.steps, guidance=config.validation.guidance, seed=config.validation.seed, height=side, width=side)
        image.save(run_dir / "samples" / f"step-{at_step:08d}.png")
        if tracker == "tensorboard":
            import numpy as np

            accelerator.get_tracker("tensorboard").log_images({"validation": np.asarray(image)[None]}, step=at_step, dataformats="NHWC")

    # ---- the loop ----------------------------------------------------------------------------
    buckets = config.objective.loss_buckets
    loss_sum = torch.zeros((), device=device)
    bucket_sum = torch.zeros(buckets, device=device)
    bucket_count = torch.zeros(buckets, device=device)
    grad_norm = torch.zeros((), device=device)
    window_start, waited, window_steps, window_images = time.perf_counter(), 0.0, 0, 0
    micro_batches = start_batches  # in the current stage
    images_local = 0  # images this rank has trained on since this process started
    kill_at = int(os.environ.get(KILL_AT_STEP_ENV, "-1"))
    data = iter(open_loader())
    progress = tqdm(total=config.max_steps, initial=step, desc="fit", unit="step", disable=not accelerator.is_local_main_process)
    model.train()
    while step < config.max_steps:
        if stage_index + 1 < len(stages) and step == starts[stage_index + 1]:
            # Next resolution stage: its own cache, from its first batch; same model and optimizer.
            del data  # shuts the previous stage's loader workers down
            stage_index += 1
            source = open_source(config, components, rank, world_size, 0, device, stages[stage_index])
            data, micro_batches = iter(open_loader()), 0
            logger.info("stage %d: %d px from %s, steps %d to %d", stage_index, stages[stage_index].resolution, stages[stage_index].cache, step, step + stages[stage_index].steps)
        for _ in range(config.optim.grad_accum):
            fetch_start = time.perf_counter()
            batch = next(data)  # the only place the loop waits for the data loader
            waited += time.perf_counter() - fetch_start
            micro_batches += 1
            images = batch["latents"].shape[0] if "latents" in batch else batch["pixels"].shape[0]  # a host-side shape
            window_images += images
            images_local += images
            latents, text, pooled, micro = source.model_inputs(batch, device)
            with accelerator.accumulate(model):
                out = training_loss(model, flow, latents, text, pooled, source.null_text, source.null_pooled, generator, config.objective.caption_dropout, micro)
                accelerator.backward(out.loss)
                if accelerator.sync_gradients and config.optim.grad_clip > 0:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
                optimizer.step()  # a no-op until the last micro-batch of the accumulation
                optimizer.zero_grad(set_to_none=True)
            loss_sum += out.loss.detach()
            index = timestep_bucket(out.t, buckets)
            bucket_sum.index_add_(0, index, out.per_sample)
            bucket_count.index_add_(0, index, torch.ones_like(out.per_sample))
        scheduler.step()
        step += 1
        window_steps += 1
        ema.update(accelerator.unwrap_model(model), step)
        progress.update(1)

        if step % config.logging.every_steps == 0 or step == config.max_steps:
            # Sync point: the window's loss sums and image counts come back to the host.
            image_counts = torch.tensor([window_images, images_local], device=device, dtype=torch.float64)
            totals = accelerator.reduce(torch.cat([loss_sum[None], bucket_sum, bucket_count]), reduction="sum")
            images_all = accelerator.reduce(image_counts, reduction="sum").tolist()
            elapsed = time.perf_counter() - window_start
            micro = window_steps * config.optim.grad_accum
            record = {
                "step": step,
                "loss": totals[0].item() / (micro * world_size),
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": grad_norm.item() if config.optim.grad_clip > 0 else None,
                "images_per_s": images_all[0] / elapsed,
                "data_stall_pct": 100.0 * waited / elapsed,
                "samples_seen": samples_before + int(images_all[1]),
            }
            if len(stages) > 1:
                record["stage"] = stage_index
            sums, counts = totals[1 : 1 + buckets].tolist(), totals[1 + buckets :].tolist()
            for i, (total, count) in enumerate(zip(sums, counts)):
                if count:
                    record[f"loss_t{i / buckets:.1f}-{(i + 1) / buckets:.1f}"] = total / count
            if accelerator.is_main_process:
                append_metrics(metrics_path, record)
            if tracker:
                accelerator.log({f"train/{k}": v for k, v in record.items() if v is not None and k != "step"}, step=step)
            progress.set_postfix(loss=f"{record['loss']:.4f}", stall=f"{record['data_stall_pct']:.0f}%")
            loss_sum.zero_()
            bucket_sum.zero_()
            bucket_count.zero_()
            window_start, waited, window_steps, window_images = time.perf_counter(), 0.0, 0, 0

        if config.validation.every_steps and step % config.validation.every_steps == 0 and step < config.max_steps:
            if accelerator.is_main_process:
                preview(step)
            accelerator.wait_for_everyone()

        if step % config.checkpoint.every_steps == 0 or step == config.max_steps:
            seen = samples_before + int(accelerator.reduce(torch.tensor([images_local], device=device, dtype=torch.float64), reduction="sum").item())
            state = new_state(
                step=step,
                samples_seen=seen,
                data=data_position(micro_batches),
                scheduler=scheduler.state_dict(),
                config=config.model_dump(mode="json"),
            )
            save_checkpoint(run_dir, accelerator=accelerator, model=model, ema_model=ema.model, optimizer=optimizer, generator=generator, state=state, keep_last=config.checkpoint.keep_last)

        if step == kill_at:
            logger.warning("%s=%d: killing this process (fault injection)", KILL_AT_STEP_ENV, kill_at)
            os.kill(os.getpid(), signal.SIGKILL)
    progress.close()

    # ---- export the EMA model, with a final preview from the same pipeline class ------------
    export = run_dir / EXPORT
    if accelerator.is_main_process:
        export_pipeline(make_pipeline(ema.model, components), export)
        preview(step)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return export

"""`trainer bench`: training throughput of the real training step, in images/s, TFLOP/s and MFU.

Runs the same `training_loss` / backward / clip / AdamW / EMA step as `trainer fit` on
cached-latent-shaped batches (random ones made in the data-loader workers, or a real
latent cache with `--cache`), so what is measured is the denoiser's training step plus
the loader's collation and host-to-device copies, without the frozen encoders.

FLOPs per image are `3 x DiffusionTransformer.forward_flops` (forward plus a backward of
twice its cost; every matmul and both attention matmuls counted, as
`torch.utils.flop_counter` counts them; checked against it in the tests). MFU is the
achieved rate over the device's dense bf16 peak from `PEAK_BF16_TFLOPS`; on a device not
in the table (or a CPU) pass `--peak-tflops`, otherwise MFU is reported as unknown.
Data-loader stall % is the share of wall time the loop spent waiting in `next(loader)`.
The attention kernels actually launched are listed from a profiler trace of one step, so
"flash" can be verified rather than assumed. With `bucket=(W, H)` the batches are of that
aspect bucket (and, by default, of its token-scaled batch size, `trainer.buckets`), so
`trainer bench --all-buckets` reports images/s, tokens/s, TFLOP/s and MFU per bucket.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch

from schemas.trainer import TrainConfig
from trainer.buckets import bucket_batch_sizes
from trainer.components import cpu_threads_beside_workers
from trainer.data import CachedLatents, SyntheticLatents, make_loader
from trainer.flow import RectifiedFlow
from trainer.train import EMA, build_denoiser, build_optimizer, training_loss

logger = logging.getLogger(__name__)

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from the vendors' datasheets,
# matched against torch.cuda.get_device_name() in this order (first match wins).
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM5
    ("H200", 989.4),
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10", 125.0),
    ("RTX 4090", 165.2),
]

ATTENTION_KERNEL_HINTS = ("flash", "fmha", "attention", "sdpa", "attn")


def peak_for(device_name: str) -> float | None:
    """Dense bf16 peak (TFLOP/s) of a CUDA device by its name; None when not in the table."""
    for key, peak in PEAK_BF16_TFLOPS:
        if key in device_name:
            return peak
    return None


def peak_tflops(device: torch.device) -> float | None:
    return peak_for(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


@dataclasses.dataclass
class BenchResult:
    device: str
    preset: str
    parameters: int
    batch_size: int
    resolution: int
    latent_size: int
    tokens: int
    width: int
    height: int
    steps: int
    images_per_s: float
    step_ms: float
    flops_per_image: float
    tflops: float
    peak_tflops: float | None
    mfu: float | None
    data_stall_pct: float
    attention_kernels: list[str]

    @property
    def tokens_per_s(self) -> float:
        return self.images_per_s * self.tokens

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "tokens_per_s": self.tokens_per_s}

    def row(self) -> str:
        mfu = f"{100 * self.mfu:5.1f}%" if self.mfu is not None else "    ?"
        return f"{self.width:>5}x{self.height:<5} {self.batch_size:>6} {self.tokens:>7} {self.images_per_s:>10.2f} {self.tokens_per_s:>12.0f} {self.tflops:>9.3f} {mfu:>6}"

    def report(self) -> str:
        mfu = f"{100 * self.mfu:.1f}%" if self.mfu is not None else "unknown (peak not known for this device; pass --peak-tflops)"
        peak = f"{self.peak_tflops:.1f}" if self.peak_tflops is not None else "unknown"
        lines = [
            f"device              {self.device}",
            f"model               preset {self.preset}, {self.parameters / 1e6:.1f}M parameters, {self.tokens} image tokens",
            f"batch               {self.batch_size} x {self.width}x{self.height}px ({self.tokens} tokens each), {self.steps} timed steps",
            f"images/s            {self.images_per_s:.2f}",
            f"tokens/s            {self.tokens_per_s:.0f}",
            f"step time           {self.step_ms:.1f} ms",
            f"FLOPs/image         {self.flops_per_image / 1e9:.2f} GFLOP (training = 3 x forward, attention included)",
            f"achieved            {self.tflops:.3f} TFLOP/s",
            f"peak (dense bf16)   {peak} TFLOP/s",
            f"MFU                 {mfu}",
            f"data-loader stall   {self.data_stall_pct:.1f}%",
            f"attention kernels   {', '.join(self.attention_kernels) or 'none seen'}",
        ]
        return "\n".join(lines)


BUCKET_TABLE_HEADER = f"{'bucket':<11} {'batch':>6} {'tokens':>7} {'images/s':>10} {'tokens/s':>12} {'TFLOP/s':>9} {'MFU':>6}"


def _attention_kernels(run_step, device: torch.device) -> list[str]:
    """Names of the attention kernels (CUDA) or ops (CPU) that one training step launches."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as trace:
        run_step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    names = set()
    for event in trace.events():
        is_kernel = device.type == "cuda" and event.device_type.name == "CUDA"
        is_cpu_op = device.type != "cuda" and event.name.startswith("aten::_scaled_dot_product")
        if (is_kernel and any(h in event.name.lower() for h in ATTENTION_KERNEL_HINTS)) or is_cpu_op:
            names.add(event.name[:120])
    return sorted(names)


def run_bench(
    config: TrainConfig,
    *,
    steps: int = 200,
    warmup: int = 20,
    cache: str | None = None,
    latent_channels: int = 4,
    vae_factor: int = 8,
    text_dim: int = 768,
    pooled_dim: int = 768,
    text_len: int | None = None,
    peak: float | None = None,
    profile_attention: bool = True,
    bucket: tuple[int, int] | None = None,
    batch_size: int | None = None,
) -> BenchResult:
    """Time `steps` training steps after `warmup` (which also absorbs torch.compile), on
    batches of `bucket` (width, height) pixels (default: the square data.resolution) of
    `batch_size` images (default: data.batch_size, scaled to the bucket's tokens when
    data.bucket_batch_sizes)."""
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    device = accelerator.device
    cpu_threads_beside_workers(device, config.data.num_workers)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    d = config.data
    if text_len is None:
        text_len = config.components.max_text_length
    width, height = bucket or (d.resolution, d.resolution)
    token = vae_factor * config.model.patch_size
    if width % token or height % token:
        raise ValueError(f"bucket {width}x{height}: sides must be multiples of {token} (VAE factor {vae_factor} x patch {config.model.patch_size})")
    if batch_size is None:
        batch_size = d.batch_size
        if bucket and d.bucket_batch_sizes:
            batch_size = bucket_batch_sizes([bucket], d.batch_size, d.resolution, vae_factor * config.model.patch_size)[bucket]
    latent_size = d.resolution // vae_factor
    latent_h, latent_w = height // vae_factor, width // vae_factor
    if cache:
        from trainer.cache import read_manifest

        manifest = read_manifest(cache)
        spec = manifest.spec
        latent_channels, text_dim, pooled_dim, text_len = spec.latent_channels, spec.text_dim, spec.pooled_dim, spec.max_text_length
        dataset = CachedLatents(cache, manifest, micro=config.uses_micro_conditioning(), synthetic_prob=d.synthetic_caption_prob, batch_size=batch_size, seed=config.seed, num_workers=d.num_workers, span=d.shuffle_span, world_size=accelerator.num_processes, rank=accelerator.process_index)
        first = next(iter(make_loader(dataset, 0, 1, False)))
        latent_h, latent_w = first["latents"].shape[-2:]
        latent_size = latent_w
        height, width = latent_h * vae_factor, latent_w * vae_factor
    else:
        dataset = SyntheticLatents(batch_size, (latent_channels, latent_h, latent_w), (text_len, text_dim), pooled_dim)
    loader = make_loader(dataset, d.num_workers, d.prefetch_factor, pin_memory=device.type == "cuda")

    model = build_denoiser(config, latent_channels, latent_size, text_dim, pooled_dim, vae_factor).to(device)
    ema = EMA(model, config.optim.ema_decay, config.optim.ema_warmup)
    optimizer = build_optimizer(model, config, device)
    if config.model.compile:
        model.compile()
    model, optimizer = accelerator.prepare(model, optimizer)
    generator = torch.Generator(device).manual_seed(config.seed)
    flow = RectifiedFlow(config.objective.logit_normal_mean, config.objective.logit_normal_std)
    null_text = torch.zeros(1, text_len, text_dim, device=device)
    null_pooled = torch.zeros(1, pooled_dim, device=device)
    # Size conditions of an uncropped image of the bucket (or the cache's own, per sample).
    default_micro = torch.tensor([[height, width, 0, 0, height, width]], device=device, dtype=torch.float32)
    micro_on = config.uses_micro_conditioning()
    data = iter(loader)
    step_count = 0
    waited = 0.0

    def run_step() -> None:
        nonlocal step_count, waited
        start = time.perf_counter()
        batch = next(data)
        waited += time.perf_counter() - start
        latents = batch["latents"].to(device, non_blocking=True).float()
        text = batch["text"].to(device, non_blocking=True).float()
        pooled = batch["pooled"].to(device, non_blocking=True).float()
        micro = None
        if micro_on:
            micro = batch["micro"].to(device, non_blocking=True).float() if "micro" in batch else default_micro.expand(latents.shape[0], 6)
        out = training_loss(model, flow, latents, text, pooled, null_text, null_pooled, generator, config.objective.caption_dropout, micro)
        accelerator.backward(out.loss)
        if config.optim.grad_clip > 0:
            accelerator.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_count += 1
        ema.update(accelerator.unwrap_model(model), step_count)

    model.train()
    for _ in range(warmup):
        run_step()
    kernels = _attention_kernels(run_step, device) if profile_attention else []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    waited = 0.0
    start = time.perf_counter()
    for _ in range(steps):
        run_step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the one sync: the timed window ends when the device is done
    elapsed = time.perf_counter() - start

    unwrapped = accelerator.unwrap_model(model)
    images = steps * batch_size * accelerator.num_processes
    images_per_s = images / elapsed
    flops_per_image = 3.0 * unwrapped.forward_flops(latent_h, latent_w, text_len)
    achieved = images_per_s * flops_per_image / 1e12
    peak = peak if peak is not None else peak_tflops(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    tokens = (latent_h // unwrapped.config.patch_size) * (latent_w // unwrapped.config.patch_size)
    return BenchResult(
        device=name,
        preset=config.model.preset,
        parameters=sum(p.numel() for p in unwrapped.parameters()),
        batch_size=batch_size,
        resolution=d.resolution,
        latent_size=latent_size,
        tokens=tokens,
        width=int(width),
        height=int(height),
        steps=steps,
        images_per_s=images_per_s,
        step_ms=1000 * elapsed / steps,
        flops_per_image=flops_per_image,
        tflops=achieved,
        peak_tflops=peak,
        mfu=achieved / (peak * accelerator.num_processes) if peak else None,
        data_stall_pct=100.0 * waited / elapsed,
        attention_kernels=kernels,
    )

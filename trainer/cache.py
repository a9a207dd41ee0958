"""`trainer cache`: encode the curated shards once into latent files, and check caches before use.

For every source shard the VAE encodes each image (posterior mean, scaled by the VAE's
`scaling_factor`) and the text encoder each caption, original and synthetic, and the
results go to `CACHE_DIR/STEM-NNN.safetensors` files of at most `cache.samples_per_file`
samples (tensors `latents`, `text.original`, `pooled.original`, `text.synthetic`,
`pooled.synthetic`, `has_synthetic`, and SDXL's conditions `original_size`, `crop_top_left`,
`target_size`, (N, 2) int32 pixels as (h, w) / (top, left); a sample without a synthetic
caption carries its original caption's embedding in the synthetic slot). With
`data.buckets` every image goes to its aspect bucket (`trainer/buckets.py`) and each file
holds one bucket (`STEM-WxH-NNN.safetensors`; the manifest records the bucket set in the
spec, each file's bucket and the samples per bucket, and the log prints the histogram).
A finished shard writes `parts/STEM.json`, so an interrupted cache resumes shard by shard; `manifest.json` lists
every file and records the `CacheSpec` (VAE and text encoder fingerprints, resolution,
dtype, captions). `fit` recomputes that spec from its own config and components and
refuses a cache that differs, naming each field.

Shards and the cache may be on any fsspec URL (local, `gs://`, `s3://`; shards also
`https://`). Every cache file is written whole: locally to a temporary name then renamed,
on object storage in one upload (an object exists only once its upload completes).
A shard that is truncated, unreadable or vanishes while being read is reported by name
with the samples lost (`SourceShard.lost`, `problem`) and the cache goes on without them.

Multi-GPU: under `accelerate launch`, shard i is encoded by rank i % world_size.
Memory: up to one file's worth of samples per shard and bucket in flight (at most num_workers
shards).
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import save
from tqdm import tqdm

from schemas.trainer import CacheFile, CachePart, CacheSpec, LatentCacheManifest, SourceShard, TrainConfig
from trainer.buckets import Bucket, bucket_histogram, bucket_name, bucket_set
from trainer.components import DTYPES, Components, cpu_threads_beside_workers, load_components
from trainer.data import CROP_TOP_LEFT, HAS_SYNTHETIC, LATENTS, ORIGINAL_SIZE, TARGET_SIZE, expand_shards, pooled_key, text_key, url_fs
from trainer.shard_reader import ShardReader

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SPEC = "spec.json"
NULL_TEXT = "null_text.safetensors"
PREVIEW_CAPTIONS = 4


class CacheMismatch(ValueError):
    """The cache was made with something other than what the config asks for."""


def caption_kinds(captions: str) -> list[str]:
    return {"original": ["original"], "synthetic": ["synthetic"], "both": ["original", "synthetic"]}[captions]


def cache_spec(config: TrainConfig, components: Components, resolution: int | None = None) -> CacheSpec:
    """What a cache made with `config` and `components` contains (at `resolution`, default
    data.resolution: a stage's resolution for staged training)."""
    resolution = resolution or config.data.resolution
    step = components.vae_scale_factor * config.model.patch_size
    if config.data.bucket_step:
        if config.data.bucket_step % step:
            raise ValueError(f"data.bucket_step {config.data.bucket_step} is not a multiple of the VAE factor x patch size ({step})")
        step = config.data.bucket_step
    buckets = bucket_set(resolution, step, config.data.max_aspect) if config.data.buckets else None
    return CacheSpec(
        vae=components.vae_identity,
        vae_scaling_factor=components.scaling_factor,
        vae_shift_factor=components.shift_factor,
        latent_channels=components.latent_channels,
        text_encoder=components.text_identity,
        max_text_length=components.max_text_length,
        text_dim=components.text_dim,
        pooled_dim=components.pooled_dim,
        resolution=resolution,
        buckets=buckets,
        dtype=config.cache.dtype,
        captions=config.cache.captions,
    )


def spec_differences(found: CacheSpec, expected: CacheSpec) -> list[str]:
    """'field: cache has X, config gives Y' for every field that differs (nested fields dotted).

    Where a model was loaded from is not compared (the same weights may move); its
    fingerprint is.
    """
    differences = []

    def walk(a, b, prefix: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                if key in ("source", "subfolder"):
                    continue
                walk(a.get(key), b.get(key), f"{prefix}{key}.")
        elif a != b:
            differences.append(f"{prefix[:-1]}: cache has {a!r}, config gives {b!r}")

    walk(found.model_dump(mode="json"), expected.model_dump(mode="json"), "")
    return differences


class Store:
    """A cache directory on any fsspec file system: whole-file reads and atomic writes."""

    def __init__(self, url: str | Path):
        self.url = str(url)
        self.fs, self.root = url_fs(self.url)
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    def path(self, *names: str) -> str:
        return "/".join([self.root.rstrip("/"), *names])

    def url_of(self, *names: str) -> str:
        return "/".join([self.url.rstrip("/"), *names])

    def exists(self, *names: str) -> bool:
        return self.fs.isfile(self.path(*names))

    def read(self, *names: str) -> bytes:
        return self.fs.cat_file(self.path(*names))

    def write(self, data: bytes, *names: str) -> None:
        """Write `data` whole: never a partial file under the name."""
        target = self.path(*names)
        if self.local:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            tmp = f"{target}.{uuid.uuid4().hex}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        else:
            self.fs.pipe_file(target, data)  # one upload: the object appears when it completes


def read_manifest(cache_dir: str | Path) -> LatentCacheManifest:
    store = Store(cache_dir)
    if not store.exists(MANIFEST):
        raise FileNotFoundError(
            f"{store.url_of(MANIFEST)} does not exist: {cache_dir} is not a finished latent cache (run `trainer cache`, or finish it)"
        )
    return LatentCacheManifest.model_validate_json(store.read(MANIFEST))


def check_cache(manifest: LatentCacheManifest, expected: CacheSpec, config: TrainConfig, cache_dir: str | Path) -> None:
    """Refuse a cache that does not match `config`: different spec, captions the caption mix
    needs but the cache lacks, or (when `data.shards` is also given) different source shards."""
    problems = spec_differences(manifest.spec, expected)
    kinds = caption_kinds(manifest.spec.captions)
    prob = config.data.synthetic_caption_prob
    if prob > 0 and "synthetic" not in kinds:
        problems.append(f"data.synthetic_caption_prob is {prob} but the cache holds only original captions")
    if prob < 1 and "original" not in kinds:
        problems.append(f"data.synthetic_caption_prob is {prob} but the cache holds only synthetic captions")
    if config.data.shards:
        sources = [(p.rsplit("/", 1)[-1], url_fs(p)[0].size(url_fs(p)[1])) for p in expand_shards(config.data.shards)]
        cached = [(s.path.rsplit("/", 1)[-1], s.size_bytes) for s in manifest.sources]
        if sources != cached:
            changed = sorted(set(sources) ^ set(cached))
            problems.append(
                f"the shards in data.shards differ from the ones the cache was made from (stale cache); "
                f"{len(changed)} (name, size) entries differ, first: {changed[0] if changed else 'order'}"
            )
    if problems:
        raise CacheMismatch(
            f"latent cache {cache_dir} does not match this config:\n  - "
            + "\n  - ".join(problems)
            + "\nRebuild it with `trainer cache` using this config (into a new directory), or fix the config."
        )


def _unique_stems(paths: list[str]) -> list[str]:
    stems = [p.rsplit("/", 1)[-1].rsplit(".", 1)[0] for p in paths]
    if len(set(stems)) != len(stems):
        duplicates = sorted({s for s in stems if stems.count(s) > 1})
        raise ValueError(f"shards must have distinct file names; repeated: {duplicates[:5]}")
    return stems


class _ShardBuffer:
    """Encoded samples of one shard waiting to fill a cache file."""

    def __init__(self, stem: str, kinds: list[str], bucket: Bucket | None = None):
        self.stem = stem
        self.bucket = bucket
        self.kinds = kinds
        self.tensors: dict[str, list[torch.Tensor]] = {}
        self.keys: list[str] = []
        self.files: list[CacheFile] = []
        self.captions: list[str] = []

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, keys: list[str], tensors: dict[str, torch.Tensor]) -> None:
        self.keys.extend(keys)
        for name, value in tensors.items():
            self.tensors.setdefault(name, []).append(value)

    def flush(self, output: Store, source: str, limit: int) -> None:
        """Write the first `limit` buffered samples to the next cache file."""
        if not self.keys:
            return
        joined = {name: torch.cat(parts) for name, parts in self.tensors.items()}
        take = min(limit, len(self.keys))
        label = f"{bucket_name(self.bucket)}-" if self.bucket else ""
        name = f"{self.stem}-{label}{len(self.files):03d}.safetensors"
        chunk = {k: v[:take].contiguous() for k, v in joined.items()}
        output.write(save(chunk, metadata={"keys": json.dumps(self.keys[:take]), "source": source}), name)
        self.files.append(CacheFile(file=name, source=source, num_samples=take, bucket=self.bucket))
        self.keys = self.keys[take:]
        self.tensors = {k: [v[take:]] for k, v in joined.items()} if self.keys else {}


@torch.no_grad()
def _encode(components: Components, batch: dict, kinds: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = {LATENTS: components.encode_images(batch["pixels"]).to("cpu", dtype)}
    texts = {
        "original": batch["original"],
        "synthetic": [s or o for s, o in zip(batch["synthetic"], batch["original"])],
    }
    for kind in kinds:
        hidden, pooled = components.encode_text(texts[kind])
        out[text_key(kind)] = hidden.to("cpu", dtype)
        out[pooled_key(kind)] = pooled.to("cpu", dtype)
    out[HAS_SYNTHETIC] = torch.tensor([bool(s) for s in batch["synthetic"]])
    width, height = batch["bucket"]
    out[ORIGINAL_SIZE] = batch["original_size"]
    out[CROP_TOP_LEFT] = batch["crop_top_left"]
    out[TARGET_SIZE] = torch.tensor([[height, width]], dtype=torch.int32).expand(len(batch["keys"]), 2).contiguous()
    return out


def build_cache(config: TrainConfig, shards: str, output: str | Path) -> LatentCacheManifest:
    """Encode the shards named by `shards` into a latent cache at `output` (see module doc)."""
    from accelerate import PartialState

    state = PartialState()
    cpu_threads_beside_workers(state.device, config.cache.num_workers)
    output = Store(output)
    paths = expand_shards(shards)
    stems = _unique_stems(paths)
    components = load_components(config.components, state.device, torch.float32)  # fingerprints in fp32
    spec = cache_spec(config, components)
    components.to(state.device, DTYPES[config.cache.compute_dtype])
    store_dtype = DTYPES[config.cache.dtype]
    kinds = caption_kinds(config.cache.captions)

    if output.exists(SPEC):  # every rank checks, so all of them stop
        found = CacheSpec.model_validate_json(output.read(SPEC))
        differences = spec_differences(found, spec)
        if differences:
            raise CacheMismatch(
                f"{output.url} holds a cache made with a different config:\n  - " + "\n  - ".join(differences)
                + "\nUse a new output directory."
            )
    state.wait_for_everyone()
    if state.is_main_process:
        output.write(spec.model_dump_json(indent=2).encode(), SPEC)
    state.wait_for_everyone()

    def done(i: int) -> bool:
        if not output.exists("parts", f"{stems[i]}.json"):
            return False
        source = CachePart.model_validate_json(output.read("parts", f"{stems[i]}.json")).source
        fs, path = url_fs(paths[i])
        return source.problem is None and fs.exists(path) and source.size_bytes == fs.size(path)

    mine = [i for i in range(len(paths)) if i % state.num_processes == state.process_index]
    todo = [i for i in mine if not done(i)]
    if len(todo) < len(mine):
        logger.info("rank %d: %d of its %d shards are already cached; skipping them", state.process_index, len(mine) - len(todo), len(mine))

    if todo:
        reader = ShardReader([paths[i] for i in todo], spec.resolution, config.cache.batch_size, buckets=spec.buckets)
        workers = min(config.cache.num_workers, len(todo))
        loader = torch.utils.data.DataLoader(reader, batch_size=None, num_workers=workers)
        buffers: dict[int, dict[Bucket | None, _ShardBuffer]] = {}  # shard -> bucket -> samples waiting
        progress = tqdm(total=len(todo), desc=f"cache (rank {state.process_index})", unit="shard", disable=not state.is_local_main_process)
        for batch in loader:
            i = todo[batch["shard"]]
            shard_buffers = buffers.setdefault(i, {})
            if batch["keys"]:
                bucket = tuple(batch["bucket"]) if spec.buckets else None
                buffer = shard_buffers.setdefault(bucket, _ShardBuffer(stems[i], kinds, bucket))
                buffer.add(batch["keys"], _encode(components, batch, kinds, store_dtype))
                buffer.captions.extend(s or o for s, o in zip(batch["synthetic"], batch["original"]))
                while len(buffer) >= config.cache.samples_per_file:
                    buffer.flush(output, paths[i], config.cache.samples_per_file)
            if batch["last"]:
                files, captions = [], []
                order = {tuple(b): n for n, b in enumerate(spec.buckets or [])}
                for bucket in sorted(shard_buffers, key=lambda b: order.get(b, 0)):  # files in bucket order
                    buffer = shard_buffers[bucket]
                    buffer.flush(output, paths[i], config.cache.samples_per_file)
                    files += buffer.files
                    captions += buffer.captions[:PREVIEW_CAPTIONS]
                part = CachePart(
                    source=SourceShard(
                        path=paths[i], size_bytes=batch["size_bytes"], sha256=batch["sha256"], num_samples=batch["num_samples"],
                        lost=batch["lost"], problem=batch["problem"],
                    ),
                    files=files,
                    skipped=batch["skipped"],
                    preview_captions=captions[:PREVIEW_CAPTIONS],
                )
                output.write(part.model_dump_json(indent=2).encode(), "parts", f"{stems[i]}.json")
                del buffers[i]
                progress.update(1)
        progress.close()
    state.wait_for_everyone()

    if state.is_main_process:
        parts = [CachePart.model_validate_json(output.read("parts", f"{stem}.json")) for stem in stems]
        null_hidden, null_pooled = components.encode_text([""])
        output.write(save({"text": null_hidden.to("cpu", store_dtype).contiguous(), "pooled": null_pooled.to("cpu", store_dtype).contiguous()}), NULL_TEXT)
        previews = [c for part in parts for c in part.preview_captions]
        counts: dict[str, int] = {}
        if spec.buckets:
            counts = {bucket_name(tuple(b)): 0 for b in spec.buckets}
            for f in (f for part in parts for f in part.files):
                counts[bucket_name(f.bucket)] += f.num_samples
        manifest = LatentCacheManifest(
            created_at=datetime.now(timezone.utc),
            spec=spec,
            sources=[part.source for part in parts],
            files=[f for part in parts for f in part.files],
            num_samples=sum(part.source.num_samples for part in parts),
            skipped=sum(part.skipped for part in parts),
            preview_captions=list(dict.fromkeys(previews))[:PREVIEW_CAPTIONS],
            null_text_file=NULL_TEXT,
            bucket_counts=counts,
        )
        output.write(manifest.model_dump_json(indent=2).encode(), MANIFEST)
        logger.info("latent cache %s: %d samples in %d files from %d shards (%d skipped)", output.url, manifest.num_samples, len(manifest.files), len(paths), manifest.skipped)
        if counts:
            logger.info("samples per bucket (width x height):\n%s", bucket_histogram(counts))
        damaged = [s for s in manifest.sources if s.problem]
        for source in damaged:
            logger.error("shard %s: %s; %d sample(s) lost", source.path, source.problem, source.lost)
        if damaged:
            logger.error("%d damaged shard(s), %d sample(s) lost in all; the cache holds the rest", len(damaged), sum(s.lost for s in damaged))
    state.wait_for_everyone()
    return read_manifest(output.url)

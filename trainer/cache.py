"""`trainer cache`: encode the curated shards once into latent files, and check caches before use.

For every source shard the VAE encodes each image (posterior mean, scaled by the VAE's
`scaling_factor`) and the text encoder each caption, original and synthetic, and the
results go to `CACHE_DIR/STEM-NNN.safetensors` files of at most `cache.samples_per_file`
samples (tensors `latents`, `text.original`, `pooled.original`, `text.synthetic`,
`pooled.synthetic`, `has_synthetic`; a sample without a synthetic caption carries its
original caption's embedding in the synthetic slot). A finished shard writes
`parts/STEM.json`, so an interrupted cache resumes shard by shard; `manifest.json` lists
every file and records the `CacheSpec` (VAE and text encoder fingerprints, resolution,
dtype, captions). `fit` recomputes that spec from its own config and components and
refuses a cache that differs, naming each field.

Multi-GPU: under `accelerate launch`, shard i is encoded by rank i % world_size.
Memory: one file's worth of samples per shard in flight (at most num_workers shards).
"""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from schemas.trainer import CacheFile, CachePart, CacheSpec, LatentCacheManifest, SourceShard, TrainConfig
from trainer.components import DTYPES, Components, cpu_threads_beside_workers, load_components
from trainer.data import HAS_SYNTHETIC, LATENTS, ShardReader, expand_shards, pooled_key, text_key

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SPEC = "spec.json"
NULL_TEXT = "null_text.safetensors"
PREVIEW_CAPTIONS = 4


class CacheMismatch(ValueError):
    """The cache was made with something other than what the config asks for."""


def caption_kinds(captions: str) -> list[str]:
    return {"original": ["original"], "synthetic": ["synthetic"], "both": ["original", "synthetic"]}[captions]


def cache_spec(config: TrainConfig, components: Components) -> CacheSpec:
    """What a cache made with `config` and `components` contains."""
    return CacheSpec(
        vae=components.vae_identity,
        vae_scaling_factor=components.scaling_factor,
        vae_shift_factor=components.shift_factor,
        latent_channels=components.latent_channels,
        text_encoder=components.text_identity,
        max_text_length=components.max_text_length,
        text_dim=components.text_dim,
        pooled_dim=components.pooled_dim,
        resolution=config.data.resolution,
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


def read_manifest(cache_dir: str | Path) -> LatentCacheManifest:
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: {cache_dir} is not a finished latent cache (run `trainer cache`, or finish it)"
        )
    return LatentCacheManifest.model_validate_json(path.read_text())


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
        sources = [(Path(p).name, os.path.getsize(p)) for p in expand_shards(config.data.shards)]
        cached = [(Path(s.path).name, s.size_bytes) for s in manifest.sources]
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
    stems = [Path(p).stem for p in paths]
    if len(set(stems)) != len(stems):
        duplicates = sorted({s for s in stems if stems.count(s) > 1})
        raise ValueError(f"shards must have distinct file names; repeated: {duplicates[:5]}")
    return stems


class _ShardBuffer:
    """Encoded samples of one shard waiting to fill a cache file."""

    def __init__(self, stem: str, kinds: list[str]):
        self.stem = stem
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

    def flush(self, output: Path, source: str, limit: int) -> None:
        """Write the first `limit` buffered samples to the next cache file."""
        if not self.keys:
            return
        joined = {name: torch.cat(parts) for name, parts in self.tensors.items()}
        take = min(limit, len(self.keys))
        name = f"{self.stem}-{len(self.files):03d}.safetensors"
        chunk = {k: v[:take].contiguous() for k, v in joined.items()}
        tmp = output / (name + ".tmp")
        save_file(chunk, str(tmp), metadata={"keys": json.dumps(self.keys[:take]), "source": source})
        os.replace(tmp, output / name)
        self.files.append(CacheFile(file=name, source=source, num_samples=take))
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
    return out


def build_cache(config: TrainConfig, shards: str, output: str | Path) -> LatentCacheManifest:
    """Encode the shards named by `shards` into a latent cache at `output` (see module doc)."""
    from accelerate import PartialState

    state = PartialState()
    cpu_threads_beside_workers(state.device, config.cache.num_workers)
    output = Path(output)
    paths = expand_shards(shards)
    stems = _unique_stems(paths)
    components = load_components(config.components, state.device, torch.float32)  # fingerprints in fp32
    spec = cache_spec(config, components)
    components.to(state.device, DTYPES[config.cache.compute_dtype])
    store_dtype = DTYPES[config.cache.dtype]
    kinds = caption_kinds(config.cache.captions)

    parts_dir = output / "parts"
    spec_path = output / SPEC
    if spec_path.is_file():  # every rank checks, so all of them stop
        found = CacheSpec.model_validate_json(spec_path.read_text())
        differences = spec_differences(found, spec)
        if differences:
            raise CacheMismatch(
                f"{output} holds a cache made with a different config:\n  - " + "\n  - ".join(differences)
                + "\nUse a new output directory."
            )
    state.wait_for_everyone()
    if state.is_main_process:
        parts_dir.mkdir(parents=True, exist_ok=True)
        spec_path.write_text(spec.model_dump_json(indent=2))
    state.wait_for_everyone()

    def done(i: int) -> bool:
        part = parts_dir / f"{stems[i]}.json"
        if not part.is_file():
            return False
        source = CachePart.model_validate_json(part.read_text()).source
        return source.size_bytes == os.path.getsize(paths[i])

    mine = [i for i in range(len(paths)) if i % state.num_processes == state.process_index]
    todo = [i for i in mine if not done(i)]
    if len(todo) < len(mine):
        logger.info("rank %d: %d of its %d shards are already cached; skipping them", state.process_index, len(mine) - len(todo), len(mine))

    if todo:
        reader = ShardReader([paths[i] for i in todo], config.data.resolution, config.cache.batch_size)
        workers = min(config.cache.num_workers, len(todo))
        loader = torch.utils.data.DataLoader(reader, batch_size=None, num_workers=workers)
        buffers: dict[int, _ShardBuffer] = {}
        progress = tqdm(total=len(todo), desc=f"cache (rank {state.process_index})", unit="shard", disable=not state.is_local_main_process)
        for batch in loader:
            i = todo[batch["shard"]]
            buffer = buffers.setdefault(i, _ShardBuffer(stems[i], kinds))
            if batch["keys"]:
                buffer.add(batch["keys"], _encode(components, batch, kinds, store_dtype))
                buffer.captions.extend(s or o for s, o in zip(batch["synthetic"], batch["original"]))
                while len(buffer) >= config.cache.samples_per_file:
                    buffer.flush(output, paths[i], config.cache.samples_per_file)
            if batch["last"]:
                buffer.flush(output, paths[i], config.cache.samples_per_file)
                part = CachePart(
                    source=SourceShard(path=paths[i], size_bytes=batch["size_bytes"], sha256=batch["sha256"], num_samples=batch["num_samples"]),
                    files=buffer.files,
                    skipped=batch["skipped"],
                    preview_captions=buffer.captions[:PREVIEW_CAPTIONS],
                )
                tmp = parts_dir / f"{stems[i]}.json.tmp"
                tmp.write_text(part.model_dump_json(indent=2))
                os.replace(tmp, parts_dir / f"{stems[i]}.json")
                del buffers[i]
                progress.update(1)
        progress.close()
    state.wait_for_everyone()

    if state.is_main_process:
        parts = [CachePart.model_validate_json((parts_dir / f"{stem}.json").read_text()) for stem in stems]
        null_hidden, null_pooled = components.encode_text([""])
        save_file({"text": null_hidden.to("cpu", store_dtype).contiguous(), "pooled": null_pooled.to("cpu", store_dtype).contiguous()}, str(output / NULL_TEXT))
        previews = [c for part in parts for c in part.preview_captions]
        manifest = LatentCacheManifest(
            created_at=datetime.now(timezone.utc),
            spec=spec,
            sources=[part.source for part in parts],
            files=[f for part in parts for f in part.files],
            num_samples=sum(part.source.num_samples for part in parts),
            skipped=sum(part.skipped for part in parts),
            preview_captions=list(dict.fromkeys(previews))[:PREVIEW_CAPTIONS],
            null_text_file=NULL_TEXT,
        )
        tmp = output / (MANIFEST + ".tmp")
        tmp.write_text(manifest.model_dump_json(indent=2))
        os.replace(tmp, output / MANIFEST)
        logger.info("latent cache %s: %d samples in %d files from %d shards (%d skipped)", output, manifest.num_samples, len(manifest.files), len(paths), manifest.skipped)
    state.wait_for_everyone()
    return read_manifest(output)

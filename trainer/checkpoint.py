"""Checkpoints that resume exactly, with every tensor in safetensors (no pickle).

`RUN_DIR/checkpoints/step-NNNNNNNN/`:
    model.safetensors        training weights (fp32)
    ema.safetensors          EMA weights
    optimizer.safetensors    AdamW moments and step counts, one tensor per parameter and name
    state.json               CheckpointState: step, data position, LR scheduler, optimizer
                             param groups, the config
    rng-rankN.safetensors    torch CPU and CUDA generator states and the training generator
                             (noise, timesteps, caption dropout) of rank N
    rng-rankN.json           Python's and NumPy's generators of rank N

A checkpoint is written into `step-NNNNNNNN.tmp/` and renamed when every rank has written
its part, so a run killed mid-save never leaves a half checkpoint that looks complete.
accelerate's `save_state` is not used because it pickles the optimizer and RNG states.
Multi-GPU: DDP keeps identical weights and optimizer state on every rank, so rank 0
writes those; each rank writes its own generators. Sharded optimizers (FSDP, DeepSpeed)
are not supported.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from schemas.trainer import CheckpointState, RankRngState

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
_PREFIX = "step-"


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"{_PREFIX}{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and p.name[len(_PREFIX):].isdigit() and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def read_state(path: str | Path) -> CheckpointState:
    return CheckpointState.model_validate_json((Path(path) / "state.json").read_text())


def _split_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict[str, object], list[dict]]:
    tensors, scalars = {}, {}
    for index, values in state_dict["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    groups = json.loads(json.dumps(state_dict["param_groups"]))  # tuples -> lists, checks JSON-ability
    return tensors, scalars, groups


def _join_optimizer_state(tensors: dict[str, torch.Tensor], scalars: dict, groups: list[dict]) -> dict:
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(scalars.items()):
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": groups}


def _numpy_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _set_numpy_state(state: dict) -> None:
    np.random.set_state((state["name"], np.array(state["keys"], dtype=np.uint32), state["pos"], state["has_gauss"], state["cached_gaussian"]))


def _python_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _set_python_state(state: list) -> None:
    version, internal, gauss = state
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(run_dir: str | Path, *, accelerator, model, ema_model, optimizer, generator: torch.Generator, state: CheckpointState, keep_last: int) -> Path:
    """Write a checkpoint for `state.step` (collective: every rank must call it)."""
    final = checkpoint_dir(run_dir, state.step)
    tmp = final.with_name(final.name + ".tmp")
    rank = accelerator.process_index
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(model), str(tmp / "model.safetensors"))
        save_model(ema_model, str(tmp / "ema.safetensors"))
        tensors, scalars, groups = _split_optimizer_state(optimizer.state_dict())
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        state = state.model_copy(update={"optimizer_param_groups": groups, "optimizer_scalars": scalars})
        (tmp / "state.json").write_text(state.model_dump_json(indent=2))
    rng = {"torch_cpu": torch.get_rng_state(), "generator": generator.get_state()}
    if torch.cuda.is_available():
        rng["torch_cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(tmp / f"rng-rank{rank}.safetensors"))
    (tmp / f"rng-rank{rank}.json").write_text(RankRngState(python=_python_state(), numpy=_numpy_state()).model_dump_json())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # the same step saved by a run that was killed later on
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(path: str | Path, *, accelerator, model, ema_model, optimizer, generator: torch.Generator) -> CheckpointState:
    """Restore everything `save_checkpoint` wrote into the (unprepared) model, EMA model,
    optimizer and generator, and this rank's global RNGs. Returns the state (the caller
    restores the LR scheduler from `state.scheduler`)."""
    path = Path(path)
    state = read_state(path)
    rank = accelerator.process_index
    rng_file = path / f"rng-rank{rank}.safetensors"
    if not rng_file.is_file():
        raise ValueError(f"{path} has no RNG state for rank {rank}: it was written by fewer processes than this run has")
    load_model(model, str(path / "model.safetensors"), strict=True)
    load_model(ema_model, str(path / "ema.safetensors"), strict=True)
    tensors = load_file(str(path / "optimizer.safetensors"))
    optimizer.load_state_dict(_join_optimizer_state(tensors, dict(state.optimizer_scalars), [dict(g) for g in state.optimizer_param_groups]))
    rng = load_file(str(rng_file))
    torch.set_rng_state(rng["torch_cpu"])
    generator.set_state(rng["generator"])
    if "torch_cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["torch_cuda"])
    python_numpy = RankRngState.model_validate_json((path / f"rng-rank{rank}.json").read_text())
    _set_python_state(python_numpy.python)
    _set_numpy_state(python_numpy.numpy)
    return state


def new_state(**fields) -> CheckpointState:
    return CheckpointState(created_at=datetime.now(timezone.utc), optimizer_param_groups=[], **fields)

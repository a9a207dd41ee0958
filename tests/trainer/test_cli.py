"""The `trainer` command line: config loading, and the demo's command sequence end to end."""

from __future__ import annotations

import json

import pytest
import yaml
from PIL import Image

from tests.trainer.conftest import shard_spec
from trainer.cli import load_config, main, named_configs


def test_named_configs_load_and_overrides_apply():
    assert {"demo", "base-256", "bench-B", "bench-XL"} <= set(named_configs())
    for name in named_configs():
        load_config(name)
    config = load_config("demo", ["optim.lr=3e-4", "model.depth=2", "validation.prompts=[a, b]"])
    assert config.optim.lr == 3e-4 and config.model.depth == 2 and config.validation.prompts == ["a", "b"]
    with pytest.raises(ValueError, match="key.path=value"):
        load_config("demo", ["optim.lr"])
    with pytest.raises(FileNotFoundError, match="named configs"):
        load_config("no-such-config")
    with pytest.raises(ValueError, match="Extra inputs"):
        load_config("demo", ["optim.learning_rate=1"])


def test_demo_sequence(tmp_path, shard_paths, capsys):
    components = tmp_path / "components"
    assert main(["init-components", "--output", str(components), "--resolution", "32", "--vae-steps", "5"]) == 0
    assert {p.name for p in components.iterdir()} >= {"vae", "text_encoder", "tokenizer"}

    common = ["--config", "demo", "--components", str(components), "--set", "data.resolution=32", "--set", "data.num_workers=1", "--set", "cache.num_workers=1"]
    assert main(["cache", "--shards", shard_spec(shard_paths), "--output", str(tmp_path / "latents"), *common]) == 0
    manifest = json.loads((tmp_path / "latents" / "manifest.json").read_text())
    assert manifest["num_samples"] == 48 and manifest["spec"]["vae"]["subfolder"] == "vae"

    fit_args = ["fit", "--cache", str(tmp_path / "latents"), "--output", str(tmp_path / "run"), *common,
                "--set", "max_steps=3", "--set", "data.batch_size=4", "--set", "validation.every_steps=0",
                "--set", "validation.steps=2", "--set", "validation.images_per_prompt=1", "--set", "logging.tracker=tensorboard"]
    assert main(fit_args) == 0
    saved = yaml.safe_load((tmp_path / "run" / "config.json").read_text())
    assert saved["components"]["vae"] == str(components) and saved["max_steps"] == 3
    assert list((tmp_path / "run" / "logs").rglob("events.out.tfevents.*"))  # tensorboard by default

    assert main(["sample", "--run", str(tmp_path / "run"), "--prompt", "a red circle", "--steps", "2", "--num-per-prompt", "3", "--out", str(tmp_path / "grid.png")]) == 0
    assert Image.open(tmp_path / "grid.png").size == (3 * 32, 32)
    assert "grid.png" in capsys.readouterr().out


def test_lora_commands_are_registered():
    from trainer.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["lora", "--images", "imgs", "--base", "runs/base", "--output", "runs/lora", "--trigger", "sks"])
    assert args.func.__name__ == "cmd_lora" and args.trigger == "sks"
    args = parser.parse_args(["sample", "--run", "runs/base", "--out", "x.png", "--lora", "runs/lora", "--lora-scale", "0.8"])
    assert args.lora == ["runs/lora"] and args.lora_scale == [0.8]

"""`trainer bench` on CPU: the real training step, timed, with FLOPs, MFU and loader stall."""

from __future__ import annotations

import pytest

from tests.trainer.conftest import tiny_config
from trainer.bench import peak_for, run_bench
from trainer.cli import main


def test_bench_on_synthetic_latents(components_dir):
    config = tiny_config(components_dir, data={"num_workers": 1, "batch_size": 4})
    result = run_bench(config, steps=4, warmup=1, latent_channels=4, vae_factor=4, text_dim=32, pooled_dim=32)
    assert result.images_per_s > 0 and result.step_ms > 0
    assert result.latent_size == 8 and result.tokens == 16
    assert result.flops_per_image > 0 and result.tflops == pytest.approx(result.images_per_s * result.flops_per_image / 1e12)
    assert result.peak_tflops is None and result.mfu is None  # no peak known for a CPU
    assert 0 <= result.data_stall_pct <= 100
    assert any("scaled_dot_product" in name for name in result.attention_kernels)
    text = result.report()
    for label in ("images/s", "TFLOP/s", "MFU", "data-loader stall", "unknown"):
        assert label in text

    with_peak = run_bench(config, steps=2, warmup=1, vae_factor=4, text_dim=32, pooled_dim=32, peak=0.001, profile_attention=False)
    assert with_peak.mfu == pytest.approx(with_peak.tflops / 0.001)


def test_bench_on_a_latent_cache_through_the_cli(components_dir, cache_dir, tmp_path, capsys):
    config = tmp_path / "bench.yaml"
    config.write_text(tiny_config(components_dir).model_dump_json())  # JSON is YAML
    assert main(["bench", "--config", str(config), "--cache", str(cache_dir), "--steps", "3", "--warmup", "1", "--peak-tflops", "0.5", "--set", "data.batch_size=2"]) == 0
    out = capsys.readouterr().out
    assert "images/s" in out and "MFU" in out and "unknown" not in out.split("MFU")[1].splitlines()[0]


def test_peak_table():
    assert peak_for("NVIDIA H100 80GB HBM3") == 989.4
    assert peak_for("NVIDIA H100 PCIe") == 756.0
    assert peak_for("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_for("NVIDIA GeForce GTX 1080") is None


def test_bench_per_bucket(components_dir, tmp_path, capsys):
    import json

    from tests.trainer.conftest import bucket_config

    config = bucket_config(components_dir, data={"num_workers": 0, "batch_size": 4})
    wide = run_bench(config, steps=2, warmup=1, vae_factor=4, text_dim=32, pooled_dim=32, bucket=(48, 24), profile_attention=False)
    assert (wide.width, wide.height, wide.tokens) == (48, 24, 6 * 3)
    assert wide.batch_size == 4 * 16 // 18 == 3  # token-scaled: never more tokens than 4 squares of 16
    assert wide.tokens_per_s == pytest.approx(wide.images_per_s * 18)
    from trainer.train import build_denoiser

    # FLOPs of the 12x6 latent, not of the square.
    assert wide.flops_per_image == 3 * build_denoiser(config, 4, 8, 32, 32).forward_flops(6, 12, config.components.max_text_length)

    file = tmp_path / "bench.yaml"
    file.write_text(config.model_dump_json())
    out_json = tmp_path / "bench.json"
    assert main(["bench", "--config", str(file), "--all-buckets", "--vae-factor", "4", "--text-dim", "32", "--pooled-dim", "32",
                 "--steps", "1", "--warmup", "1", "--no-profile", "--peak-tflops", "1", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    rows = json.loads(out_json.read_text())
    assert [(r["width"], r["height"]) for r in rows] == [(24, 48), (24, 40), (32, 32), (40, 24), (48, 24)]
    assert all(r["tokens_per_s"] > 0 and r["mfu"] is not None for r in rows)
    assert "per bucket" in out and "tokens/s" in out and "48x24" in out

"""End to end: a generated web on 127.0.0.1 through `beam run curate`, checked
row by row against what the corpus says must happen to each row."""

from __future__ import annotations

import collections
import io
import json
import tarfile
from pathlib import Path

import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from pipelines.testing import webcorpus
from pipelines.cli import SCHEMAS_DIR, main
from pipelines.testing.localweb import LocalWeb
from tests.portable import portable_services  # noqa: F401  (fixture)

SAMPLES_PER_SHARD = 5
_CAPTION_REASONS = ("empty_caption", "filename_caption", "boilerplate_caption", "short_caption")


@pytest.fixture(scope="module")
def web():
    with LocalWeb() as server:
        yield server


@pytest.fixture(scope="module")
def corpus(web):
    return webcorpus.build_corpus(web, n_plain=12, seed=7, timeout_delay_s=2.5)


def write_inputs(tmp_path, corpus) -> tuple[str, str]:
    table = pa.Table.from_pylist(corpus.rows)
    pq.write_table(table, tmp_path / "urls.parquet")
    config = {
        "read": {"width_col": "width", "height_col": "height"},
        "crawl": {"timeout_s": 1.0, "retries": 0, "threads": 16},
        "shards": {"samples_per_shard": SAMPLES_PER_SHARD, "writers": 2},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    return str(tmp_path / "urls.parquet"), str(tmp_path / "config.yaml")


def run_curate(tmp_path, corpus, beam_args=()) -> str:
    urls, config = write_inputs(tmp_path, corpus)
    out = str(tmp_path / "out")
    code = main(["run", "curate", "--input", urls, "--output", out, "--config", config, "--allow-private-network", *beam_args])
    assert code == 0
    return out


def check_outputs(out: str, corpus, web) -> None:
    """Every row in exactly one place, and the right one."""
    expected = corpus.expected
    kept_keys = {k for k, e in expected.items() if e.status == "kept"}

    rejects = pq.read_table(f"{out}/rejects.parquet").to_pylist()
    got_rejects = {r["key"]: (r["stage"], r["reason"], r["duplicate_of"]) for r in rejects}
    assert len(got_rejects) == len(rejects), "a row was rejected twice"
    want_rejects = {k: (e.stage, e.reason, e.duplicate_of) for k, e in expected.items() if e.status == "rejected"}
    assert got_rejects == want_rejects

    index = pq.read_table(f"{out}/index.parquet").to_pylist()
    assert sorted(r["key"] for r in index) == sorted(kept_keys)

    schema = json.loads((SCHEMAS_DIR / "sample_record.schema.json").read_text())
    tmp = Path(out) / "shards"
    shard_files = sorted(p for p in tmp.iterdir() if p.suffix == ".tar")
    assert [p.name for p in shard_files] == [f"{i:06d}.tar" for i in range(len(shard_files))]
    in_shards: dict[str, str] = {}
    for shard in shard_files:
        members = collections.defaultdict(dict)
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                members[key][ext] = tar.extractfile(member).read()
        manifest = json.loads((tmp / f"{shard.stem}.json").read_text())
        assert sorted(manifest["keys"]) == sorted(members) and manifest["num_samples"] == len(members)
        assert 1 <= len(members) <= SAMPLES_PER_SHARD
        for key, files in members.items():
            record = json.loads(files["json"])
            jsonschema.validate(record, schema)
            assert record["key"] == key and record["shard"] == shard.name and record["status"] == "kept"
            assert files["txt"].decode() == record["caption"] == record["caption_original"]
            image_ext = next(ext for ext in files if ext not in ("json", "txt"))
            assert image_ext == record["image_format"]
            img = Image.open(io.BytesIO(files[image_ext]))
            assert img.size == (record["width"], record["height"]) and min(img.size) >= 512
            in_shards[key] = shard.name
    assert set(in_shards) == kept_keys
    assert {r["key"]: r["shard"] for r in index} == in_shards
    full = sum(1 for p in shard_files if len(json.loads((tmp / f"{p.stem}.json").read_text())["keys"]) == SAMPLES_PER_SHARD)
    assert full >= len(shard_files) - 2  # only the last batch of each of the 2 writers may be short

    report = json.loads((tmp.parent / "report.json").read_text())
    assert report["input_rows"] == len(corpus.rows) == report["kept"] + report["rejected"]
    assert report["accounting_ok"] and report["kept"] == len(kept_keys) and report["shards"] == len(shard_files)
    funnel = {(row["stage"], row["reason"]): row["count"] for row in report["funnel"]}
    assert funnel == collections.Counter((s, r) for s, r, _ in want_rejects.values())

    # Nothing internal or partial is left visible.
    leftovers = [p.name for p in tmp.parent.rglob("*") if p.name.startswith((".tmp", "_staging")) or p.suffix == ".partial"]
    assert leftovers == []
    config = json.loads((tmp.parent / "config.json").read_text())
    assert config["curate"]["shards"]["samples_per_shard"] == SAMPLES_PER_SHARD

    # Rows rejected on their caption or declared size cost no request.
    never = [
        r["url"].split(web.base_url, 1)[-1]
        for k, r in zip(expected, corpus.rows)
        if expected[k].reason in ("declared_too_small", *_CAPTION_REASONS)
    ]
    assert never and {path: web.requests_to(path) for path in never} == {path: 0 for path in never}


def test_curate_end_to_end_on_direct_runner(tmp_path, corpus, web):
    out = run_curate(tmp_path, corpus)
    check_outputs(out, corpus, web)


@pytest.mark.portable
@pytest.mark.slow
def test_curate_end_to_end_on_portable_runner(tmp_path, corpus, web, portable_services):  # noqa: F811
    """The same run on Beam's portable runner, whose external workers get the
    project only from the sdist staged with --setup_file.

    Slow-marked (about 30 s): the default run covers the same code with
    `test_curate_end_to_end_on_direct_runner` (these checks) and
    `test_curate_with_every_model_stage_on_portable_runner` (the whole curate
    pipeline, crawl to shards, on external workers)."""
    web.reset_counts()
    out = run_curate(tmp_path, corpus, portable_services.argv)
    check_outputs(out, corpus, web)


def test_without_allow_private_network_no_request_reaches_the_server(tmp_path, corpus, web):
    web.reset_counts()
    urls, config = write_inputs(tmp_path, corpus)
    out = tmp_path / "out"
    assert main(["run", "curate", "--input", urls, "--output", str(out), "--config", config]) == 0
    assert web.request_count == 0
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    loopback = [r for r in corpus.rows if r["url"].startswith(web.base_url)]
    private = [r for r in rejects if r["reason"] == "private_address"]
    # Every loopback row that got as far as the crawl was refused there, with its reason.
    reached_crawl = [k for k, e in corpus.expected.items() if e.stage not in ("read", "url", "caption")]
    assert sorted(r["key"] for r in private) == sorted(reached_crawl)
    assert all(r["stage"] == "crawl" for r in private) and len(private) < len(loopback)
    report = json.loads((out / "report.json").read_text())
    assert report["kept"] == 0 and report["input_rows"] == len(corpus.rows) == report["rejected"]


# ---------------------------------------------------------------- with every model stage

MIN_CLIP = 0.3  # the tiny random CLIP scores these images about 0.15 .. 0.55


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from pipelines.testing.models import TINY_CLIP_NAME, save_embedding_head, save_tiny_clip, save_tiny_llava

    root = tmp_path_factory.mktemp("models")
    clip_config, clip_weights = save_tiny_clip(root / "clip", seed=0)
    save_embedding_head(root / "aesthetic.safetensors", [32, 1], seed=1, bias=5.0)
    save_tiny_llava(root / "llava", seed=0)
    return {
        "scoring": {
            "clip": {"model": TINY_CLIP_NAME, "pretrained": str(clip_weights), "model_config_path": str(clip_config)},
            "safety": {},
            "aesthetic": {"head": {"path": str(root / "aesthetic.safetensors"), "output": "identity"}},
            "cpu_threads": 1,
        },
        "select": {"min_clip_similarity": MIN_CLIP, "max_nsfw_score": None},
        "recaption": {"model": str(root / "llava"), "max_new_tokens": 8, "cpu_threads": 1},
    }


def run_curate_with_models(tmp_path, corpus, models, beam_args=()) -> Path:
    urls, config_path = write_inputs(tmp_path, corpus)
    config = yaml.safe_load(Path(config_path).read_text()) | models
    Path(config_path).write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    argv = ["run", "curate", "--input", urls, "--output", str(out), "--config", config_path, "--allow-private-network"]
    assert main([*argv, *beam_args]) == 0
    return out


def check_model_outputs(out: Path, corpus) -> None:
    """Rows the cheap stages drop are exactly as without models; every survivor
    of dedup is scored and then either selected (and recaptioned) or rejected
    by selection with its score."""
    survivors = {k for k, e in corpus.expected.items() if e.status == "kept"}
    rejects = {r["key"]: r for r in pq.read_table(out / "rejects.parquet").to_pylist()}
    for key, expected in corpus.expected.items():
        if expected.status == "rejected":
            assert (rejects[key]["stage"], rejects[key]["reason"]) == (expected.stage, expected.reason)
    selected_out = {k: r for k, r in rejects.items() if r["stage"] == "select"}
    index = {r["key"]: r for r in pq.read_table(out / "index.parquet").to_pylist()}
    assert set(index) | set(selected_out) == survivors and not set(index) & set(selected_out)
    assert index and selected_out, "the thresholds should both keep and drop some samples"
    for key, reject in selected_out.items():
        assert reject["reason"] == "low_clip_similarity" and reject["score"] < MIN_CLIP
    for key, row in index.items():
        assert row["clip_similarity"] >= MIN_CLIP
        assert row["nsfw_score"] is not None and row["aesthetic_score"] is not None
        assert row["recaption_status"] is not None
        assert (row["caption_synthetic"] is not None) == (row["recaption_status"] == "ok")
        assert row["caption"] == (row["caption_synthetic"] or row["caption_original"])
    texts = {}
    for shard in (out / "shards").glob("*.tar"):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".txt"):
                    texts[member.name[:-4]] = tar.extractfile(member).read().decode()
    assert texts == {key: row["caption"] for key, row in index.items()}
    report = json.loads((out / "report.json").read_text())
    assert report["accounting_ok"] and report["input_rows"] == len(corpus.rows)


def test_curate_with_every_model_stage_on_direct_runner(tmp_path, corpus, models):
    check_model_outputs(run_curate_with_models(tmp_path, corpus, models), corpus)


@pytest.mark.portable
def test_curate_with_every_model_stage_on_portable_runner(tmp_path, corpus, models, portable_services):  # noqa: F811
    out = run_curate_with_models(tmp_path, corpus, models, portable_services.argv)
    check_model_outputs(out, corpus)

"""`beam run curate` and `beam run select` with input, config, staging and output
on object storage: moto's S3 server and gcp-storage-emulator on 127.0.0.1
(tests/objstore.py), through Beam's own S3 and GCS file systems, on the local
runner and on the portable runner with external workers.

Each run is compared with the local-disk run of the same corpus: the same
report, index and rejects rows, and every sample's image, caption and record
byte for byte. (Which samples share a shard depends on arrival order, so shard
numbering is compared for consistency, not against the local run.) Nothing but
the final files may be left: no staging, no temporary shards, no open uploads.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipelines.cli import main
from pipelines.testing import webcorpus
from pipelines.testing.localweb import LocalWeb
from schemas import ShardManifest
from stages.core.tario import scan_tar
from tests.objstore import environment
from tests.portable import portable_runner

SAMPLES_PER_SHARD = 3
FINAL_TOP = {"config.json", "index.parquet", "rejects.parquet", "report.json", "run.json", "report.html", "report_files/samples.json"}


@pytest.fixture(scope="module")
def web():
    with LocalWeb() as server:
        yield server


@pytest.fixture(scope="module")
def corpus(web):
    return webcorpus.build_corpus(web, n_plain=6, seed=11, timeout_delay_s=2.5)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, corpus) -> Path:
    root = tmp_path_factory.mktemp("inputs")
    pq.write_table(pa.Table.from_pylist(corpus.rows), root / "urls.parquet")
    config = {
        "read": {"width_col": "width", "height_col": "height"},
        "crawl": {"timeout_s": 1.0, "retries": 0, "threads": 16},
        "shards": {"samples_per_shard": SAMPLES_PER_SHARD, "writers": 2},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    return root


@pytest.fixture(scope="module")
def servers(s3_server, gcs_server):
    """Both object stores (the session's: tests/objstore.py), their client environment
    set for this module (and for the portable runner's workers, which inherit it)."""
    # Not AWS_ENDPOINT_URL: Beam must find the S3 server from --s3_endpoint_url alone,
    # in the launcher and on the workers.
    env = {k: v for k, v in {**s3_server.env, **gcs_server.env}.items() if k != "AWS_ENDPOINT_URL"}
    with environment(env):
        yield {"s3": s3_server, "gcs": gcs_server}


@pytest.fixture(scope="module")
def portable(servers, tmp_path_factory):
    """(pipeline argv, workdir) of a portable runner whose workers inherit the stores' environment."""
    workdir = tmp_path_factory.mktemp("portable")
    with portable_runner(workdir) as argv:
        yield argv, workdir


def _curate(input_url: str, config: str, output: str, beam_args=()) -> None:
    argv = ["run", "curate", "--input", input_url, "--output", output, "--config", config, "--allow-private-network"]
    assert main([*argv, *beam_args]) == 0


def _select(input_dir: str, output: str, beam_args=()) -> None:
    assert main(["run", "select", "--input", input_dir, "--output", output, *beam_args]) == 0


@pytest.fixture(scope="module")
def local_runs(inputs, tmp_path_factory):
    """The reference: the same corpus through curate and select on local disk."""
    root = tmp_path_factory.mktemp("local")
    _curate(str(inputs / "urls.parquet"), str(inputs / "config.yaml"), str(root / "out"))
    _select(str(root / "out"), str(root / "selected"))
    return {"curate": local_files(root / "out"), "select": local_files(root / "selected")}


def local_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def store_files(store, prefix: str) -> dict[str, bytes]:
    return {name[len(prefix) + 1 :]: store.read(name) for name in store.objects(prefix)}


def _portable(row: dict) -> dict:
    """A row without what legitimately differs between two runs from two places: the
    fetch time, and the folder of the input file (its name stays)."""
    row = dict(row)
    row.pop("fetched_at", None)
    if row.get("source_file"):
        row["source_file"] = row["source_file"].rsplit("/", 1)[-1]
    provenance = row.get("provenance")
    if isinstance(provenance, dict):
        row["provenance"] = _portable(provenance)
    return row


def snapshot(files: dict[str, bytes]) -> dict:
    """What must match the local run, with the shard checks that hold on their own."""
    names = set(files)
    shards = sorted(n for n in names if n.startswith("shards/") and n.endswith(".tar"))
    manifests = sorted(n for n in names if n.startswith("shards/") and n.endswith(".json"))
    # Only final files: no _staging/, no shards/.tmp/, no .partial, no Beam temp dirs.
    assert names == FINAL_TOP | set(shards) | set(manifests), sorted(names - FINAL_TOP - set(shards) - set(manifests))
    assert shards == [f"shards/{i:06d}.tar" for i in range(len(shards))]
    assert manifests == [s[:-4] + ".json" for s in shards]

    samples, shard_of = {}, {}
    for shard in shards:
        data = files[shard]
        index = scan_tar(io.BytesIO(data), shard)
        assert not index.truncated
        manifest = ShardManifest.model_validate_json(files[shard[:-4] + ".json"])
        assert manifest.tar_bytes == len(data) and manifest.shard == shard.split("/")[1]
        assert [s.key for s in index.samples] == manifest.keys and 1 <= len(manifest.keys) <= SAMPLES_PER_SHARD
        assert manifest.sha256 == hashlib.sha256(data).hexdigest()
        for sample in index.samples:
            members = {ext: data[o : o + n] for ext, (o, n) in sample.members.items()}
            record = json.loads(members.pop("json"))
            assert record.pop("shard") == manifest.shard
            samples[sample.key] = {**members, "json": _portable(record)}
            shard_of[sample.key] = manifest.shard

    def table(name):
        return pq.read_table(io.BytesIO(files[name])).to_pylist()

    index_rows = [_portable(r) for r in table("index.parquet")]
    assert {r["key"]: r["shard"] for r in index_rows} == shard_of
    for row in index_rows:
        row.pop("shard")
    report = json.loads(files["report.json"])
    assert report["accounting_ok"] and report["shards"] == len(shards)
    return {
        "config": json.loads(files["config.json"])["curate"],
        "report": report,
        "index": sorted(index_rows, key=lambda r: r["key"]),
        "rejects": sorted((_portable(r) for r in table("rejects.parquet")), key=lambda r: r["key"]),
        "samples": samples,
    }


def check_like_local(store, prefix: str, local: dict[str, bytes]) -> None:
    got, want = snapshot(store_files(store, prefix)), snapshot(local)
    for part in ("config", "report", "index", "rejects"):
        if part in ("index", "rejects"):
            assert [r["key"] for r in got[part]] == [r["key"] for r in want[part]], part
            diff = {(r["key"], f) for g, r in zip(got[part], want[part]) for f in r if g[f] != r[f]}
            assert not diff, (part, sorted(diff)[:10])
        assert got[part] == want[part], part
    assert got["samples"].keys() == want["samples"].keys()
    for key, members in want["samples"].items():
        assert got["samples"][key] == members, key
    if store.kind == "s3":
        assert store.open_uploads() == []


RUNS = [
    # Each file system and each runner at least once by default (as measured on 2 cores, with
    # stages/objstore.py's shared S3 client: gcs-direct 14 s + s3-portable 51 s, s3-direct 26 s +
    # gcs-portable 39 s).
    pytest.param("gcs", "direct", id="gcs-direct"),
    pytest.param("s3", "portable", id="s3-portable", marks=pytest.mark.portable),
    # The same code on the other pairings: covered by the two above.
    pytest.param("s3", "direct", id="s3-direct", marks=pytest.mark.slow),
    pytest.param("gcs", "portable", id="gcs-portable", marks=[pytest.mark.slow, pytest.mark.portable]),
]


@pytest.mark.parametrize("kind,runner", RUNS)
def test_curate_and_select_on_object_storage_match_the_local_run(kind, runner, servers, inputs, local_runs, request):
    store = servers[kind]
    beam_args = list(store.beam_args)
    if runner == "portable":
        beam_args += request.getfixturevalue("portable")[0]
    run = f"{kind}-{runner}"
    store.fs.put(str(inputs / "urls.parquet"), f"data/{run}/in/urls.parquet")
    store.fs.put(str(inputs / "config.yaml"), f"data/{run}/in/config.yaml")

    _curate(store.url(f"{run}/in/urls.parquet"), store.url(f"{run}/in/config.yaml"), store.url(f"{run}/out"), beam_args)
    check_like_local(store, f"{run}/out", local_runs["curate"])

    _select(store.url(f"{run}/out"), store.url(f"{run}/selected"), beam_args)
    check_like_local(store, f"{run}/selected", local_runs["select"])


# ---------------------------------------------------------------- a worker killed mid-commit


def _sdk_workers(workdir: Path) -> list[psutil.Process]:
    """The SDK worker processes the portable runner under `workdir` started."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if "apache_beam.runners.worker.sdk_worker_main" in " ".join(process.info["cmdline"] or []):
                if str(workdir) in process.environ().get("TMPDIR", ""):
                    found.append(process)
    return found


@pytest.mark.portable
def test_a_worker_killed_while_committing_a_shard_leaves_no_final_object(inputs, servers, portable):
    """The S3 server holds the upload of the first temporary shard; the SDK workers are
    killed while it is held. The run fails and that shard never appears under its final
    name (nor does any partial object); shards committed before are complete."""
    argv, workdir = portable
    store = servers["s3"]
    with store.holding_uploads() as hold:
        # (the workers get the server from --s3_endpoint_url; credentials come from `servers`' environment)
        store.fs.put(str(inputs / "urls.parquet"), "data/killed/in/urls.parquet")
        outcome = {}

        def launch():
            try:
                outcome["code"] = main(["run", "curate", "--input", store.url("killed/in/urls.parquet"), "--output", store.url("killed/out"),
                                        "--config", str(inputs / "config.yaml"), "--allow-private-network", *store.beam_args, *argv])
            except BaseException as error:  # noqa: BLE001 - the failure is what we expect
                outcome["error"] = error

        launcher = threading.Thread(target=launch, daemon=True)
        launcher.start()
        deadline = time.monotonic() + 240
        while not (hold / "held").exists():
            assert time.monotonic() < deadline and launcher.is_alive(), f"no shard upload was held: {outcome}"
            time.sleep(0.1)
        held = (hold / "held").read_text()  # /data/killed/out/shards/.tmp/NNNNNN.<uuid>.tar
        workers = _sdk_workers(workdir)
        assert workers, "no SDK worker process found"
        for worker in workers:
            os.kill(worker.pid, signal.SIGKILL)
        (hold / "release").write_text("")
        launcher.join(timeout=180)
        assert not launcher.is_alive(), "the job did not end after its workers were killed"
        assert "error" in outcome or outcome.get("code") != 0

        name = held.rsplit("/", 1)[1].split(".")[0]
        objects = store.objects("killed/out")
        assert f"killed/out/shards/{name}.tar" not in objects and f"killed/out/shards/{name}.json" not in objects
        for key in objects:
            if key.startswith("killed/out/shards/") and key.count("/") == 3 and key.endswith(".tar"):
                found = scan_tar(io.BytesIO(store.read(key)), key)
                assert not found.truncated, key
                manifest = f"{key[:-4]}.json"
                if manifest in objects:
                    assert ShardManifest.model_validate_json(store.read(manifest)).tar_bytes == objects[key]


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_a_used_output_prefix_is_refused_and_overwrite_deletes_only_the_runs_objects(kind, servers):
    """On GCS and S3 a "folder" is a prefix that never `exists()`: ownership must
    see the objects under it, and --overwrite must delete them object by object."""
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines import runs

    store = servers[kind]
    FileSystems.set_options(PipelineOptions(store.beam_args))
    out = f"used-{kind}/out"
    for name in ("config.json", "run.json", "shards/000000.tar", "shards/000099.tar", "notes/mine.txt"):
        store.fs.pipe(f"data/{out}/{name}", b"x")

    with pytest.raises(runs.RunRefused, match="not empty"):
        runs.claim_output(store.url(out), overwrite=False, command="curate", details={})
    assert set(store.objects(out)) == {f"{out}/{n}" for n in ("config.json", "run.json", "shards/000000.tar", "shards/000099.tar", "notes/mine.txt")}

    runs.claim_output(store.url(out), overwrite=True, command="curate", details={})
    assert set(store.objects(out)) == {f"{out}/notes/mine.txt", f"{out}/run.json"}
    assert json.loads(store.read(f"{out}/run.json"))["status"] == "running"

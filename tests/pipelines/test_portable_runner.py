"""The same pipeline on the local runner and on Beam's portable runner with an
external worker pool whose workers get the project only from the staged sdist
(see tests/portable.py)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.runners.runner import PipelineState

from pipelines.runner import create_runner, make_pipeline_options
from schemas import RejectReason, Stage
from tests.pipelines import portable_probe
from tests.portable import REPO_ROOT, portable_services, service_logs  # noqa: F401  (fixture)

pytestmark = pytest.mark.portable

N_RECORDS = 30
# A worker that fails to boot never connects, and Beam's job service then waits
# for it forever: give up after this long, with the services' logs.
RUN_TIMEOUT_S = 180


def _run(argv: list[str], out_dir: Path) -> dict:
    """Run the probe pipeline; return its outputs, counters and wall time."""
    portable_probe.ship_by_value()
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = str(out_dir / "out")
    records = portable_probe.sample_records(N_RECORDS)
    options = make_pipeline_options(argv)
    pipeline = beam.Pipeline(runner=create_runner(options), options=options)
    portable_probe.build(pipeline, records, prefix)
    start = time.monotonic()
    result = pipeline.run()
    state = result.wait_until_finish(duration=RUN_TIMEOUT_S * 1000)
    seconds = time.monotonic() - start
    if not PipelineState.is_terminal(state):
        raise TimeoutError(f"pipeline still {state} after {RUN_TIMEOUT_S} s")
    counters = {
        c.key.metric.name: c.committed
        for c in result.metrics().query(MetricsFilter().with_namespace(Stage.CAPTION.value))["counters"]
    }

    def lines(suffix: str) -> list[str]:
        return sorted(Path(f"{prefix}-{suffix}").read_text(encoding="utf-8").splitlines())

    return {
        "state": state,
        "seconds": seconds,
        "records": records,
        "kept": [json.loads(line) for line in lines("kept")],
        "rejects": [json.loads(line) for line in lines("rejects")],
        "probe": [json.loads(line) for line in lines("probe")],
        "counters": counters,
    }


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> dict:
    return _run([], tmp_path_factory.mktemp("local"))


@pytest.fixture(scope="module")
def portable_run(portable_services) -> dict:  # noqa: F811  (fixture imported above)
    try:
        run = _run(portable_services.argv, portable_services.workdir / "output")
    except Exception as exc:  # the services' logs say why a worker failed
        raise AssertionError(f"portable run failed: {exc}\n{service_logs(portable_services.workdir)}") from exc
    print(f"\nportable pipeline run: {run['seconds']:.1f} s")  # reported with -s
    return run


def _expected(records) -> tuple[list[str], list[str]]:
    kept = sorted(r.key for r in records if len(r.caption_original.split()) >= portable_probe.MIN_WORDS)
    dropped = sorted(r.key for r in records if len(r.caption_original.split()) < portable_probe.MIN_WORDS)
    return kept, dropped


def test_portable_run_gives_the_right_output(portable_run):
    assert portable_run["state"] == PipelineState.DONE
    kept, dropped = _expected(portable_run["records"])
    assert kept and dropped  # the data exercises both outputs
    assert [row["key"] for row in portable_run["kept"]] == kept
    assert all(row["caption"] for row in portable_run["kept"])  # set by the DoFn on the worker
    assert sorted(row["key"] for row in portable_run["rejects"]) == dropped
    assert {(row["stage"], row["reason"]) for row in portable_run["rejects"]} == {
        (Stage.CAPTION.value, RejectReason.SHORT_CAPTION.value)
    }
    # Metrics come back from the job service.
    assert portable_run["counters"] == {"kept": len(kept), "dropped_short_caption": len(dropped)}


def test_local_and_portable_runs_agree(local_run, portable_run):
    assert local_run["state"] == PipelineState.DONE
    for output in ("kept", "rejects"):
        assert local_run[output] == portable_run[output], output
    assert local_run["counters"] == portable_run["counters"]


def test_workers_import_the_project_from_the_staged_sdist(local_run, portable_run, portable_services):  # noqa: F811
    (local,) = local_run["probe"]
    (worker,) = portable_run["probe"]
    # The check can tell the two apart: locally the project comes from the checkout.
    assert Path(local["stages_file"]).resolve().is_relative_to(REPO_ROOT)
    assert local["tests_importable"]

    assert worker["pid"] != os.getpid()
    for module in ("stages_file", "schemas_file"):
        path = Path(worker[module]).resolve()
        assert not path.is_relative_to(REPO_ROOT), f"{module} imported from the checkout: {path}"
        # boot.py's private install: TMPDIR/beam-worker-<id>-*/site/<package>/__init__.py
        assert path.is_relative_to((portable_services.workdir / "tmp").resolve()), path
        assert path.parent.parent.name == "site", path
    assert not worker["tests_importable"]
    assert worker["editable_finders"] == []


def test_a_package_left_out_of_the_sdist_fails_on_the_workers(portable_services, tmp_path):  # noqa: F811
    # A copy of the project whose sdist lacks `stages` (as if pyproject's package
    # list had missed it): the launcher still imports it from the checkout, the
    # workers cannot.
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md"):
        (project / name).write_bytes((REPO_ROOT / name).read_bytes())
    for package in ("schemas", "pipelines"):
        shutil.copytree(REPO_ROOT / package, project / package, ignore=shutil.ignore_patterns("__pycache__"))
    argv = [a for a in portable_services.argv if not a.startswith("--setup_file=")]
    argv.append(f"--setup_file={project / 'pyproject.toml'}")
    with pytest.raises(Exception, match="No module named 'stages'"):
        _run(argv, tmp_path / "output")

"""pipelines.runner: the pinned offline local runner and the --setup_file default."""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import SetupOptions
from apache_beam.runners.direct.direct_runner import BundleBasedDirectRunner
from apache_beam.runners.portability import prism_runner
from apache_beam.runners.portability.fn_api_runner.fn_runner import FnApiRunner
from apache_beam.runners.portability.portable_runner import PortableRunner
from apache_beam.testing.util import assert_that, equal_to

from pipelines import runner as runner_module
from pipelines.runner import create_runner, is_local_runner, make_pipeline, make_pipeline_options

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def network_and_prism_calls(monkeypatch) -> list[str]:
    """Record (and refuse) any Prism start or URL download during the test."""
    calls: list[str] = []

    def refuse_prism(self, *args, **kwargs):
        calls.append("prism")
        raise RuntimeError("Prism must not be used")

    def refuse_urlopen(url, *args, **kwargs):
        calls.append(f"urlopen {getattr(url, 'full_url', url)}")
        raise OSError("no network in this test")

    monkeypatch.setattr(prism_runner.PrismRunner, "run_pipeline", refuse_prism)
    monkeypatch.setattr(urllib.request, "urlopen", refuse_urlopen)
    return calls


@pytest.mark.parametrize("argv", [[], ["--runner=DirectRunner"], ["--runner=direct"]])
def test_local_runner_is_fnapi_runner(argv):
    options = make_pipeline_options(argv)
    assert is_local_runner(options)
    runner = create_runner(options)
    assert type(runner) is FnApiRunner
    # Local runs stage nothing.
    assert options.view_as(SetupOptions).setup_file is None


def test_local_run_never_tries_prism_or_the_network(network_and_prism_calls):
    with make_pipeline([]) as pipeline:
        doubled = pipeline | beam.Create([1, 2, 3]) | beam.Map(lambda x: 2 * x)
        assert_that(doubled, equal_to([2, 4, 6]))
    assert network_and_prism_calls == []


def test_plain_direct_runner_would_try_prism(network_and_prism_calls):
    # What the pinned runner avoids (and proof the fixture notices it): Beam's
    # default DirectRunner starts with Prism and falls back when it fails.
    with beam.Pipeline() as pipeline:
        assert_that(pipeline | beam.Create([1]), equal_to([1]))
    assert "prism" in network_and_prism_calls


def test_direct_running_mode_and_num_workers_are_honoured():
    launcher_pid = os.getpid()
    with make_pipeline(["--direct_running_mode=multi_processing", "--direct_num_workers=2"]) as pipeline:
        pids = pipeline | beam.Create(range(4)) | beam.Map(lambda _: os.getpid())
        # The work ran in SDK worker subprocesses, not in this process.
        assert_that(pids | beam.Filter(lambda pid: pid == launcher_pid), equal_to([]))


def test_multi_threading_with_several_workers_is_refused_with_the_modes_that_work():
    with pytest.raises(ValueError, match="multi_threading with more than one worker.*in_memory.*multi_processing"):
        create_runner(make_pipeline_options(["--direct_running_mode=multi_threading", "--direct_num_workers=2"]))


@pytest.mark.parametrize(
    "argv",
    [
        ["--direct_running_mode=multi_threading", "--direct_num_workers=1"],
        ["--direct_running_mode=in_memory"],
        ["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
    ],
)
def test_the_other_local_modes_are_accepted(argv):
    assert isinstance(create_runner(make_pipeline_options(argv)), FnApiRunner)


def test_local_runner_refuses_streaming():
    with pytest.raises(ValueError, match="batch"):
        create_runner(make_pipeline_options(["--streaming"]))


def test_other_runner_names_go_through_beam_lookup():
    assert isinstance(create_runner(make_pipeline_options(["--runner=PortableRunner"])), PortableRunner)
    assert isinstance(create_runner(make_pipeline_options(["--runner=BundleBasedDirectRunner"])), BundleBasedDirectRunner)


def test_remote_runner_stages_the_project_by_default():
    options = make_pipeline_options(["--runner=PortableRunner", "--job_endpoint=localhost:1"])
    assert options.view_as(SetupOptions).setup_file == str(REPO_ROOT / "pyproject.toml")
    # It survives the round trip the options make to the workers.
    assert options.get_all_options()["setup_file"] == str(REPO_ROOT / "pyproject.toml")


def test_given_setup_file_is_made_absolute_and_checked(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    options = make_pipeline_options(["--runner=PortableRunner", "--setup_file=pyproject.toml"])
    assert options.view_as(SetupOptions).setup_file == str(REPO_ROOT / "pyproject.toml")
    with pytest.raises(ValueError, match="no such file"):
        make_pipeline_options(["--runner=PortableRunner", f"--setup_file={tmp_path / 'missing.toml'}"])


def test_non_editable_install_explains_what_to_pass(tmp_path, monkeypatch):
    # As if imported from site-packages: no pyproject.toml beside the package.
    fake = tmp_path / "site-packages" / "pipelines" / "runner.py"
    fake.parent.mkdir(parents=True)
    monkeypatch.setattr(runner_module, "__file__", str(fake))
    assert runner_module.project_setup_file() is None
    with pytest.raises(ValueError, match="--setup_file=/path/to/imagemill/pyproject.toml"):
        make_pipeline_options(["--runner=PortableRunner"])
    # A worker image that has the project installed needs no staging.
    options = make_pipeline_options(["--runner=DataflowRunner", "--sdk_container_image=example/imagemill:1"])
    assert options.view_as(SetupOptions).setup_file is None


def test_project_setup_file_ignores_other_projects(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "someone-else"\n')
    fake = tmp_path / "pipelines" / "runner.py"
    fake.parent.mkdir()
    monkeypatch.setattr(runner_module, "__file__", str(fake))
    assert runner_module.project_setup_file() is None
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "imagemill"\n')
    assert runner_module.project_setup_file() == tmp_path / "pyproject.toml"

"""Beam's portable runner on this machine, with workers that cannot see the checkout.

`portable_runner(workdir)` starts, as subprocesses,

- Beam's Python job service (`apache_beam.runners.portability.local_job_service_main`),
- Beam's worker pool (`apache_beam.runners.worker.worker_pool_main`) with
  `--container_executable=infra/beam/boot.py`, so every SDK worker is booted the
  way a worker container is: it retrieves the artifacts the launcher staged and
  pip-installs the project's sdist (built from `--setup_file`) privately,

and yields the pipeline argv that runs a pipeline there.

Both services run in a "worker env": a venv made on the spot (about a second)
whose site-packages points at the test interpreter's site-packages, minus the
editable install of the project (its `__editable__*.pth` is what would put the
checkout on sys.path), started from a directory outside the checkout without
PYTHONPATH. So a worker can import apache_beam, pydantic, torch... but it gets
`stages`, `schemas`, `pipelines` only from the staged sdist: a module missing
from the package fails here as it would on Dataflow or Flink.

Services log to files under `workdir` (`job_service.log`, `worker_pool.log`,
which holds the boot program's and the SDK workers' stderr);
`ServiceError`s quote their tails.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import venv
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
BOOT = REPO_ROOT / "infra" / "beam" / "boot.py"
SETUP_FILE = REPO_ROOT / "pyproject.toml"
PROJECT_PACKAGES = ("pipelines", "schemas", "stages", "trainer")

STARTUP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0


class ServiceError(RuntimeError):
    """A job service or worker pool failed to start; the message holds its log tail."""


def _log_tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-chars:]
    except OSError:
        return "<no log>"


def _is_editable_hook(pth: Path) -> bool:
    """A .pth file that would put this checkout on sys.path (setuptools' editable
    finder, or a plain path line pointing into the checkout)."""
    if pth.name.startswith("__editable__"):
        return True
    try:
        text = pth.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return str(REPO_ROOT) in text


def make_worker_env(env_dir: Path) -> Path:
    """Create the worker venv in `env_dir`; return its python.

    Its site-packages gets one .pth listing the test interpreter's site-packages
    directories as plain paths (so their own .pth files are not run) and copies
    of those .pth files except the editable-install hooks.
    """
    python = env_dir / "bin" / "python"
    if python.exists():
        return python
    venv.EnvBuilder(with_pip=False, symlinks=True, clear=True).create(env_dir)
    site_dir = Path(sysconfig.get_path("purelib", vars={"base": str(env_dir), "platbase": str(env_dir)}))
    source_dirs: list[Path] = []
    for key in ("purelib", "platlib"):
        path = Path(sysconfig.get_path(key))
        if path.is_dir() and path not in source_dirs:
            source_dirs.append(path)
    # "000-" sorts first, so the copied .pth files below can import from these dirs.
    (site_dir / "000-imagemill-worker-deps.pth").write_text("".join(f"{d}\n" for d in source_dirs), encoding="utf-8")
    for directory in source_dirs:
        for pth in sorted(directory.glob("*.pth")):
            # `*-nspkg.pth` (google-cloud-*'s namespace hooks) look up their package relative
            # to the site dir they sit in and fail from here; Python 3 finds namespace
            # packages without them.
            if not _is_editable_hook(pth) and not pth.name.endswith("-nspkg.pth"):
                (site_dir / pth.name).write_text(pth.read_text(encoding="utf-8"), encoding="utf-8")
    return python


def _service_env(worker_env: Path, tmp_dir: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONSAFEPATH", "VIRTUAL_ENV", "__PYVENV_LAUNCHER__")
    }
    env["VIRTUAL_ENV"] = str(worker_env)
    # boot.py's shebang (`/usr/bin/env python3`) finds the worker env's python.
    env["PATH"] = os.pathsep.join([str(worker_env / "bin"), env.get("PATH", "")])
    # Per-worker directories (staged artifacts, the private install) land here.
    env["TMPDIR"] = str(tmp_dir)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _check_isolated(python: Path, env: dict[str, str], cwd: Path) -> None:
    probe = (
        "import importlib.util, sys; "
        f"leaks = [m for m in {PROJECT_PACKAGES!r} if importlib.util.find_spec(m)]; "
        "assert importlib.util.find_spec('apache_beam'), 'apache_beam missing'; "
        "sys.exit('project importable in the worker env: %s' % leaks if leaks else 0)"
    )
    done = subprocess.run([str(python), "-c", probe], env=env, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise ServiceError(f"worker env {python} is not isolated from the checkout: {done.stderr.strip()}")


def _start(command: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:  # fresh: the pool's port is read from its log
        # Own process group: teardown stops the service and every worker it started.
        return subprocess.Popen(
            command, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _wait_for_port(
    name: str, process: subprocess.Popen, read_port: Callable[[], int | None], log: Path, timeout_s: float
) -> int:
    """Wait until the service reports the port it bound (it binds port 0, so no
    other process can hold it) and accepts connections there; return the port."""
    deadline = time.monotonic() + timeout_s
    port = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServiceError(f"{name} exited with code {process.returncode}; its log:\n{_log_tail(log)}")
        port = port or read_port()
        if port:
            with contextlib.suppress(OSError), socket.create_connection(("localhost", port), timeout=1):
                return port
        time.sleep(0.2)
    raise ServiceError(f"{name} was not serving (port {port}) within {timeout_s:.0f} s; its log:\n{_log_tail(log)}")


def _port_from_file(path: Path) -> Callable[[], int | None]:
    def read() -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int(path.read_text().strip())
        return None

    return read


# worker_pool_main's start-up line (Beam 2.77): "Started worker pool servicer at port: localhost:PORT ..."
_POOL_PORT = re.compile(r"Started worker pool servicer at port: \S+?:(\d+)")


def _port_from_log(path: Path) -> Callable[[], int | None]:
    def read() -> int | None:
        match = _POOL_PORT.search(_log_tail(path, 100_000))
        return int(match.group(1)) if match else None

    return read


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the process group, SIGKILL it if still there, and reap the leader."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
    # Workers may outlive the leader; the group id is the leader's pid.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=STOP_TIMEOUT_S)


# Beam's Python job service runs every job with one SDK worker (it builds its
# FnApiRunner without reading direct_num_workers); with `workers > 1` it is
# started with its runner set to that many, all booted by the same external pool.
_JOB_SERVICE_WITH_WORKERS = """
import sys
from apache_beam.runners.portability import local_job_service, local_job_service_main
from apache_beam.runners.portability.fn_api_runner import fn_runner

workers = int(sys.argv.pop(1))


def invoke(job):
    job.set_state(local_job_service.beam_job_api_pb2.JobState.RUNNING)
    runner = fn_runner.FnApiRunner(provision_info=job._provision_info)
    runner._num_workers = workers
    return runner.run_via_runner_api(job._pipeline_proto, job.pipeline_options())


local_job_service.BeamJob._invoke_runner = invoke
local_job_service_main.run(sys.argv[1:])
"""


@contextlib.contextmanager
def portable_runner(workdir: Path, startup_timeout_s: float = STARTUP_TIMEOUT_S, workers: int = 1) -> Iterator[list[str]]:
    """Run a job service and an external worker pool; yield the pipeline argv.
    `workers`: SDK worker processes per job (the pool boots each).

    The argv: `--runner=PortableRunner --job_endpoint=localhost:P1
    --environment_type=EXTERNAL --environment_config=localhost:P2
    --sdk_worker_parallelism=1 --setup_file=<checkout>/pyproject.toml`.
    Workers run on this machine, so local input and output paths work if they
    are absolute (workers run in their own working directory). The services are
    stopped and reaped on exit, also when the body raises.
    """
    if not os.access(BOOT, os.X_OK):
        raise ServiceError(f"{BOOT} must be executable (git mode 100755): the worker pool runs it directly")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    worker_env = workdir / "worker-env"
    python = make_worker_env(worker_env)
    run_dir, tmp_dir = workdir / "run", workdir / "tmp"
    run_dir.mkdir(exist_ok=True)
    tmp_dir.mkdir(exist_ok=True)
    env = _service_env(worker_env, tmp_dir)
    _check_isolated(python, env, run_dir)

    job_log, pool_log = workdir / "job_service.log", workdir / "worker_pool.log"
    job_port_file = workdir / "job_service.port"
    processes: list[subprocess.Popen] = []
    try:
        job_flags = ["--port=0", f"--port_file={job_port_file}", f"--staging_dir={workdir / 'staging'}"]
        if workers > 1:
            job_command = [str(python), "-c", _JOB_SERVICE_WITH_WORKERS, str(workers), *job_flags]
        else:
            job_command = [str(python), "-m", "apache_beam.runners.portability.local_job_service_main", *job_flags]
        processes.append(_start(job_command, env, run_dir, job_log))
        processes.append(
            _start(
                # The pool announces its port with logging.info; whether the root logger
                # has a handler then depends on what the installed packages configure on
                # import, so give it one.
                [str(python), "-c",
                 "import logging, sys; logging.basicConfig(level=logging.INFO); "
                 "from apache_beam.runners.worker import worker_pool_main; worker_pool_main.main(sys.argv)",
                 "--service_port=0", f"--container_executable={BOOT}"],
                env, run_dir, pool_log,
            )
        )
        job_port = _wait_for_port(
            "job service", processes[0], _port_from_file(job_port_file), job_log, startup_timeout_s
        )
        pool_port = _wait_for_port("worker pool", processes[1], _port_from_log(pool_log), pool_log, startup_timeout_s)
        yield [
            "--runner=PortableRunner",
            f"--job_endpoint=localhost:{job_port}",
            "--environment_type=EXTERNAL",
            f"--environment_config=localhost:{pool_port}",
            "--sdk_worker_parallelism=1",
            f"--setup_file={SETUP_FILE}",
        ]
    finally:
        for process in reversed(processes):
            _stop(process)


class PortableServices(NamedTuple):
    argv: list[str]
    workdir: Path


@pytest.fixture(scope="module")
def portable_services(tmp_path_factory) -> Iterator[PortableServices]:
    """`portable_runner` for one test module (starting it takes a few seconds).
    Import it into the test module: `from tests.portable import portable_services`."""
    workdir = tmp_path_factory.mktemp("portable")
    with portable_runner(workdir) as argv:
        yield PortableServices(argv, workdir)


def service_logs(workdir: Path) -> str:
    """The tails of both services' logs, for assertion messages."""
    workdir = Path(workdir)
    return "\n".join(
        f"--- {name} ---\n{_log_tail(workdir / name)}" for name in ("job_service.log", "worker_pool.log")
    )


__all__ = [
    "BOOT",
    "REPO_ROOT",
    "SETUP_FILE",
    "PortableServices",
    "ServiceError",
    "make_worker_env",
    "portable_runner",
    "portable_services",
    "service_logs",
]

if __name__ == "__main__":  # pragma: no cover - manual use: python -m tests.portable DIR
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "portable-runner")
    with portable_runner(target) as argv:
        print(" ".join(argv), flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()

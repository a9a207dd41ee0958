#!/usr/bin/env python3
"""Boot program for Beam Python SDK workers: the Python counterpart of the SDK
container's `boot` (sdks/python/container/boot.go), for environments that run a
command instead of a container:

- `python -m apache_beam.runners.worker.worker_pool_main --service_port=PORT
  --container_executable=/path/to/boot.py` (EXTERNAL environment: the Flink
  sidecar in infra/flink/, the portable-runner test in tests/portable.py);
- `--environment_type=PROCESS --environment_config='{"command": "/path/to/boot.py"}'`
  on the Flink/Spark job servers.

Either way it is started as

    boot.py --id=ID --provision_endpoint=HOST:PORT [--logging_endpoint=...]
            [--artifact_endpoint=...] [--control_endpoint=...] [--semi_persist_dir=DIR]

and then, like boot.go:

1. fetches the provision info (pipeline options, staged dependencies, endpoints)
   from the provision service, sending the worker id as `worker_id` metadata;
2. retrieves every staged artifact through the artifact retrieval service into
   `WORKDIR/staged/` (WORKDIR is a fresh directory per worker under
   `--semi_persist_dir`, default: the system temp dir, so concurrent workers of
   one pool never share or race on files);
3. installs them with pip into the private directory `WORKDIR/site`, which is put
   FIRST on the workers' PYTHONPATH: requirements files (`--requirements_file`)
   from the staged package cache with `--no-index --find-links`, then a staged
   SDK (`--sdk_location`), `--extra_package`s and the `--setup_file` sdist
   (`workflow.tar.gz`) with `--no-deps --no-index --no-build-isolation`. Nothing
   is downloaded: the dependencies of the project must already be in the worker's
   Python (the image from infra/docker/Dockerfile has them), or be staged;
4. starts `python -m apache_beam.runners.worker.sdk_worker_main` (with the same
   interpreter that runs this script) once per worker id (the id given plus the
   provision info's sibling ids), with the environment sdk_worker_main reads:
   WORKER_ID, PIPELINE_OPTIONS_FILE, SEMI_PERSISTENT_DIRECTORY,
   LOGGING_API_SERVICE_DESCRIPTOR, CONTROL_API_SERVICE_DESCRIPTOR,
   STATUS_API_SERVICE_DESCRIPTOR, RUNNER_CAPABILITIES, JOB_NAME, JOB_ID;
5. waits for them, forwards SIGTERM/SIGINT to them, and deletes WORKDIR when they
   exit (set BEAM_BOOT_KEEP_WORKDIR=1 to keep it for debugging).

Output: Beam's worker pool gives this program a stdout pipe that nobody reads,
so a worker that prints a lot would block forever. Everything here logs to
stderr, pip's output is captured, and the SDK workers' stdout is redirected to
stderr. This program's own log lines also go to the runner's logging endpoint
when one is given, so a failed install shows up in the job's log.

This is a script, not importable project code: it needs only apache-beam and
pip in the Python that runs it.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

_LOGGER = logging.getLogger("imagemill.boot")

# Names Beam's stager gives staged files (apache_beam/runners/portability/stager.py).
WORKFLOW_FILE = "workflow.tar.gz"
REQUIREMENTS_FILE = "requirements.txt"
EXTRA_PACKAGES_FILE = "extra_packages.txt"
SDK_FILE = "dataflow_python_sdk.tar"
SUBMISSION_ENV_FILE = "submission_environment_dependencies.txt"

SDK_HARNESS_MODULE = "apache_beam.runners.worker.sdk_worker_main"
KEEP_WORKDIR_ENV = "BEAM_BOOT_KEEP_WORKDIR"


class BootError(RuntimeError):
    """A step of the boot sequence failed; the message says which and why."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--id", required=True, help="Worker id given by the runner.")
    parser.add_argument("--provision_endpoint", required=True)
    parser.add_argument("--logging_endpoint", default="")
    parser.add_argument("--artifact_endpoint", default="")
    parser.add_argument("--control_endpoint", default="")
    parser.add_argument(
        "--semi_persist_dir", default=None, help="Parent of the per-worker directory (default: system temp dir)."
    )
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        _LOGGER.warning("Ignoring unknown arguments: %s", unknown)
    return args


def fetch_provision_info(endpoint: str, worker_id: str):
    import grpc
    from apache_beam.portability.api import beam_provision_api_pb2, beam_provision_api_pb2_grpc

    with grpc.insecure_channel(endpoint) as channel:
        stub = beam_provision_api_pb2_grpc.ProvisionServiceStub(channel)
        response = stub.GetProvisionInfo(
            beam_provision_api_pb2.GetProvisionInfoRequest(), metadata=[("worker_id", worker_id)], timeout=120
        )
    return response.info


def _staged_name(artifact, index: int) -> tuple[str, bool]:
    """(file name under staged/, is_requirements_file) for one dependency."""
    from apache_beam.portability import common_urns
    from apache_beam.portability.api import beam_runner_api_pb2

    if artifact.role_urn == common_urns.artifact_roles.STAGING_TO.urn:
        payload = beam_runner_api_pb2.ArtifactStagingToRolePayload()
        payload.ParseFromString(artifact.role_payload)
        name = payload.staged_name
        if not name or name != os.path.basename(name) or name in (".", ".."):
            raise BootError(f"refusing staged artifact name {name!r}: it must be a plain file name")
        return name, False
    if artifact.role_urn == common_urns.artifact_roles.PIP_REQUIREMENTS_FILE.urn:
        return f"requirements-{index}.txt", True
    raise BootError(f"artifact {index} has role {artifact.role_urn!r}, which this boot program cannot place")


def retrieve_artifacts(endpoint: str, worker_id: str, dependencies, staged_dir: Path) -> tuple[list[str], list[str]]:
    """Write every dependency to `staged_dir`; return (staged names, requirements files)."""
    import grpc
    from apache_beam.portability.api import beam_artifact_api_pb2, beam_artifact_api_pb2_grpc

    staged_dir.mkdir(parents=True, exist_ok=True)
    if not dependencies:
        return [], []
    metadata = [("worker_id", worker_id)]
    names: list[str] = []
    requirements: list[str] = []
    with grpc.insecure_channel(
        endpoint, options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
    ) as channel:
        stub = beam_artifact_api_pb2_grpc.ArtifactRetrievalServiceStub(channel)
        resolved = stub.ResolveArtifacts(
            beam_artifact_api_pb2.ResolveArtifactsRequest(artifacts=list(dependencies)), metadata=metadata, timeout=120
        ).replacements
        for index, artifact in enumerate(resolved):
            name, is_requirements = _staged_name(artifact, index)
            target = staged_dir / name
            size = 0
            with open(target, "wb") as out:
                for chunk in stub.GetArtifact(
                    beam_artifact_api_pb2.GetArtifactRequest(artifact=artifact), metadata=metadata
                ):
                    out.write(chunk.data)
                    size += len(chunk.data)
            _LOGGER.info("Retrieved artifact %s (%d bytes)", name, size)
            names.append(name)
            if is_requirements:
                requirements.append(name)
    return names, requirements


def _pip(args: list[str], what: str) -> None:
    command = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-cache-dir", "--no-input"]
    command += args
    _LOGGER.info("Installing %s: %s", what, " ".join(command))
    # Capture pip's output (it writes a lot to stdout) and log it; never let it
    # reach our stdout, which nobody reads.
    done = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        raise BootError(f"pip failed ({done.returncode}) installing {what}:\n{done.stdout[-8000:]}")
    _LOGGER.debug("pip output for %s:\n%s", what, done.stdout)


def install_staged(staged_dir: Path, names: list[str], requirements: list[str], site_dir: Path) -> None:
    """pip-install the staged files into `site_dir`, in boot.go's order."""
    site_dir.mkdir(parents=True, exist_ok=True)
    present = set(names)
    target = ["--target", str(site_dir)]

    requirement_files = ([REQUIREMENTS_FILE] if REQUIREMENTS_FILE in present else []) + requirements
    for name in requirement_files:
        # The stager downloads the requirements' distributions next to the file.
        _pip(
            [*target, "--upgrade", "--no-index", "--no-build-isolation", "--find-links", str(staged_dir), "-r",
             str(staged_dir / name)],
            f"requirements from {name}",
        )

    packages: list[str] = []
    if SDK_FILE in present:
        packages.append(SDK_FILE)
    if EXTRA_PACKAGES_FILE in present:
        listed = (staged_dir / EXTRA_PACKAGES_FILE).read_text(encoding="utf-8").split()
        missing = [p for p in listed if p not in present]
        if missing:
            raise BootError(f"{EXTRA_PACKAGES_FILE} lists packages that were not staged: {missing}")
        packages += listed
    if WORKFLOW_FILE in present:
        packages.append(WORKFLOW_FILE)
    if packages:
        _pip(
            [*target, "--upgrade", "--no-deps", "--no-index", "--no-build-isolation",
             *(str(staged_dir / p) for p in packages)],
            ", ".join(packages),
        )
    else:
        _LOGGER.info("No packages were staged (no --setup_file, --extra_package or --sdk_location)")


def _descriptor(url: str) -> str:
    from apache_beam.portability.api import endpoints_pb2
    from google.protobuf import text_format

    return text_format.MessageToString(endpoints_pb2.ApiServiceDescriptor(url=url))


def worker_environment(info, args: argparse.Namespace, workdir: Path, site_dir: Path) -> dict[str, str]:
    """The environment sdk_worker_main reads (see its create_harness)."""
    from google.protobuf import json_format
    from google.protobuf import text_format

    options_file = workdir / "pipeline_options.json"
    # Through a file, not a variable: large option sets exceed the argument limit.
    options_file.write_text(json_format.MessageToJson(info.pipeline_options), encoding="utf-8")

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site_dir), env.get("PYTHONPATH", "")) if p)
    env["PIPELINE_OPTIONS_FILE"] = str(options_file)
    env.pop("PIPELINE_OPTIONS", None)
    env["SEMI_PERSISTENT_DIRECTORY"] = str(workdir)
    logging_url = info.logging_endpoint.url or args.logging_endpoint
    if logging_url:
        env["LOGGING_API_SERVICE_DESCRIPTOR"] = _descriptor(logging_url)
    env["CONTROL_API_SERVICE_DESCRIPTOR"] = _descriptor(info.control_endpoint.url or args.control_endpoint)
    env["RUNNER_CAPABILITIES"] = " ".join(info.runner_capabilities)
    if info.HasField("status_endpoint") and info.status_endpoint.url:
        env["STATUS_API_SERVICE_DESCRIPTOR"] = text_format.MessageToString(info.status_endpoint)
    if "job_name" in info.metadata:
        env["JOB_NAME"] = info.metadata["job_name"]
    if "job_id" in info.metadata:
        env["JOB_ID"] = info.metadata["job_id"]
    return env


def run_workers(worker_ids: list[str], env: dict[str, str], cwd: Path) -> int:
    """Start one SDK harness per id, forward termination signals, wait for all."""
    children: list[subprocess.Popen] = []

    def forward(signum, _frame):
        _LOGGER.info("Received signal %d; stopping %d SDK worker(s)", signum, len(children))
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for worker_id in worker_ids:
        _LOGGER.info("Starting SDK worker %s: %s -m %s", worker_id, sys.executable, SDK_HARNESS_MODULE)
        children.append(
            subprocess.Popen(
                [sys.executable, "-m", SDK_HARNESS_MODULE],
                env={**env, "WORKER_ID": worker_id},
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=sys.stderr.fileno(),  # nobody reads our stdout
            )
        )
    worst = 0
    for worker_id, child in zip(worker_ids, children):
        code = child.wait()
        if code != 0:
            _LOGGER.warning("SDK worker %s exited with code %d", worker_id, code)
            worst = worst or code
        else:
            _LOGGER.info("SDK worker %s exited", worker_id)
    return worst


def _attach_runner_logging(url: str):
    """Also send this program's log lines to the runner's logging service."""
    if not url:
        return None
    try:
        from apache_beam.portability.api import endpoints_pb2
        from apache_beam.runners.worker.log_handler import FnApiLogRecordHandler

        handler = FnApiLogRecordHandler(endpoints_pb2.ApiServiceDescriptor(url=url))
    except Exception:  # the worker can still run; stderr has the lines
        _LOGGER.warning("Cannot reach the logging endpoint %s; logging to stderr only", url, exc_info=True)
        return None
    handler.setLevel(logging.INFO)
    logging.getLogger().addHandler(handler)
    return handler


def main(argv: list[str]) -> int:
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s boot[%(process)d] %(levelname)s %(message)s"
    )
    args = parse_args(argv)
    # The SDK's gRPC interceptor reads WORKER_ID when first imported.
    os.environ["WORKER_ID"] = args.id
    _LOGGER.info("Booting Python SDK worker %s (python %s)", args.id, sys.executable)

    info = fetch_provision_info(args.provision_endpoint, args.id)
    log_handler = _attach_runner_logging(info.logging_endpoint.url or args.logging_endpoint)
    artifact_endpoint = info.artifact_endpoint.url or args.artifact_endpoint
    control_endpoint = info.control_endpoint.url or args.control_endpoint
    if not control_endpoint:
        raise BootError("no control endpoint: neither --control_endpoint nor the provision info has one")
    if info.dependencies and not artifact_endpoint:
        raise BootError("dependencies are staged but there is no artifact endpoint to retrieve them from")

    parent = Path(args.semi_persist_dir) if args.semi_persist_dir else None
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f"beam-worker-{args.id}-", dir=parent))
    try:
        staged_dir, site_dir = workdir / "staged", workdir / "site"
        names, requirements = retrieve_artifacts(artifact_endpoint, args.id, info.dependencies, staged_dir)
        if SUBMISSION_ENV_FILE in names:
            _LOGGER.debug(
                "Submission environment:\n%s", (staged_dir / SUBMISSION_ENV_FILE).read_text(encoding="utf-8")
            )
        install_staged(staged_dir, names, requirements, site_dir)
        env = worker_environment(info, args, workdir, site_dir)
        env["CONTROL_API_SERVICE_DESCRIPTOR"] = _descriptor(control_endpoint)
        if log_handler is not None:
            log_handler.close()
            logging.getLogger().removeHandler(log_handler)
            log_handler = None
        return run_workers([args.id, *info.sibling_worker_ids], env, cwd=workdir)
    except BootError:
        _LOGGER.exception("Worker %s failed to boot", args.id)
        return 1
    finally:
        if log_handler is not None:
            log_handler.close()
        if os.environ.get(KEEP_WORKDIR_ENV):
            _LOGGER.info("Keeping %s (%s is set)", workdir, KEEP_WORKDIR_ENV)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Object storage servers on 127.0.0.1 for the tests: moto's S3 server and
gcp-storage-emulator (GCS's JSON API), each in its own process.

    with object_store("s3", workdir) as store:      # or "gcs"
        store.env          # environment for clients (boto3, s3fs, gcsfs, Beam's file systems)
        store.beam_args    # Beam pipeline options (S3: --s3_endpoint_url ...)
        store.url("data/out")   # "s3://data/out" or "gs://data/out"
        store.fs           # an fsspec file system on the server (listing, checks)

Servers bind port 0 and report the port they got, so nothing else on the
machine can hold it. Each is stopped (and its process group killed) on exit.

Starting a server costs seconds, so the suite shares one of each: the
session-scoped fixtures `s3_server` and `gcs_server` (registered in
tests/conftest.py). They set no environment variables; a test or module enters
`environment(store.env)` itself, and keeps to its own key prefixes in the
shared bucket.

GCS credentials: Beam's GCS file system asks google-auth for application
default credentials and, when there are none, retries for about 30 s before
going anonymous (in every worker process). `env` therefore points
GOOGLE_APPLICATION_CREDENTIALS at an `authorized_user` file holding an access
token that expires in 2100, so google-auth finds credentials at once and never
asks a token endpoint.

Fault injection (S3 only): inside `with store.holding_uploads() as folder:`,
the server holds every request that completes an upload
(`CompleteMultipartUpload`, or a plain PUT) of a key containing `/.tmp/`,
writes `folder/held` with the key, and answers only once `folder/release`
exists (or the block has ended). A test can then kill the workers while a shard
is being committed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # gcsfs would ask a gRPC control API the emulator lacks
REPO_ROOT = Path(__file__).resolve().parent.parent
BUCKET = "data"
STARTUP_TIMEOUT_S = 60.0
HOLD_DIR = "hold"  # under an S3 server's workdir: the fault-injection switch (ObjectStore.holding_uploads)


@dataclasses.dataclass
class ObjectStore:
    kind: str  # "s3" | "gcs"
    endpoint: str  # http://127.0.0.1:PORT
    env: dict[str, str]
    beam_args: list[str]
    workdir: Path

    @property
    def scheme(self) -> str:
        return "s3" if self.kind == "s3" else "gs"

    def url(self, path: str = "") -> str:
        return f"{self.scheme}://{BUCKET}/{path}".rstrip("/")

    @property
    def fs(self):
        """An fsspec file system on this server (fresh, uncached: it sees what is there now)."""
        import fsspec

        if self.kind == "s3":
            return fsspec.filesystem(
                "s3", skip_instance_cache=True, use_listings_cache=False, key="testing", secret="testing",
                client_kwargs={"endpoint_url": self.endpoint, "region_name": "us-east-1"},
            )
        return fsspec.filesystem("gs", skip_instance_cache=True, token="anon", project="test", endpoint_url=self.endpoint)

    def objects(self, prefix: str = "") -> dict[str, int]:
        """{key under the bucket: size} of every object under `prefix` (keys relative to the bucket)."""
        fs = self.fs
        root = f"{BUCKET}/{prefix}".rstrip("/")
        try:
            found = fs.find(root, detail=True)
        except FileNotFoundError:
            return {}
        return {name.split("/", 1)[1]: info["size"] for name, info in found.items()}

    def read(self, path: str) -> bytes:
        with self.fs.open(f"{BUCKET}/{path}", "rb") as f:
            return f.read()

    def s3_client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing")

    @contextlib.contextmanager
    def holding_uploads(self) -> Iterator[Path]:
        """S3 only: hold upload-completing requests of `/.tmp/` keys for the block
        (see the module doc); yields the folder where `held` appears and `release`
        is to be written. On exit every held request is let through."""
        if self.kind != "s3":
            raise ValueError("holding uploads needs the S3 server")
        folder = self.workdir / HOLD_DIR
        for name in ("held", "release"):
            (folder / name).unlink(missing_ok=True)
        (folder / "armed").write_text("")
        try:
            yield folder
        finally:
            (folder / "armed").unlink(missing_ok=True)

    def open_uploads(self) -> list[str]:
        """Keys of S3 multipart uploads that were started and never completed or aborted."""
        return [u["Key"] for u in self.s3_client().list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])]


def _wait_for_port_file(process: subprocess.Popen, path: Path, log: Path) -> int:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"object store server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError, ValueError):
            return int(path.read_text().strip())
        time.sleep(0.1)
    raise RuntimeError(f"object store server did not start within {STARTUP_TIMEOUT_S:.0f} s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def object_store(kind: str, workdir: Path) -> Iterator[ObjectStore]:
    """Start the server for `kind` ("s3" or "gcs") with bucket `data`; yield an ObjectStore."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    port_file, log = workdir / f"{kind}.port", workdir / f"{kind}.log"
    port_file.unlink(missing_ok=True)  # a reused workdir must not hand out an old port
    command = [sys.executable, "-m", "tests.objstore", kind, str(port_file)]
    if kind == "s3":
        (workdir / HOLD_DIR).mkdir(exist_ok=True)
        (workdir / HOLD_DIR / "armed").unlink(missing_ok=True)
        command += ["--hold", str(workdir / HOLD_DIR)]
    env = {k: v for k, v in os.environ.items() if k not in ("STORAGE_EMULATOR_HOST",)}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        port = _wait_for_port_file(process, port_file, log)
        endpoint = f"http://127.0.0.1:{port}"
        if kind == "s3":
            client_env = {
                "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_ENDPOINT_URL": endpoint,  # boto3 and s3fs (the trainer's fsspec reads)
                "AWS_EC2_METADATA_DISABLED": "true",
            }
            beam_args = [f"--s3_endpoint_url={endpoint}", "--s3_region_name=us-east-1"]
        else:
            credentials = workdir / "gcs-credentials.json"
            credentials.write_text(json.dumps({
                "type": "authorized_user", "client_id": "test", "client_secret": "test", "refresh_token": "test",
                # A token valid for a long time: google-auth never needs to refresh it.
                "token": "test-token", "expiry": "2100-01-01T00:00:00Z",
            }))
            client_env = {
                "STORAGE_EMULATOR_HOST": endpoint,
                "GOOGLE_APPLICATION_CREDENTIALS": str(credentials),
                "GOOGLE_CLOUD_PROJECT": "test",
                "NO_GCE_CHECK": "true",
            }
            beam_args = []
        store = ObjectStore(kind, endpoint, client_env, beam_args, workdir)
        if kind == "s3":
            store.s3_client().create_bucket(Bucket=BUCKET)
        else:
            store.fs.mkdir(BUCKET)
        yield store
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[ObjectStore]:
    """moto's S3 server for the whole test session (no environment set: see the module doc)."""
    with object_store("s3", tmp_path_factory.mktemp("s3-server")) as store:
        yield store


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory) -> Iterator[ObjectStore]:
    """gcp-storage-emulator for the whole test session (no environment set: see the module doc)."""
    with object_store("gcs", tmp_path_factory.mktemp("gcs-server")) as store:
        yield store


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the block (this process and the children it starts)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ---------------------------------------------------------------- the server processes


class _Hold:
    """WSGI middleware: while `DIR/armed` exists, holds upload-completing requests of
    `/.tmp/` keys until `DIR/release` exists or `armed` is gone (see module doc)."""

    def __init__(self, app, directory: Path):
        self.app = app
        self.directory = Path(directory)

    def __call__(self, environ, start_response):
        path, query, method = environ.get("PATH_INFO", ""), environ.get("QUERY_STRING", ""), environ["REQUEST_METHOD"]
        completes = (method == "POST" and "uploadId=" in query) or (method == "PUT" and "partNumber=" not in query and "uploadId=" not in query)
        armed = self.directory / "armed"
        if completes and "/.tmp/" in path and armed.exists():
            (self.directory / "held").write_text(path)
            while armed.exists() and not (self.directory / "release").exists():
                time.sleep(0.05)
        return self.app(environ, start_response)


def _serve_s3(port_file: Path, hold: Path | None) -> None:
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    app = DomainDispatcherApplication(create_backend_app)
    if hold is not None:
        app = _Hold(app, hold)
    httpd = make_server("127.0.0.1", 0, app, threaded=True, request_handler=MotoRequestHandler)
    port_file.with_suffix(".tmp").write_text(str(httpd.server_port))
    os.replace(port_file.with_suffix(".tmp"), port_file)
    httpd.serve_forever()


def _serve_gcs(port_file: Path) -> None:
    from gcp_storage_emulator.server import create_server

    server = create_server("127.0.0.1", 0, in_memory=True)
    server.start()
    port = server._api._httpd.server_port
    port_file.with_suffix(".tmp").write_text(str(port))
    os.replace(port_file.with_suffix(".tmp"), port_file)
    signal.sigwait([signal.SIGTERM, signal.SIGINT])
    server.stop()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["s3", "gcs"])
    parser.add_argument("port_file", type=Path)
    parser.add_argument("--hold", type=Path)
    args = parser.parse_args()
    if args.kind == "s3":
        _serve_s3(args.port_file, args.hold)
    else:
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM, signal.SIGINT])
        _serve_gcs(args.port_file)

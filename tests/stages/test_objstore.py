"""Beam's S3 file system reuses one boto3 client per process (stages/objstore.py)."""

from __future__ import annotations

import pytest
from apache_beam.io.aws import s3io
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from stages import objstore
from tests.objstore import environment


@pytest.fixture
def s3(s3_server):
    env = {k: v for k, v in s3_server.env.items() if k != "AWS_ENDPOINT_URL"}
    with environment(env):
        objstore.clear_shared_clients()
        FileSystems.set_options(PipelineOptions(s3_server.beam_args))
        yield s3_server
        FileSystems.set_options(PipelineOptions([]))
        objstore.clear_shared_clients()


def _options(s3_server, endpoint=None) -> PipelineOptions:
    args = list(s3_server.beam_args)
    if endpoint is not None:
        args = [a for a in args if not a.startswith("--s3_endpoint_url")] + [f"--s3_endpoint_url={endpoint}"]
    return PipelineOptions(args)


def test_importing_a_stage_installs_the_shared_client():
    import stages.base  # noqa: F401 - installs it
    from apache_beam.io.aws.clients.s3 import boto3_client

    assert isinstance(boto3_client.boto3, objstore._Boto3WithSharedClients)
    assert objstore.share_s3_clients() and isinstance(boto3_client.boto3, objstore._Boto3WithSharedClients)
    # What Beam does not take from the shared session is boto3's own.
    assert "us-east-1" in boto3_client.boto3.session.Session().get_available_regions("s3")
    assert boto3_client.boto3.client is boto3_client.boto3._boto3.client


def test_calls_with_the_same_options_share_one_boto3_client_but_not_download_state(s3):
    assert objstore.share_s3_clients()
    first, second = s3io.S3IO(options=_options(s3)), s3io.S3IO(options=_options(s3))
    assert first.client is not second.client  # Beam's wrapper keeps per-download state
    assert first.client.client is second.client.client
    other = s3io.S3IO(options=_options(s3, endpoint="http://127.0.0.1:9"))
    assert other.client.client is not first.client.client


def test_a_forked_process_builds_its_own_client(s3, monkeypatch):
    objstore.share_s3_clients()
    parent = s3io.S3IO(options=_options(s3)).client.client
    monkeypatch.setattr(objstore.os, "getpid", lambda: -1)
    assert s3io.S3IO(options=_options(s3)).client.client is not parent


def test_reads_writes_and_listings_through_the_shared_client(s3):
    objstore.share_s3_clients()
    base = s3.url("objstore-unit")
    paths = [f"{base}/file-{i}.bin" for i in range(5)]
    for i, path in enumerate(paths):
        with FileSystems.create(path) as f:
            f.write(bytes([i]) * (1000 + i))
    # Two files read at once: each wrapper has its own download position.
    with FileSystems.open(paths[1]) as one, FileSystems.open(paths[2]) as two:
        assert one.read(10) == b"\x01" * 10 and two.read(10) == b"\x02" * 10
        assert len(one.read()) == 991 and len(two.read()) == 992
    matched = FileSystems.match([f"{base}/*"])[0].metadata_list
    assert sorted((m.path, m.size_in_bytes) for m in matched) == [(p, 1000 + i) for i, p in enumerate(paths)]
    FileSystems.delete(paths)
    assert not any(FileSystems.exists(p) for p in paths)
    assert len(objstore._clients) == 1

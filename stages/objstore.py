"""Beam's S3 file system with one boto3 client per process.

Beam's `S3FileSystem` builds a new `S3IO`, and with it a new boto3 session
and client, for every call: each `open`, `create`, `exists`, `match`,
`rename` and `delete`. A client costs about a quarter of a second of CPU
(botocore loads and parses the S3 service model, endpoint rules and
partitions JSON each time, because each session has its own loader cache),
and a curate run touches the store a few times per committed part, per
staging file and per shard. The object-storage test's curate-and-select run
on S3 (DirectRunner, a few dozen rows) made 158 clients; sharing them took
it from 67 s to 26 s.

`share_s3_clients()` makes Beam's client wrapper reuse one botocore client
per (process, client arguments). botocore clients are thread-safe; the
wrapper Beam keeps around it (with its per-download state) is still made
anew each time, only the expensive inner client is shared. Credentials
without explicit keys keep refreshing as botocore's provider chain does.
A forked child builds its own client (connection pools do not survive a fork).

It is installed when `stages.base` is imported, which every stage's Beam
adapter does, so the launcher and every worker that runs a stage get it.
"""

from __future__ import annotations

import os
import threading

_lock = threading.Lock()
_clients: dict[tuple, object] = {}


class _SharedSession:
    """Stands in for `boto3.session.Session()` inside Beam's client wrapper:
    `client(...)` returns the process's client for the same arguments."""

    def __init__(self, boto3_module):
        self._boto3 = boto3_module

    def client(self, **kwargs):
        key = (os.getpid(), tuple(sorted(kwargs.items())))
        with _lock:
            client = _clients.get(key)
            if client is None:
                # A boto3 session is not thread-safe: make and use it under the lock.
                client = _clients[key] = self._boto3.session.Session().client(**kwargs)
        return client

    def __getattr__(self, name):
        # Anything but `client` (Beam calls nothing else today) from a real session.
        return getattr(self._boto3.session.Session(), name)


class _Boto3WithSharedClients:
    """The `boto3` name in Beam's client module: `boto3.session.Session` hands
    out shared clients; anything else is boto3's own."""

    def __init__(self, boto3_module):
        self._boto3 = boto3_module
        self.session = _SessionModule(boto3_module)

    def __getattr__(self, name):
        return getattr(self._boto3, name)


class _SessionModule:
    def __init__(self, boto3_module):
        self._boto3 = boto3_module

    def Session(self, *args, **kwargs):  # noqa: N802 - the name Beam calls
        if args or kwargs:  # a session with its own settings is not shared
            return self._boto3.session.Session(*args, **kwargs)
        return _SharedSession(self._boto3)

    def __getattr__(self, name):
        return getattr(self._boto3.session, name)


def share_s3_clients() -> bool:
    """Install the shared client in Beam's S3 client module (idempotent).
    False when Beam's AWS support (boto3) is not installed."""
    try:
        from apache_beam.io.aws.clients.s3 import boto3_client
    except ImportError:
        return False
    current = getattr(boto3_client, "boto3", None)
    if current is None:
        return False
    if not isinstance(current, _Boto3WithSharedClients):
        boto3_client.boto3 = _Boto3WithSharedClients(current)
    return True


def clear_shared_clients() -> None:
    """Forget every shared client (tests; a process that changes credentials)."""
    with _lock:
        _clients.clear()

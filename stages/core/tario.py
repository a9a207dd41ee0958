"""WebDataset tars and staged bytes read by byte range, on any file system.

The one tar indexer and the one file-handle cache of the project, shared by the
trainer (`trainer/data.py`), `beam run select` (`stages/select.py`) and the
shard writer's staging reader (`stages/staging.py`). Beam-free: callers pass
an `opener` (path -> binary file object with `seek`/`read`), so the Beam
stages read through Beam's `FileSystems` (configured by the pipeline options:
`--s3_endpoint_url`, GCS credentials...) and the trainer through fsspec
(`open_url`: local paths, `gs://`, `s3://`, `https://`, anything fsspec knows).

Index: `scan_tar` walks the tar headers once (a seekable file skips member data
without reading it; a remote file is read with a large read-ahead block, so the
walk is a few sequential range requests) and returns each sample's members as
(offset of the data, size). After that every member is one `read_range`: one
seek and one read, which on object storage is one ranged GET.

Keys follow WebDataset: member `dir/KEY.ext.more` belongs to key `dir/KEY`, its
extension is everything after the first dot of the file name, lower-cased
(`KEY.JPG` and `KEY.jpg` are the same `jpg` member). Members of one key need
not be adjacent (they are grouped in file order).

Truncation: a tar that ends inside a header or a member's data (an interrupted
copy) is `truncated`; the samples before the cut are usable, the sample the cut
falls in is not (it may have lost members), and how many came after is unknown
unless the shard's manifest says (`samples_lost` in the callers).
"""

from __future__ import annotations

import dataclasses
import logging
import posixpath
import random
import tarfile
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import BinaryIO

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")

# Read-ahead for the header walk of a remote tar: big enough that a walk over
# ~100 kB members needs one request per block, small enough to bound memory.
INDEX_BLOCK_SIZE = 8 << 20


@dataclasses.dataclass(frozen=True)
class TarSample:
    key: str
    members: dict[str, tuple[int, int]]  # lower-cased extension -> (byte offset of the data, size)

    @property
    def image_extension(self) -> str | None:
        return next((ext for ext in IMAGE_EXTENSIONS if ext in self.members), None)


@dataclasses.dataclass(frozen=True)
class TarIndex:
    """What `scan_tar` found: the complete samples in file order, and whether the tar was cut short."""

    name: str
    samples: list[TarSample]
    size: int  # bytes in the file as found
    truncated: bool = False
    detail: str = ""  # why it counts as truncated


class TruncatedTarError(OSError):
    """The tar ends inside a header or a member (an interrupted write or copy)."""


def split_member_name(name: str) -> tuple[str, str] | None:
    """(key, lower-cased extension) of a tar member name, WebDataset's rule; None without a dot."""
    directory, base = posixpath.split(name)
    stem, dot, extension = base.partition(".")
    if not dot:
        return None
    return (posixpath.join(directory, stem) if directory else stem), extension.lower()


def _file_size(fileobj: BinaryIO) -> int:
    position = fileobj.tell()
    size = fileobj.seek(0, 2)
    fileobj.seek(position)
    return size


def scan_tar(fileobj: BinaryIO, name: str) -> TarIndex:
    """Index an uncompressed tar read from `fileobj` (seekable; see module doc)."""
    size = _file_size(fileobj)
    fileobj.seek(0)
    groups: OrderedDict[str, dict[str, tuple[int, int]]] = OrderedDict()
    truncated, detail = False, ""
    last_key = None
    try:
        with tarfile.open(fileobj=fileobj, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                if member.offset_data + member.size > size:
                    truncated, detail = True, f"member {member.name} ends at byte {member.offset_data + member.size} of a {size}-byte file"
                    last_key = (split_member_name(member.name) or (None,))[0]
                    break
                parts = split_member_name(member.name)
                if parts is None:
                    continue
                key, extension = parts
                groups.setdefault(key, {})[extension] = (member.offset_data, member.size)
                last_key = key
            else:
                # tarfile stops quietly at a cut or garbled header; a complete tar ends
                # with two zero blocks where the walk stopped.
                fileobj.seek(tar.offset)
                end = fileobj.read(2 * tarfile.BLOCKSIZE)
                if len(end) < 2 * tarfile.BLOCKSIZE or end.strip(b"\0"):
                    truncated, detail = True, f"no end-of-archive marker at byte {tar.offset} of a {size}-byte file"
    except tarfile.ReadError as error:
        if last_key is None and not truncated:
            raise TruncatedTarError(f"{name}: not a readable tar ({error})") from error
        # A header cut short after the first member (e.g. between a PAX header and the
        # header it extends, as webdataset writes them).
        truncated, detail = True, f"unreadable header after key {last_key} ({error})"
    if truncated and last_key is not None:
        # The sample the cut falls in may be missing members: not usable.
        groups.pop(last_key, None)
    return TarIndex(name, [TarSample(k, m) for k, m in groups.items()], size, truncated, detail)


def index_tar(source: str | BinaryIO, name: str | None = None, opener: Callable[[str], BinaryIO] | None = None) -> list[TarSample]:
    """The samples of a complete tar (a path/URL opened with `opener`, default `open_url`
    with read-ahead, or an open file). Raises TruncatedTarError for a cut-short tar."""
    if isinstance(source, str):
        with (opener or open_for_index)(source) as handle:
            found = scan_tar(handle, source)
    else:
        found = scan_tar(source, name or getattr(source, "name", "<tar>"))
    if found.truncated:
        raise TruncatedTarError(f"{found.name}: truncated tar ({found.detail}); {len(found.samples)} complete samples before the cut")
    return found.samples


# ---- reading ranges ------------------------------------------------------------------------


class ShortReadError(OSError):
    """Fewer bytes than asked for: the file is shorter than the index says."""


def read_range(handle: BinaryIO, offset: int, size: int, name: str = "") -> bytes:
    """Exactly `size` bytes at `offset` (one seek, one read)."""
    handle.seek(offset)
    data = handle.read(size)
    if len(data) != size:
        raise ShortReadError(f"{name or getattr(handle, 'name', 'file')}: expected {size} bytes at offset {offset}, got {len(data)}")
    return data


class OpenFiles:
    """A few open file handles, least recently used closed first.

    `opener(path)` opens one; `limit` bounds how many stay open (each remote
    handle holds a connection and its read buffer). `discard(path)` closes and
    forgets a handle (after an error, so the next `get` reopens it).
    """

    def __init__(self, opener: Callable[[str], object], limit: int = 16):
        self.opener = opener
        self.limit = limit
        self.handles: OrderedDict[str, object] = OrderedDict()

    def get(self, path: str):
        handle = self.handles.pop(path, None)
        if handle is None:
            handle = self.opener(path)
            while len(self.handles) >= self.limit:
                _, old = self.handles.popitem(last=False)
                _close(old)
        self.handles[path] = handle
        return handle

    def discard(self, path: str) -> None:
        handle = self.handles.pop(path, None)
        if handle is not None:
            _close(handle)

    def close(self) -> None:
        while self.handles:
            _, handle = self.handles.popitem()
            _close(handle)

    def __getstate__(self):  # a DoFn or a dataset holding one must pickle: handles never travel
        return {"opener": self.opener, "limit": self.limit, "handles": OrderedDict()}


def _close(handle) -> None:
    close = getattr(handle, "close", None)
    if close is not None:
        try:
            close()
        except Exception as error:  # a handle that fails to close has nothing left to lose
            logger.debug("closing a file handle failed: %s", error)


# Errors that mean "this file is not there / not this way", which retrying cannot fix.
PERMANENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ShortReadError, TruncatedTarError, ValueError)


def with_retries(action: Callable[[], object], what: str, attempts: int = 4, base_delay_s: float = 0.5, on_retry: Callable[[], None] | None = None):
    """`action()`, retried on transient errors (connection resets, timeouts, 5xx surfaced as
    OSError...) with jittered exponential backoff; permanent errors (`PERMANENT_ERRORS`) and
    the last failure are raised. `on_retry` runs before each retry (e.g. drop a stale handle)."""
    for attempt in range(attempts):
        try:
            return action()
        except PERMANENT_ERRORS:
            raise
        except (OSError, TimeoutError, ConnectionError) as error:
            if attempt == attempts - 1:
                raise
            delay = base_delay_s * (2**attempt) * (0.5 + random.random())
            logger.warning("%s failed (%s); retrying in %.1f s", what, error, delay)
            if on_retry is not None:
                on_retry()
            time.sleep(delay)
    raise AssertionError("unreachable")


class RangeReader:
    """Reads byte ranges of many files through an `OpenFiles` cache, with retries."""

    def __init__(self, opener: Callable[[str], BinaryIO], limit: int = 16, attempts: int = 4):
        self.files = OpenFiles(opener, limit)
        self.attempts = attempts

    def read(self, path: str, offset: int, size: int) -> bytes:
        return with_retries(
            lambda: read_range(self.files.get(path), offset, size, path),
            f"reading {size} bytes at {offset} of {path}",
            attempts=self.attempts,
            on_retry=lambda: self.files.discard(path),
        )

    def close(self) -> None:
        self.files.close()


# ---- fsspec ---------------------------------------------------------------------------------


def open_url(url: str, *, block_size: int | None = None, cache_type: str = "none") -> BinaryIO:
    """Open `url` (a local path or any fsspec URL) for reading. The default reads exactly
    what is asked (one ranged GET per read on object storage); pass `cache_type="readahead"`
    and a `block_size` for sequential reading."""
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(url)
    kwargs = {"cache_type": cache_type}
    if block_size:
        kwargs["block_size"] = block_size
    return fs.open(path, "rb", **kwargs)


def open_for_index(url: str) -> BinaryIO:
    """`open_url` with a large read-ahead block, for `scan_tar` and other sequential passes."""
    return open_url(url, block_size=INDEX_BLOCK_SIZE, cache_type="readahead")

"""Staging: how image bytes reach the shards without riding through a shuffle.

Everything that touches image bytes before deduplication (crawl, decode,
hashing) runs in one fused Beam stage. Its last step appends the bytes to a
staging file under `DIR/_staging/` and replaces them on the record by an
`ImageRef(path, offset, length)`. From then on only metadata moves between
workers: dedup shuffles keys and hashes, and the stages that need pixels again
(scorers, the shard writer) read the byte range back from the staging file.
The staging folder is deleted once the shards are final.
"""

from __future__ import annotations

import io
import logging
import uuid
from collections.abc import Iterator

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue

from schemas import ImageRef, SampleRecord
from stages.base import WithImage
from stages.core.tario import RangeReader, read_range

LOG = logging.getLogger(__name__)

STAGING_DIR = "_staging"


def staging_dir(output_dir: str) -> str:
    return FileSystems.join(output_dir, STAGING_DIR)


def open_staged(path: str):
    """Open a file through Beam's FileSystems for reads by byte range.

    Beam's S3 reader is a `BufferedReader` over a ranged downloader: reading
    through the buffer would fetch a whole buffer (16 MiB) per sample, so the
    unbuffered stream under it is used and each read is one ranged GET. (GCS's
    reader fetches `max(range, its chunk)` per read; local files are plain files.)
    """
    handle = FileSystems.open(path, mime_type="application/octet-stream", compression_type="uncompressed")
    if isinstance(handle, io.BufferedReader) and not isinstance(handle.raw, io.FileIO):
        return _RawRanges(handle)
    return handle


class _RawRanges:
    """seek/read on the raw stream of a BufferedReader (keeps the wrapper for close)."""

    def __init__(self, buffered: io.BufferedReader):
        self.buffered = buffered
        self.raw = buffered.raw
        self.name = getattr(buffered, "name", "")

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            return self.raw.readall()
        chunks, left = [], size
        while left > 0:
            chunk = self.raw.read(left)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        self.buffered.close()


def read_image_bytes(ref: ImageRef) -> bytes:
    """Read one staged image back. For many reads, use `ImageReader`."""
    handle = open_staged(ref.path)
    try:
        return read_range(handle, ref.offset, ref.length, ref.path)
    finally:
        handle.close()


class ImageReader:
    """Reads staged byte ranges (`ImageRef`s) with retries, keeping a few files open
    (shard writers read many samples that were staged together)."""

    def __init__(self, max_open: int = 8):
        self._ranges = RangeReader(open_staged, limit=max_open)

    def read(self, ref: ImageRef) -> bytes:
        return self._ranges.read(ref.path, ref.offset, ref.length)

    def close(self) -> None:
        self._ranges.close()


class StagingFile:
    """One staging file being written: `append(bytes) -> ImageRef`. The file
    is created on the first append, under a fresh name (a retried bundle never
    writes into a file another attempt may have published refs to). Refs into
    it may be handed out only after `close()`."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self._file = None
        self.path: str | None = None
        self._offset = 0

    def append(self, data: bytes) -> ImageRef:
        if self._file is None:
            self.path = FileSystems.join(staging_dir(self.output_dir), f"{uuid.uuid4().hex}.bin")
            self._file = FileSystems.create(self.path, mime_type="application/octet-stream", compression_type="uncompressed")
            self._offset = 0
        self._file.write(data)
        ref = ImageRef(path=self.path, offset=self._offset, length=len(data))
        self._offset += len(data)
        return ref

    def close(self) -> None:
        """Close the file (on GCS/S3 this finalises the upload: only then can refs be read)."""
        if self._file is not None:
            self._file.close()
            self._file = None


class StageImagesDoFn(beam.DoFn):
    """Appends each `WithImage`'s bytes to a staging file; emits the record
    with `image_ref` set.

    Records are emitted only once the file holding their bytes is closed
    (every `max_file_records` records or at the end of the bundle), so no
    reader can see a ref into a file that is still being written. A retried
    bundle writes a new file; the old one is left for the final cleanup.
    """

    def __init__(self, output_dir: str, max_file_records: int = 1000):
        self.output_dir = output_dir
        self.max_file_records = max_file_records
        self.staged_bytes = Metrics.counter("staging", "bytes")

    def start_bundle(self):
        self._file = StagingFile(self.output_dir)
        self._pending: list[SampleRecord] = []

    def _close(self) -> list[SampleRecord]:
        self._file.close()
        done, self._pending = self._pending, []
        return done

    def process(self, element: WithImage) -> Iterator[SampleRecord]:
        ref = self._file.append(element.data)
        self.staged_bytes.inc(len(element.data))
        self._pending.append(element.record.model_copy(update={"image_ref": ref}))
        if len(self._pending) >= self.max_file_records:
            yield from self._close()
            self._file = StagingFile(self.output_dir)

    def finish_bundle(self):
        for record in self._close():
            yield WindowedValue(record, GlobalWindow().max_timestamp(), [GlobalWindow()])


class _DeleteTree(beam.DoFn):
    """Deletes folders (every object under the prefix) and files; best effort.

    On GCS and S3 a folder is only a key prefix: `exists(prefix)` is false and
    deleting it needs the trailing slash, which Beam's file systems read as
    "everything under it". Locally the folder itself is removed."""

    def process(self, _, paths):
        for path in paths:
            target = path if path.endswith("/") else path + "/"
            try:
                if "://" in path:
                    FileSystems.delete([target])
                elif FileSystems.exists(path):
                    FileSystems.delete([path])
            except Exception as err:  # cleanup is best effort: the outputs are already final
                LOG.warning("could not delete %s: %s", path, err)
        yield None


def cleanup_after(done: beam.PCollection, paths: list[str], label: str = "Cleanup") -> beam.PCollection:
    """Delete `paths` (folders or files) once `done` has been fully computed."""
    return (
        done
        | f"{label}/WaitForAll" >> beam.combiners.Count.Globally()
        | f"{label}/Delete" >> beam.ParDo(_DeleteTree(), paths)
    )

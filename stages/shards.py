"""Write the kept samples as WebDataset shards.

Layout: `DIR/shards/000000.tar, 000001.tar, ...`, each holding, per sample,
`KEY.<jpg|png|webp>` (the stored image), `KEY.txt` (the caption chosen by
`caption_source`) and `KEY.json` (the full `SampleRecord`), plus a manifest
`DIR/shards/NNNNNN.json` (`ShardManifest`, with the run's config).

How samples get to their shards without moving image bytes through a shuffle:
1. Records (metadata only) are spread over `writers` keys and cut into batches
   of exactly `samples_per_shard` with `GroupIntoBatches`; only the last batch
   of each writer key can be shorter.
2. Each batch is named by its smallest key; the sorted list of those names
   (one string per shard) numbers the shards. It reaches the writers as a side
   input, so every shard knows its final name before it is written.
3. A writer reads each sample's bytes from the staging files (`ImageRef`, by
   byte range), streams the tar to `shards/.tmp/`, closes it (on GCS and S3 that
   finalises the upload: only then does the object exist) and renames it to
   `NNNNNN.tar` (locally an atomic rename; on object storage a server-side copy,
   which makes the final object appear whole or not at all, then a delete).
   Then it writes the manifest `NNNNNN.json`. A reader never sees a partial
   shard under a final name, and a shard is complete iff its manifest exists
   (a writer that dies between the two leaves a tar without a manifest, which
   the retried bundle or the next run overwrites). A failed writer removes its
   temporary object; `shards/.tmp/` is deleted at the end of the run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import typing
import uuid
import zlib
from datetime import datetime, timezone

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from schemas import RejectReason, SampleRecord, ShardManifest, ShardsConfig, Stage
from stages.base import REJECTS, Drop, rejection
from stages.staging import ImageReader

LOG = logging.getLogger(__name__)

SHARDS_DIR = "shards"
TMP_DIR = ".tmp"


def shard_name(index: int) -> str:
    return f"{index:06d}"


def choose_caption(record: SampleRecord, source: str) -> str:
    if source == "synthetic" and record.caption_synthetic:
        return record.caption_synthetic
    return record.caption_original


class _HashingWriter:
    """File wrapper that counts and hashes what goes through it."""

    def __init__(self, raw):
        self.raw = raw
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data):
        if self.raw is None:  # abandoned after a failure: the tar's late end blocks go nowhere
            return len(data)
        self.sha256.update(data)
        self.size += len(data)
        return self.raw.write(data)

    def abandon(self):
        self.raw = None

    def flush(self):
        pass

    def close(self):
        if self.raw is not None:
            self.raw.close()


class WriteShardDoFn(beam.DoFn):
    """(batch name, records) -> the records as written (with `shard` set), and
    one manifest per shard on the `manifests` output."""

    MANIFESTS = "manifests"

    def __init__(self, output_dir: str, config: ShardsConfig, run_config: dict):
        self.output_dir = output_dir
        self.config = config
        self.run_config = run_config
        self.config_sha256 = hashlib.sha256(json.dumps(run_config, sort_keys=True).encode()).hexdigest()
        self.samples = Metrics.counter(Stage.SHARDS.value, "samples")
        self.shards = Metrics.counter(Stage.SHARDS.value, "shards")
        self.lost = Metrics.counter(Stage.SHARDS.value, f"dropped_{RejectReason.STAGING_LOST.value}")

    def setup(self):
        self._reader = ImageReader()

    def teardown(self):
        self._reader.close()

    def process(self, element, numbering):
        batch_name, records = element
        name = shard_name(numbering[batch_name])
        shards_dir = FileSystems.join(self.output_dir, SHARDS_DIR)
        tmp_path = FileSystems.join(shards_dir, TMP_DIR, f"{name}.{uuid.uuid4().hex}.tar")
        final_path = FileSystems.join(shards_dir, f"{name}.tar")
        written: list[SampleRecord] = []
        raw = FileSystems.create(tmp_path, mime_type="application/x-tar", compression_type="uncompressed")
        sink = _HashingWriter(raw)
        try:
            import webdataset  # here, not at the top: it imports torch, seconds of every worker's start-up

            tar = webdataset.TarWriter(sink)
            for record in sorted(records, key=lambda r: r.key):
                try:
                    data = self._reader.read(record.image_ref)
                except Exception as err:
                    self.lost.inc()
                    drop = Drop(RejectReason.STAGING_LOST, f"{record.image_ref}: {err}"[:300])
                    yield beam.pvalue.TaggedOutput(REJECTS, rejection(record, Stage.SHARDS, drop))
                    continue
                kept = record.model_copy(
                    update={
                        "caption": choose_caption(record, self.config.caption_source),
                        "status": "kept",
                        "shard": f"{name}.tar",
                        "image_ref": None,
                    }
                )
                tar.write(
                    {
                        "__key__": kept.key,
                        kept.image_format: data,
                        "txt": kept.caption,
                        "json": kept.model_dump_json().encode(),
                    }
                )
                written.append(kept)
            tar.close()  # the end-of-archive blocks; TarWriter never closes a stream it was handed
            # Finalise the upload: on GCS and S3 the object exists only once its
            # stream is closed, so this must come before the copy that "renames" it.
            raw.close()
        except BaseException:
            sink.abandon()
            _discard(raw, tmp_path)
            raise
        # Local: an atomic rename. GCS/S3: a server-side copy to the final name
        # (the object appears whole or not at all) and a delete of the temporary one.
        FileSystems.rename([tmp_path], [final_path])
        manifest = ShardManifest(
            shard=f"{name}.tar",
            num_samples=len(written),
            keys=[r.key for r in written],
            tar_bytes=sink.size,
            sha256=sink.sha256.hexdigest(),
            created_at=datetime.now(timezone.utc),
            config_sha256=self.config_sha256,
            config=self.run_config,
        )
        # Written only after its tar is final: a shard is complete iff its manifest exists.
        write_atomically(FileSystems.join(shards_dir, f"{name}.json"), manifest.model_dump_json(indent=2).encode(), FileSystems.join(shards_dir, TMP_DIR))
        self.shards.inc()
        self.samples.inc(len(written))
        yield beam.pvalue.TaggedOutput(self.MANIFESTS, manifest)
        yield from written


def _discard(handle, path: str) -> None:
    """Best-effort removal of a temporary file whose writing failed (closing it first
    publishes whatever was written, under the temporary name only, so it can be deleted
    and no multipart upload is left open)."""
    try:
        handle.close()
        FileSystems.delete([path])
    except Exception as err:  # the final cleanup deletes the temporary folder anyway
        LOG.warning("could not remove %s: %s", path, err)


def write_atomically(path: str, data: bytes, tmp_dir: str | None = None) -> None:
    """Write `data` so that `path` never holds a partial file.

    Object storage (`gs://`, `s3://`...): written straight to `path`. An upload
    becomes an object only when it is finalised (the stream closed), so a
    failure before that leaves nothing; on error the stream is not closed.
    Elsewhere: a temporary file in `tmp_dir` (default: beside `path`), closed,
    then renamed.
    """
    if "://" in path:
        f = FileSystems.create(path, compression_type="uncompressed")
        f.write(data)
        f.close()
        return
    base = path.rsplit("/", 1)[-1]
    tmp = FileSystems.join(tmp_dir, f"{base}.{uuid.uuid4().hex}.partial") if tmp_dir else f"{path}.{uuid.uuid4().hex}.partial"
    if tmp_dir and not FileSystems.exists(tmp_dir):
        FileSystems.mkdirs(tmp_dir)
    with FileSystems.create(tmp, compression_type="uncompressed") as f:
        f.write(data)
    FileSystems.rename([tmp], [path])


def _writer_key(record: SampleRecord, writers: int) -> tuple[int, SampleRecord]:
    return zlib.crc32(record.key.encode()) % writers, record


def _name_batch(element) -> tuple[str, list[SampleRecord]]:
    _, records = element
    records = list(records)
    return min(r.key for r in records), records


def _number_batches(names: list[str], first: int = 0):
    for index, name in enumerate(sorted(names), start=first):
        yield name, index


class WriteShards(beam.PTransform):
    """PCollection[SampleRecord with image_ref] -> (written records, manifests, rejects)."""

    def __init__(self, output_dir: str, config: ShardsConfig, run_config: dict, first_shard: int = 0):
        """`first_shard`: the number of the first shard written (an `--append`
        run numbers its shards after the dataset's)."""
        super().__init__()
        self.output_dir = output_dir
        self.config = config
        self.run_config = run_config
        self.first_shard = first_shard

    def expand(self, records):
        batches = (
            records
            # Metadata only. Also keeps GroupIntoBatches out of the producer's
            # fused stage: Beam 2.77's local runner flushes the final partial
            # batch of only one of two GroupIntoBatches fused into one stage.
            | "Detach" >> beam.Reshuffle()
            | "SpreadOverWriters"
            >> beam.Map(_writer_key, self.config.writers).with_output_types(beam.typehints.KV[int, typing.Any])
            | "Batch" >> beam.GroupIntoBatches(self.config.samples_per_shard)
            | "NameBatch" >> beam.Map(_name_batch)
        )
        numbering = (
            batches
            | "BatchNames" >> beam.Map(lambda b: b[0])
            | "AllNames" >> beam.combiners.ToList()
            | "Number" >> beam.FlatMap(_number_batches, self.first_shard)
        )
        outputs = batches | "Write" >> beam.ParDo(
            WriteShardDoFn(self.output_dir, self.config, self.run_config), beam.pvalue.AsDict(numbering)
        ).with_outputs(WriteShardDoFn.MANIFESTS, REJECTS, main="written")
        return outputs.written, outputs[WriteShardDoFn.MANIFESTS], outputs[REJECTS]

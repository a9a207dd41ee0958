import json
import pickle
import tarfile

import apache_beam as beam
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipelines.testing import webcorpus
from schemas import ImageRef, Provenance, SampleRecord, ShardsConfig
from stages.base import WithImage
from stages.shards import WriteShards, WriteShardDoFn, choose_caption
from stages.staging import StageImagesDoFn, read_image_bytes


def record(i: int) -> SampleRecord:
    return SampleRecord(key=f"{i:014d}", url=f"http://x/{i}.jpg", caption_original=f"caption {i}", image_format="jpg",
                        width=600, height=600, provenance=Provenance(source_file="in", source_row=i))


def test_staged_bytes_read_back_exactly(tmp_path):
    images = {record(i).key: webcorpus.jpeg(webcorpus.render(i, (64, 48))) for i in range(7)}
    staged = []
    dofn = StageImagesDoFn(str(tmp_path), max_file_records=3)
    dofn.start_bundle()
    for i in range(7):
        staged += list(dofn.process(WithImage(record(i), images[record(i).key])))
    staged += [wv.value for wv in dofn.finish_bundle()]
    assert len(staged) == 7 and len({r.image_ref.path for r in staged}) == 3  # rolled every 3 records
    for r in staged:
        assert read_image_bytes(r.image_ref) == images[r.key]


def test_fixed_size_shards_numbered_and_complete(tmp_path):
    n, per_shard = 23, 5
    images = {record(i).key: webcorpus.jpeg(webcorpus.render(i, (64, 48))) for i in range(n)}
    lost = record(99).model_copy(update={"image_ref": ImageRef(path=str(tmp_path / "gone.bin"), offset=0, length=10)})
    with TestPipeline(runner=FnApiRunner()) as p:
        staged = (
            p
            | beam.Create([WithImage(record(i), images[record(i).key]) for i in range(n)])
            | beam.ParDo(StageImagesDoFn(str(tmp_path / "out")))
        )
        with_lost = (staged, p | "Lost" >> beam.Create([lost])) | beam.Flatten()
        written, manifests, rejects = with_lost | WriteShards(
            str(tmp_path / "out"), ShardsConfig(samples_per_shard=per_shard, writers=1), {"run": 1}
        )
        assert_that(written | beam.Map(lambda r: r.key), equal_to(sorted(images)), label="AllWritten")
        assert_that(rejects | beam.Map(lambda r: (r.key, r.reason.value)), equal_to([(lost.key, "staging_lost")]), label="Lost")
    shards = sorted((tmp_path / "out" / "shards").glob("*.tar"))
    assert [s.name for s in shards] == [f"{i:06d}.tar" for i in range(5)]
    seen = {}
    for shard in shards:
        manifest = json.loads(shard.with_suffix(".json").read_text())
        with tarfile.open(shard) as tar:
            names = tar.getnames()
            for name in names:
                if name.endswith(".jpg"):
                    seen[name[:-4]] = tar.extractfile(name).read()
                if name.endswith(".json"):
                    assert json.loads(tar.extractfile(name).read())["shard"] == shard.name
        assert manifest["config"] == {"run": 1} and manifest["num_samples"] == len(manifest["keys"])
        assert len(names) == 3 * len(manifest["keys"])
    sizes = sorted(json.loads(s.with_suffix(".json").read_text())["num_samples"] for s in shards)
    # 24 records in batches of 5 (5, 5, 5, 5, 4); the lost one is missing from one of them.
    assert sizes in ([3, 5, 5, 5, 5], [4, 4, 5, 5, 5])
    assert seen == {k: v for k, v in images.items()}
    assert not list((tmp_path / "out" / "shards" / ".tmp").glob("*.tar"))  # renamed, nothing partial left


def test_caption_choice():
    r = record(1)
    assert choose_caption(r, "synthetic") == "caption 1"
    r2 = r.model_copy(update={"caption_synthetic": "a detailed caption"})
    assert choose_caption(r2, "synthetic") == "a detailed caption"
    assert choose_caption(r2, "original") == "caption 1"


def test_dofns_pickle(tmp_path):
    for dofn in (StageImagesDoFn(str(tmp_path)), WriteShardDoFn(str(tmp_path), ShardsConfig(), {})):
        pickle.loads(pickle.dumps(dofn))


def test_a_writer_that_fails_mid_shard_leaves_nothing_under_a_final_name(tmp_path, monkeypatch):
    import pytest
    import webdataset

    images = {record(i).key: webcorpus.jpeg(webcorpus.render(i, (64, 48))) for i in range(4)}
    dofn = StageImagesDoFn(str(tmp_path / "out"))
    dofn.start_bundle()
    staged = [r for i in range(4) for r in dofn.process(WithImage(record(i), images[record(i).key]))]
    staged += [wv.value for wv in dofn.finish_bundle()]
    writes = []
    real_write = webdataset.TarWriter.write

    def failing_write(self, sample):
        writes.append(sample["__key__"])
        if len(writes) == 3:
            raise OSError("disk full")
        return real_write(self, sample)

    monkeypatch.setattr(webdataset.TarWriter, "write", failing_write)
    writer = WriteShardDoFn(str(tmp_path / "out"), ShardsConfig(samples_per_shard=4), {})
    writer.setup()
    with pytest.raises(OSError, match="disk full"):
        list(writer.process(("k", staged), {"k": 0}))
    writer.teardown()
    shards = tmp_path / "out" / "shards"
    assert not (shards / "000000.tar").exists() and not (shards / "000000.json").exists()
    assert not list((shards / ".tmp").glob("*"))  # the failed temporary file is removed too

"""Shared model-stage utilities: device/dtype choice, RunInference wiring,
decoding staged images once, embedding heads, and resource hints as the
runner sees them (read back from the pipeline proto)."""

from __future__ import annotations

import pickle

import apache_beam as beam
import numpy as np
import pytest
import torch
from PIL import Image
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from schemas import CurateConfig, ImageRef, RejectReason, Stage
from schemas.scoring import BatchingConfig, EmbeddingHeadConfig, ScoringConfig
from stages.base import REJECTS
from stages.inference import PrepareImagesDoFn, model_handler_kwargs, resource_hints
from stages.models.device import onnx_providers, resolve_device, resolve_dtype
from stages.models.heads import EmbeddingHead, check_embedding_head
from pipelines.testing.models import TINY_CLIP_NAME, save_embedding_head, save_tiny_clip
from pipelines.testing.images import make_images, staged_records


def runner():
    return FnApiRunner()


# ---------------------------------------------------------------- devices


def test_device_choice():
    assert resolve_device("cpu").type == "cpu"
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
    else:
        assert resolve_device("auto").type == "cpu"
        with pytest.raises(RuntimeError, match="no CUDA device"):
            resolve_device("cuda")


def test_dtype_choice():
    cpu = torch.device("cpu")
    assert resolve_dtype(cpu, "auto") is None  # fp32 on CPU: no autocast
    assert resolve_dtype(cpu, "fp32") is None
    assert resolve_dtype(cpu, "bf16") is torch.bfloat16
    assert resolve_dtype(cpu, "fp16") is torch.float16
    if torch.cuda.is_available():
        expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        assert resolve_dtype(torch.device("cuda"), "auto") is expected


def test_onnx_providers():
    import onnxruntime

    assert onnx_providers("cpu") == ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert onnx_providers("auto") == ["CPUExecutionProvider"]
        with pytest.raises(RuntimeError, match="onnxruntime-gpu"):
            onnx_providers("cuda")


def test_handler_kwargs_and_hints():
    batching = BatchingConfig(min_batch_size=2, max_batch_size=16)
    plain = model_handler_kwargs(batching, ScoringConfig())
    assert plain == {"min_batch_size": 2, "max_batch_size": 16}
    shared = model_handler_kwargs(batching, ScoringConfig(share_model_across_processes=True, model_copies=2))
    assert shared["large_model"] is True and shared["model_copies"] == 2
    assert resource_hints(ScoringConfig()) == {}
    assert resource_hints(ScoringConfig(accelerator="type:nvidia-l4;count:1", min_ram="16GB")) == {
        "accelerator": "type:nvidia-l4;count:1",
        "min_ram": "16GB",
    }
    with pytest.raises(ValueError, match="min_batch_size"):
        BatchingConfig(min_batch_size=8, max_batch_size=4)


# ---------------------------------------------------------------- decoding


class _SizePreparer:
    """Test preparer: the decoded size and the caption length."""

    def setup(self):
        self.ready = True

    def __call__(self, image, record):
        assert self.ready
        return {"size": np.array(image.size), "chars": np.array([len(record.caption_original)])}


def _prepared(example):
    return example.record.key, tuple(int(v) for v in example.inputs["size"]), int(example.inputs["chars"][0])


def test_prepare_reads_staged_bytes_once_and_rejects_lost_or_corrupt(tmp_path):
    images = [Image.new("RGB", (30 + i, 20), (i * 40, 0, 0)) for i in range(3)]
    records = staged_records(tmp_path / "ok", images, captions=["a b", "a bc", "a bcd"])
    lost = records[0].model_copy(
        update={"key": "lost", "image_ref": ImageRef(path=str(tmp_path / "gone.bin"), offset=0, length=10)}
    )
    (tmp_path / "junk.bin").write_bytes(b"\x00" * 64)
    corrupt = records[0].model_copy(
        update={"key": "corrupt", "image_ref": ImageRef(path=str(tmp_path / "junk.bin"), offset=0, length=64)}
    )
    dofn = PrepareImagesDoFn([_SizePreparer()])
    pickle.loads(pickle.dumps(dofn))  # must pickle for remote workers

    with TestPipeline(runner=runner()) as p:
        outputs = p | beam.Create([*records, lost, corrupt]) | beam.ParDo(dofn).with_outputs(REJECTS, main="examples")
        assert_that(
            outputs.examples | beam.Map(_prepared),
            equal_to([("k000", (30, 20), 3), ("k001", (31, 20), 4), ("k002", (32, 20), 5)]),
        )
        assert_that(
            outputs[REJECTS] | beam.Map(lambda r: (r.key, r.stage, r.reason)),
            equal_to(
                [("lost", Stage.SELECT, RejectReason.STAGING_LOST), ("corrupt", Stage.SELECT, RejectReason.NOT_AN_IMAGE)]
            ),
            label="rejects",
        )


# ---------------------------------------------------------------- embedding heads


def _reference_head(state, prefix_order, x, activation, output, normalize=True):
    x = torch.from_numpy(x)
    if normalize:
        x = x / x.norm(dim=-1, keepdim=True)
    for i, prefix in enumerate(prefix_order):
        x = x @ state[f"{prefix}weight"].T + state[f"{prefix}bias"]
        if i < len(prefix_order) - 1 and activation == "relu":
            x = torch.relu(x)
    if output == "sigmoid":
        return torch.sigmoid(x[:, 0]).numpy()
    if output == "softmax_last":
        return torch.softmax(x, dim=-1)[:, -1].numpy()
    return x[:, 0].numpy()


def test_embedding_head_mlp_safetensors(tmp_path):
    path = tmp_path / "head.safetensors"
    state = save_embedding_head(path, [32, 16, 8, 1], seed=3)
    embeddings = np.random.default_rng(0).normal(size=(5, 32)).astype(np.float32)
    config = EmbeddingHeadConfig(path=str(path), activation="relu", output="sigmoid")
    got = EmbeddingHead.load(config, embed_dim=32)(embeddings)
    want = _reference_head(state, ["layers.0.", "layers.2.", "layers.4."], embeddings, "relu", "sigmoid")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert got.shape == (5,) and ((got > 0) & (got < 1)).all()


def test_embedding_head_laion_linear_pt_and_softmax(tmp_path):
    linear = tmp_path / "aesthetic.pth"
    state = save_embedding_head(linear, [32, 1], layout="linear", seed=1, bias=5.0)
    embeddings = np.random.default_rng(1).normal(size=(4, 32)).astype(np.float32)
    got = EmbeddingHead.load(EmbeddingHeadConfig(path=str(linear), output="identity"), 32)(embeddings)
    np.testing.assert_allclose(got, _reference_head(state, [""], embeddings, "none", "identity"), rtol=1e-5)

    two_class = tmp_path / "nsfw.pt"
    state = save_embedding_head(two_class, [32, 2], seed=2)
    got = EmbeddingHead.load(EmbeddingHeadConfig(path=str(two_class), output="softmax_last"), 32)(embeddings)
    np.testing.assert_allclose(got, _reference_head(state, ["layers.0."], embeddings, "none", "softmax_last"), rtol=1e-5)


def test_embedding_head_errors_name_the_file(tmp_path):
    good = tmp_path / "good.safetensors"
    save_embedding_head(good, [32, 1])
    with pytest.raises(ValueError, match="takes 32-dim embeddings but the CLIP model gives 512"):
        check_embedding_head(EmbeddingHeadConfig(path=str(good), output="identity"), 512)
    with pytest.raises(ValueError, match="softmax_last"):
        check_embedding_head(EmbeddingHeadConfig(path=str(good), output="softmax_last"), 32)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        check_embedding_head(EmbeddingHeadConfig(path=str(tmp_path / "missing.pt"), output="identity"), 32)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt.*could not be read"):
        check_embedding_head(EmbeddingHeadConfig(path=str(garbage), output="identity"), 32)
    broken = tmp_path / "broken.pt"
    state = save_embedding_head(broken, [32, 8, 1])
    state["layers.2.weight"] = torch.zeros(1, 7)
    torch.save(state, broken)
    with pytest.raises(ValueError, match="layer 0 gives 8 features but layer 2 takes 7"):
        check_embedding_head(EmbeddingHeadConfig(path=str(broken), output="identity"), 32)


# ---------------------------------------------------------------- resource hints in the pipeline proto


def _environment_hints(pipeline: beam.Pipeline) -> dict[str, dict[str, bytes]]:
    """Leaf transform unique name -> its environment's resource hints."""
    proto = pipeline.to_runner_api()
    environments = proto.components.environments
    hints = {}
    for transform in proto.components.transforms.values():
        if transform.subtransforms or not transform.environment_id:
            continue
        hints[transform.unique_name] = dict(environments[transform.environment_id].resource_hints)
    return hints


def test_resource_hints_reach_every_model_step(tmp_path):
    from pipelines.scoring import ModelStages

    config_path, weights = save_tiny_clip(tmp_path)
    config = CurateConfig.model_validate(
        {
            "scoring": {
                "clip": {"model": TINY_CLIP_NAME, "pretrained": str(weights), "model_config_path": str(config_path)},
                "safety": {},
                "accelerator": "type:nvidia-l4;count:1;install-nvidia-driver",
                "min_ram": "16GB",
            },
            "select": {"min_clip_similarity": 0.1},
        }
    )
    records = staged_records(tmp_path / "staged", make_images(2))
    pipeline = beam.Pipeline(runner=runner())
    _ = pipeline | beam.Create(records) | "Models" >> ModelStages(config)
    hints = _environment_hints(pipeline)

    accelerator = b"type:nvidia-l4;count:1;install-nvidia-driver"
    model_steps = [name for name in hints if name.startswith("Models/Score/")]
    inference = [name for name in model_steps if name.endswith("BeamML_RunInference")]
    assert {n.split("/")[2] for n in inference} == {"Clip", "NudeNet"}
    assert any(name.startswith("Models/Score/Prepare") for name in model_steps)
    for name in model_steps:
        assert hints[name].get("beam:resources:accelerator:v1") == accelerator, name
        assert int(hints[name]["beam:resources:min_ram_bytes:v1"]) == 16 * 10**9, name
    # The selection step is cheap: no accelerator.
    select_steps = [name for name in hints if name.startswith("Models/Select")]
    assert select_steps and all("beam:resources:accelerator:v1" not in hints[n] for n in select_steps)

"""Recaptioning: the quality gate on crafted strings, batched generation against
transformers' own single-image path, model validation, resource hints in the
pipeline proto, and the Beam transform end to end on tiny LLaVA checkpoints
built offline (random weights, or weights that force a known greedy output)."""

from __future__ import annotations

import collections
import io
import json
import shutil
import sys

import apache_beam as beam
import numpy as np
import pytest
import torch
from PIL import Image
from apache_beam.internal import pickler
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.portability import common_urns
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import BeamAssertException, assert_that

from pipelines.testing.models import save_tiny_llava
from schemas import ImageRef
from schemas.scoring import BatchingConfig
from stages.core.caption_gate import Generation, gate_caption
from stages.models.captioner import Captioner, collate, format_prompt, load_processor, validate_model
from stages.recaption import CaptionModelHandler, GateDoFn, PrepareDoFn, Recaption
from tests.portable import portable_services, service_logs
from tests.stages.core.test_caption_gate import PROMPT, S, _config, _record

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny LLaVA checkpoints: random weights; greedy output forced to `</s>` at
    once (empty captions); forced to `cat` at every step (a loop); random
    weights without a chat template."""
    root = tmp_path_factory.mktemp("llava")
    return {
        "random": str(save_tiny_llava(root / "random", seed=0)),
        "eos": str(save_tiny_llava(root / "eos", constant_token="</s>")),
        "cat": str(save_tiny_llava(root / "cat", constant_token="cat")),
        "no_template": str(save_tiny_llava(root / "no_template", chat_template=False, seed=1)),
    }


def _png(seed: int, size=(48, 40), mode="RGB") -> bytes:
    pixels = np.random.RandomState(seed).randint(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels.squeeze(), mode).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """Five decodable images appended to one staging file (different sizes, one
    grayscale), plus two records whose bytes are unusable: a range inside the
    file holding no image, and a file that does not exist."""
    root = tmp_path_factory.mktemp("staging")
    path = root / "part-0.bin"
    blobs = [_png(i, size=(48 + 8 * i, 40)) for i in range(4)] + [_png(9, mode="L")]
    records, offset = [], 0
    with open(path, "wb") as f:
        for i, blob in enumerate(blobs):
            f.write(blob)
            records.append(_record(i, ImageRef(path=str(path), offset=offset, length=len(blob))))
            offset += len(blob)
        f.write(b"not an image at all" * 4)
    records.append(_record(5, ImageRef(path=str(path), offset=offset, length=40)))
    records.append(_record(6, ImageRef(path=str(root / "lost.bin"), offset=0, length=10)))
    images = [Image.open(io.BytesIO(blob)).convert("RGB") for blob in blobs]
    return records, images


# --------------------------------------------------------------------------- batching


def test_collate_left_pads_token_sequences_and_zero_pads_other_arrays():
    a = {"input_ids": np.array([[5, 6, 7]]), "attention_mask": np.ones((1, 3), int), "pixel_values": np.ones((1, 2, 3))}
    b = {"input_ids": np.array([[8]]), "attention_mask": np.ones((1, 1), int), "pixel_values": np.full((1, 1, 3), 2.0)}
    batch = collate([a, b], pad_token_id=1)
    np.testing.assert_array_equal(batch["input_ids"], [[5, 6, 7], [1, 1, 8]])
    np.testing.assert_array_equal(batch["attention_mask"], [[1, 1, 1], [0, 0, 1]])
    assert batch["pixel_values"].shape == (2, 2, 3)
    np.testing.assert_array_equal(batch["pixel_values"][1], [[2, 2, 2], [0, 0, 0]])


def _reference_caption(model, processor, image, prompt_text: str, max_new_tokens: int) -> tuple[str, bool]:
    """One image through transformers directly: processor -> greedy generate -> decode."""
    inputs = processor(images=image, text=prompt_text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    eos = model.generation_config.eos_token_id
    finished = eos in new
    if finished:
        new = new[: new.index(eos)]
    return processor.tokenizer.decode(new, skip_special_tokens=True).strip(), finished


@pytest.fixture(scope="module")
def reference(checkpoints, staged):
    """Per-image captions of the decodable staged images from transformers'
    single-image path, for the random checkpoint and max_new_tokens=8."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(checkpoints["random"])
    processor = AutoProcessor.from_pretrained(checkpoints["random"])
    prompt_text = format_prompt(processor, _config(checkpoints["random"]))
    _, images = staged
    return [_reference_caption(model, processor, image, prompt_text, 8) for image in images]


def test_batched_generation_matches_single_image_transformers(checkpoints, staged, reference):
    config = _config(checkpoints["random"])
    captioner = Captioner.load(config)
    processor = load_processor(config.model)
    prompt_text = format_prompt(processor, config)
    _, images = staged
    examples = [dict(processor(images=image, text=prompt_text, return_tensors="np")) for image in images]
    generations = captioner.generate(examples)
    assert [(g.text, g.finished) for g in generations] == reference
    assert all(0 < g.num_tokens <= config.max_new_tokens for g in generations)
    assert len({g.text for g in generations}) > 1, "random weights should caption different images differently"


def test_decoding_is_greedy_whatever_the_checkpoint_defaults(tmp_path, checkpoints, staged, reference):
    sampling = tmp_path / "sampling"
    shutil.copytree(checkpoints["random"], sampling)
    path = sampling / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "do_sample": True, "temperature": 5.0, "top_k": 0}))
    config = _config(str(sampling))
    processor = load_processor(config.model)
    prompt_text = format_prompt(processor, config)
    examples = [dict(processor(images=image, text=prompt_text, return_tensors="np")) for image in staged[1]]
    generations = Captioner.load(config).generate(examples)
    assert [(g.text, g.finished) for g in generations] == reference


def test_left_padding_does_not_change_captions(checkpoints, staged):
    """Prompts of different lengths in one batch (left-padded) caption as they do alone."""
    config = _config(checkpoints["random"])
    captioner = Captioner.load(config)
    processor = load_processor(config.model)
    _, images = staged
    prompts = ["USER: <image>\na photo ASSISTANT:", "USER: <image>\nwhat is in this picture of a city ASSISTANT:"]
    examples = [dict(processor(images=images[i], text=p, return_tensors="np")) for i, p in enumerate(prompts)]
    assert examples[0]["input_ids"].shape[1] != examples[1]["input_ids"].shape[1]
    alone = [captioner.generate([example])[0] for example in examples]
    assert captioner.generate(examples) == alone


def test_generation_flags_end_of_sequence_and_token_budget(checkpoints, staged):
    _, images = staged
    for name, expected in [("eos", Generation("", 1, True)), ("cat", Generation(" ".join(["cat"] * 5), 5, False))]:
        config = _config(checkpoints[name], max_new_tokens=5)
        processor = load_processor(config.model)
        example = dict(processor(images=images[0], text=format_prompt(processor, config), return_tensors="np"))
        assert Captioner.load(config).generate([example, example]) == [expected, expected]


def test_precision_and_device_choice(checkpoints, staged):
    captioner = Captioner.load(_config(checkpoints["cat"], precision="bf16", device="cpu", max_new_tokens=3))
    assert captioner.model.dtype == torch.bfloat16 and captioner.device.type == "cpu"
    processor = load_processor(checkpoints["cat"])
    example = dict(processor(images=staged[1][0], text="USER: <image>\nhi ASSISTANT:", return_tensors="np"))
    assert captioner.generate([example]) == [Generation("cat cat cat", 3, False)]
    assert Captioner.load(_config(checkpoints["cat"])).model.dtype == (
        torch.bfloat16 if torch.cuda.is_available() else torch.float32
    )
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="cuda"):
            Captioner.load(_config(checkpoints["cat"], device="cuda"))
        threads = torch.get_num_threads()
        try:
            Captioner.load(_config(checkpoints["cat"], cpu_threads=1))
            assert torch.get_num_threads() == 1
        finally:
            torch.set_num_threads(threads)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_device_uses_cuda_in_bf16(checkpoints, staged):
    """On a GPU worker `auto` picks CUDA and bf16, and the stage runs there end to end."""
    captioner = Captioner.load(_config(checkpoints["cat"], max_new_tokens=3))
    assert captioner.device.type == "cuda" and captioner.model.dtype == torch.bfloat16
    records = staged[0][:4]
    config = _config(checkpoints["cat"], max_new_tokens=3, max_repeats=0, reject_truncated=False, min_words=0)
    p = BeamTestPipeline(runner=FnApiRunner())
    out = p | beam.Create(records) | "Recaption" >> Recaption(config)
    assert_that(out, _check_records({r.key: (S.OK, "cat cat cat") for r in records}))
    p.run().wait_until_finish()


def test_prompt_formatting_uses_the_chat_template_or_the_configured_template(checkpoints):
    with_template = load_processor(checkpoints["random"])
    assert format_prompt(with_template, _config("m")) == f"USER: <image>\n{PROMPT} ASSISTANT:"
    custom = _config("m", prompt="a caption please", prompt_template="<image> Q: {prompt} A:", use_chat_template=False)
    assert format_prompt(with_template, custom) == "<image> Q: a caption please A:"
    without = load_processor(checkpoints["no_template"])
    assert format_prompt(without, _config("m", prompt="hello")) == "USER: <image>\nhello ASSISTANT:"


# --------------------------------------------------------------------------- validation


def test_validate_accepts_a_saved_checkpoint(checkpoints):
    validate_model(_config(checkpoints["random"]))
    validate_model(_config(checkpoints["no_template"]))


def test_validate_names_what_is_wrong(tmp_path, checkpoints, monkeypatch):
    import huggingface_hub.constants
    from transformers import LlamaConfig, LlamaForCausalLM

    def error(model: str, **kw) -> str:
        with pytest.raises(ValueError) as info:
            validate_model(_config(model, **kw))
        return str(info.value)

    assert "no such directory" in error(str(tmp_path / "nope"))
    (tmp_path / "weights.safetensors").write_bytes(b"x")
    assert "is a file" in error(str(tmp_path / "weights.safetensors"))
    (tmp_path / "empty").mkdir()
    assert "no config.json" in error(str(tmp_path / "empty"))
    assert "remote URLs" in error("gs://bucket/llava")

    no_weights = tmp_path / "no_weights"
    shutil.copytree(checkpoints["random"], no_weights)
    (no_weights / "model.safetensors").unlink()
    assert "no *.safetensors" in error(str(no_weights))

    broken = tmp_path / "broken"
    shutil.copytree(checkpoints["random"], broken)
    (broken / "config.json").write_text("{not json")
    assert "no readable config.json" in error(str(broken))

    text_only = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(text_only)
    message = error(str(text_only))
    assert "'llama'" in message and "AutoModelForImageTextToText" in message

    no_processor = tmp_path / "no_processor"
    shutil.copytree(checkpoints["random"], no_processor)
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja"):
        (no_processor / name).unlink()
    assert "processor" in error(str(no_processor))

    assert "lacks the image token" in error(
        checkpoints["random"], use_chat_template=False, prompt_template="USER: {prompt} ASSISTANT:"
    )

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert "neither a local directory nor reachable on the Hugging Face Hub" in error("some-org/no-such-llava")


def test_building_the_graph_reads_no_model_file(tmp_path):
    # The model folder is checked before the graph is built (pipelines.scoring.check_models),
    # not while it is: applying the transform to a missing folder builds the graph.
    p = beam.Pipeline()
    _ = p | beam.Create([_record(0, None)]) | "Recaption" >> Recaption(_config(str(tmp_path / "missing")))
    assert any(t.unique_name == "Recaption/Gate" for t in p.to_runner_api().components.transforms.values())


def test_a_bad_model_path_is_refused_by_beam_run_curate_before_any_work(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.cli import main
    from pipelines.scoring import check_models
    from schemas import CurateConfig

    missing = str(tmp_path / "missing")
    with pytest.raises(ValueError, match="no such directory"):
        check_models(CurateConfig(recaption=_config(missing)))
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/x.jpg"], "caption": ["a red bicycle"]}), tmp_path / "in.parquet")
    (tmp_path / "c.yaml").write_text(json.dumps({"recaption": {"model": missing}}))
    argv = ["run", "curate", "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"),
            "--config", str(tmp_path / "c.yaml"), "--allow-private-network"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"recaption.model {missing!r}: no such directory" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- Beam


def test_resource_hints_reach_every_recaption_step_in_the_pipeline_proto(checkpoints):
    config = _config(checkpoints["random"], accelerator="type:nvidia-l4;count:1;install-nvidia-driver", min_ram="20GB")
    p = beam.Pipeline()
    _ = p | beam.Create([_record(0, None)]) | "Recaption" >> Recaption(config)
    proto = p.to_runner_api()
    steps = {
        t.unique_name: t.environment_id
        for t in proto.components.transforms.values()
        if t.unique_name.startswith("Recaption/") and not t.subtransforms and t.environment_id
    }
    for step in ("Recaption/Prepare", "Recaption/Generate/BeamML_RunInference", "Recaption/Gate"):
        assert any(name == step or name.startswith(step + "/") for name in steps), (step, sorted(steps))
    assert len(set(steps.values())) == 1, f"recaption steps must share one environment to fuse: {steps}"
    hints = proto.components.environments[next(iter(steps.values()))].resource_hints
    assert hints[common_urns.resource_hints.ACCELERATOR.urn] == b"type:nvidia-l4;count:1;install-nvidia-driver"
    assert hints[common_urns.resource_hints.MIN_RAM_BYTES.urn] == b"20000000000"


def test_dofns_and_handler_pickle(checkpoints):
    config = _config(checkpoints["random"])
    for obj in (PrepareDoFn(config), GateDoFn(config), CaptionModelHandler(config)):
        clone = pickler.loads(pickler.dumps(obj))
        assert clone.config == config
    handler = CaptionModelHandler(config.model_copy(update={"batching": BatchingConfig(min_batch_size=2, max_batch_size=5)}))
    assert handler.batch_elements_kwargs() == {"min_batch_size": 2, "max_batch_size": 5}
    assert not handler.share_model_across_processes()
    shared = CaptionModelHandler(config.model_copy(update={"share_model_across_processes": True, "model_copies": 2}))
    assert shared.share_model_across_processes() and shared.model_copies() == 2


def _counters(result, step: str) -> dict[str, int]:
    counts: dict[str, int] = collections.Counter()
    query = result.metrics().query(MetricsFilter().with_namespace("recaption").with_step(step))
    for counter in query["counters"]:
        counts[counter.key.metric.name] += counter.committed
    return {name: count for name, count in counts.items() if count}


def _check_records(expected: dict[str, tuple[S, str | None]]):
    def check(records):
        got = {r.key: (r.recaption_status, r.caption_synthetic) for r in records}
        if got != expected:
            raise BeamAssertException(f"got {got}, expected {expected}")
        for r in records:
            if r.caption_original != f"alt text number {int(r.key)}":
                raise BeamAssertException(f"{r.key}: caption_original changed to {r.caption_original!r}")

    return check


def test_recaption_end_to_end_matches_transformers_and_counts_fallbacks(checkpoints, staged, reference):
    """Random weights: every decodable image gets exactly the caption (or the
    fallback) that transformers' single-image path + the gate give; unreadable
    images fall back; each outcome is counted as a Beam metric. (8 new tokens
    never reach end-of-sequence here, so truncation is not rejected, to compare
    captions; the known-output test below covers it.)"""
    records, _ = staged
    config = _config(
        checkpoints["random"], reject_truncated=False, batching=BatchingConfig(min_batch_size=2, max_batch_size=3)
    )
    expected = {}
    for record, (text, finished) in zip(records, reference):
        status = gate_caption(text, prompt=PROMPT, truncated=not finished, config=config)
        expected[record.key] = (status, text if status is S.OK else None)
    expected[records[5].key] = (S.UNREADABLE_IMAGE, None)
    expected[records[6].key] = (S.UNREADABLE_IMAGE, None)

    p = BeamTestPipeline(runner=FnApiRunner())
    out = p | beam.Create(records) | "Recaption" >> Recaption(config)
    assert_that(out, _check_records(expected))
    result = p.run()
    result.wait_until_finish()

    statuses = collections.Counter(status for status, _ in expected.values())
    assert statuses[S.OK] >= 2 and len(statuses) >= 3, f"the fixture should mix outcomes: {statuses}"
    want = {("captioned" if s is S.OK else f"fallback_{s.value}"): n for s, n in statuses.items()}
    assert _counters(result, "Recaption") == want


def test_gate_outcomes_end_to_end_on_models_with_known_outputs(checkpoints, staged):
    """Checkpoints whose greedy output is forced (`</s>` at once, `cat` forever)
    give each fallback reason deterministically through the whole transform."""
    records = staged[0][:3]
    cat, eos = checkpoints["cat"], checkpoints["eos"]
    cases = {
        "Empty": (_config(eos), S.EMPTY, None),
        "Looping": (_config(cat, max_new_tokens=6), S.LOOPING, None),
        "Truncated": (_config(cat, max_new_tokens=6, max_repeats=0), S.TRUNCATED, None),
        "Echo": (_config(cat, max_new_tokens=1, prompt="cat", min_words=0), S.PROMPT_ECHO, None),
        "TooShort": (_config(cat, max_new_tokens=2, max_repeats=0, reject_truncated=False), S.TOO_SHORT, None),
        "Accepted": (
            _config(cat, max_new_tokens=4, max_repeats=0, reject_truncated=False, use_chat_template=False),
            S.OK, "cat cat cat cat",
        ),
    }
    p = BeamTestPipeline(runner=FnApiRunner())
    inputs = p | beam.Create(records)
    for label, (config, status, caption) in cases.items():
        out = inputs | label >> Recaption(config)
        assert_that(out, _check_records({r.key: (status, caption) for r in records}), label=f"Check{label}")
    result = p.run()
    result.wait_until_finish()
    for label, (_, status, _) in cases.items():
        name = "captioned" if status is S.OK else f"fallback_{status.value}"
        assert _counters(result, label) == {name: len(records)}, label


def test_model_shared_across_processes(checkpoints, staged):
    """share_model_across_processes: the Captioner lives in Beam's
    multi_process_shared server and RunInference calls it through a proxy."""
    records = staged[0][:2]
    config = _config(checkpoints["cat"], max_new_tokens=4, max_repeats=0, reject_truncated=False,
                     share_model_across_processes=True)
    p = BeamTestPipeline(runner=FnApiRunner())
    out = p | beam.Create(records) | "Recaption" >> Recaption(config)
    assert_that(out, _check_records({r.key: (S.OK, "cat cat cat cat") for r in records}))
    p.run().wait_until_finish()


def test_shards_carry_both_captions(tmp_path, checkpoints, staged):
    """Through the shard writer: KEY.txt holds the synthetic caption where the
    gate accepted it and the alt text where it fell back; KEY.json holds both
    captions and the recaption status."""
    import tarfile

    from schemas import ShardsConfig
    from stages.shards import WriteShards

    records = staged[0][:5]
    accepted = _config(checkpoints["cat"], max_new_tokens=4, max_repeats=0, reject_truncated=False)
    with BeamTestPipeline(runner=FnApiRunner()) as p:
        inputs = p | beam.Create(records)
        captioned = inputs | "Keep3" >> beam.Filter(lambda r: int(r.key) < 3) | "Accepted" >> Recaption(accepted)
        empty = inputs | "Rest" >> beam.Filter(lambda r: int(r.key) >= 3) | "Empty" >> Recaption(_config(checkpoints["eos"]))
        _ = (captioned, empty) | beam.Flatten() | WriteShards(
            str(tmp_path), ShardsConfig(samples_per_shard=10, writers=1, caption_source="synthetic"), {}
        )
    (shard,) = (tmp_path / "shards").glob("*.tar")
    with tarfile.open(shard) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    for record in records:
        txt = members[f"{record.key}.txt"].decode()
        meta = json.loads(members[f"{record.key}.json"])
        assert meta["caption_original"] == record.caption_original
        if int(record.key) < 3:
            assert (txt, meta["caption_synthetic"], meta["recaption_status"]) == ("cat cat cat cat",) * 2 + ("ok",)
        else:
            assert (txt, meta["caption_synthetic"], meta["recaption_status"]) == (record.caption_original, None, "empty")


@pytest.mark.portable
@pytest.mark.slow  # ~1 min of worker start-up; the FnApiRunner tests above cover the same code in-process
def test_recaption_on_the_portable_runner(portable_services, checkpoints, staged):  # noqa: F811
    """Workers in other processes, with the project only from the staged sdist,
    unpickle the stage, load the model from its directory and caption."""
    from apache_beam.internal.cloudpickle import cloudpickle
    from apache_beam.runners.runner import PipelineState

    from pipelines.runner import create_runner, make_pipeline_options

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the matcher below; workers cannot import tests
    records = [*staged[0][:3], staged[0][6]]
    config = _config(checkpoints["cat"], max_new_tokens=4, max_repeats=0, reject_truncated=False)
    expected = {r.key: (S.OK, "cat cat cat cat") for r in records[:3]}
    expected[records[3].key] = (S.UNREADABLE_IMAGE, None)
    options = make_pipeline_options(portable_services.argv)
    p = beam.Pipeline(runner=create_runner(options), options=options)
    out = p | beam.Create(records) | "Recaption" >> Recaption(config)
    assert_that(out, _check_records(expected))
    result = p.run()
    state = result.wait_until_finish(duration=180_000)
    assert state == PipelineState.DONE, service_logs(portable_services.workdir)
    assert _counters(result, "Recaption") == {"captioned": 3, "fallback_unreadable_image": 1}

"""`beam run select`: re-apply selection thresholds to a finished curate output,
without running any model.

    beam run select --input DIR --output DIR2 [--config select.yaml]
                    [--min-clip-similarity X] [--max-nsfw-score X] [--max-punsafe X]
                    [--max-pwatermark X] [--min-aesthetic-score X] [--keep-unselected]
                    [--semantic-threshold X [--semantic-clusters K]]

Thresholds start from the ones DIR was made with (its `config.json`); a flag
replaces one, `none` disables it. DIR2 gets the same layout as a curate output
(`shards/`, `index.parquet`, `rejects.parquet`, `report.json`, `config.json`),
written by the same code (`WriteShards`, `write_outputs`).

What it reads: every sample in the shards `DIR/shards/*.json` manifests name (its `KEY.json` is the full
record with its scores; the image is copied from the tar by byte range, never
decoded), plus `DIR/unselected/shards/*.tar` when the curate run kept the
samples its selection dropped (`select.keep_unselected`). Rejections of every
other stage are copied from `DIR/rejects.parquet` unchanged, so the funnel
still adds up to the same input rows.

What it can and cannot reproduce:
- Same thresholds: the same kept keys, index rows and rejects as DIR (shard
  numbering may differ: shards are filled in arrival order).
- Stricter thresholds (each one tightened, kept, or newly set): the kept set
  is exactly what curate with those thresholds would keep: a kept sample is
  re-judged from its stored scores, and one DIR dropped would fail again. The
  latter keeps its original rejection (a fresh curate might name an earlier
  check as the reason).
- Looser thresholds: only samples whose bytes DIR kept can come back. Without
  `DIR/unselected/`, a sample DIR's selection dropped stays rejected with its
  original reason (its image was never written); the run counts them in the
  `select/not_readmittable` counter and warns. Curate with
  `select.keep_unselected: true` to keep that option open.
- Semantic dedup (`--semantic-threshold X`): re-run from the embeddings DIR
  kept (`DIR/embeddings/`, read with numpy; no model is loaded) with the
  centroids DIR saved (`DIR/semantic/centroids.npy`; fitted anew when DIR has
  none or with `--semantic-clusters K`), before
  the thresholds, as in curate. Only samples whose embeddings DIR kept take
  part: a lower threshold drops more of them; samples an earlier semantic
  dedup dropped keep their rejection (their images are gone), and samples
  read back from `unselected/` have no stored embedding and are not compared.
  Without the flag, DIR's embeddings are copied to DIR2 for the samples it keeps.
- Nothing is re-scored or re-captioned: scores are the stored ones, and a
  sample re-admitted from `unselected/` keeps the captions it had (selection
  runs before recaptioning, so it has no synthetic caption; KEY.txt falls back
  to the alt text).
"""

from __future__ import annotations

import argparse
import json
import logging

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from pydantic import ValidationError

from pipelines import outputs, runs
from pipelines.funnel import print_summary
from pipelines.report import add_report
from pipelines.scoring import UNSELECTED_DIR, ScoringConfigError, check_thresholds, computed_scores
from schemas import CurateConfig, Rejection, Stage
from schemas.scoring import SelectConfig
from stages.core.select import drop_would_pass
from stages.select import ReadShardRecords, apply_select
from stages.shards import SHARDS_DIR, TMP_DIR, WriteShards
from stages.staging import cleanup_after

LOG = logging.getLogger(__name__)

class SelectError(ValueError):
    """The select run cannot start: bad input folder or thresholds."""


def _read_json(path: str) -> dict:
    try:
        with FileSystems.open(path, compression_type="uncompressed") as f:
            return json.loads(f.read())
    except Exception as err:
        raise SelectError(f"{path}: cannot read ({err}); is the input a finished curate output?") from err


def load_source(input_dir: str) -> tuple[dict, CurateConfig]:
    """The input's config.json and the CurateConfig in it."""
    source = _read_json(FileSystems.join(input_dir, outputs.CONFIG))
    try:
        return source, CurateConfig.model_validate(source.get("curate", {}))
    except ValidationError as err:
        raise SelectError(f"{FileSystems.join(input_dir, outputs.CONFIG)}: not a curate config: {err}") from err


def _shards_glob(folder: str) -> str:
    """The shard manifests: a shard is complete iff its manifest exists (see stages/shards.py)."""
    return FileSystems.join(folder, SHARDS_DIR, "*.json")


class _NotReadmittable(beam.DoFn):
    """Counts carried-over selection rejects the new thresholds would admit on
    the check that dropped them (their bytes are gone, so they stay rejected)."""

    def __init__(self, config: SelectConfig):
        self.config = config
        self.count = Metrics.counter(Stage.SELECT.value, "not_readmittable")

    def process(self, rejection: Rejection):
        if drop_would_pass(rejection, self.config):
            self.count.inc()
        yield rejection


def _carry_over(element):
    """(key, {"rejects": [...], "rescored": [...]}) -> the old rejections that
    still stand: all of them unless the sample was read back from unselected/."""
    _, grouped = element
    if grouped["rescored"]:
        return [r for r in grouped["rejects"] if r.stage != Stage.SELECT]
    return grouped["rejects"]


def build_select(
    pipeline: beam.Pipeline,
    input_dir: str,
    output_dir: str,
    select_config: SelectConfig,
    run_info: dict | None = None,
    semantic_threshold: float | None = None,
    semantic_clusters: int | None = None,
) -> tuple[beam.PCollection, dict]:
    """Add the select graph to `pipeline`; returns the PCollection holding the
    Report, and the resolved config for `output_dir/config.json`.

    Checks the input and the thresholds before returning (so errors come
    before the pipeline runs). `run_info` is added to the config (e.g. the
    Beam arguments).
    """
    if FileSystems.join(input_dir.rstrip("/"), "") == FileSystems.join(output_dir.rstrip("/"), ""):
        raise SelectError(f"--output {output_dir} must differ from --input: the new shards copy bytes from the old ones")
    source, curate = load_source(input_dir)
    report_in = outputs.read_report(input_dir)
    try:
        check_thresholds(select_config, computed_scores(curate.scoring), where=f"the run that made {input_dir}")
    except ScoringConfigError as err:
        raise SelectError(str(err)) from err
    unselected_dir = FileSystems.join(input_dir, UNSELECTED_DIR)
    has_unselected = bool(FileSystems.match([_shards_glob(unselected_dir)])[0].metadata_list)

    from stages.embeddings import ReadEmbeddings, WriteEmbeddings, has_embeddings, has_text_embeddings

    embedded = has_embeddings(input_dir)
    semantic = None
    if semantic_threshold is not None:
        from schemas.config import SemanticDedupConfig
        from stages.semantic_dedup import SemanticDedup, centroids_path

        if not embedded:
            raise SelectError(
                f"--semantic-threshold needs {input_dir}/embeddings/ (curate with scoring.clip and embeddings.enabled)"
            )
        previous = curate.dedup.semantic or SemanticDedupConfig()
        saved = centroids_path(input_dir)
        try:
            update = {"threshold": semantic_threshold}
            if semantic_clusters is not None:
                update["clusters"] = semantic_clusters  # new centroids: the saved ones have another k
                update["centroids"] = None
            elif FileSystems.exists(saved):
                update["centroids"] = saved
            semantic_config = previous.model_copy(update=update)
            SemanticDedupConfig.model_validate(semantic_config.model_dump())
        except ValidationError as err:
            raise SelectError(f"--semantic-threshold: {err}") from err
        semantic = SemanticDedup(semantic_config, output_dir)
        curate = curate.model_copy(update={"dedup": curate.dedup.model_copy(update={"semantic": semantic_config})})
    config = curate.model_copy(update={"select": select_config})
    extra = {k: v for k, v in source.items() if k != "curate"}
    extra["selected_from"] = {"input_dir": input_dir, "select": curate.select.model_dump(mode="json"), **(run_info or {})}
    run_config = outputs.resolved_config(config, extra)

    records = pipeline | "ReadShards" >> ReadShardRecords(_shards_glob(input_dir))
    old_rejects = (
        pipeline
        | "ReadRejects" >> beam.io.ReadFromParquet(FileSystems.join(input_dir, outputs.REJECTS_TABLE))
        | "ToRejections" >> beam.Map(Rejection.model_validate)
    )
    if has_unselected:
        unselected = pipeline | "ReadUnselected" >> ReadShardRecords(_shards_glob(unselected_dir))
        records = (records, unselected) | "AllScored" >> beam.Flatten()
        # Rejections of samples we have back are re-decided below; join on key (metadata only).
        carried = (
            {
                "rejects": old_rejects | "RejectByKey" >> beam.Map(lambda r: (r.key, r)),
                "rescored": unselected | "UnselectedKey" >> beam.Map(lambda r: (r.key, None)),
            }
            | "JoinUnselected" >> beam.CoGroupByKey()
            | "StillRejected" >> beam.FlatMap(_carry_over)
        )
    else:
        carried = old_rejects
    carried = carried | "CountNotReadmittable" >> beam.ParDo(_NotReadmittable(select_config))

    rows = pipeline | "ReadEmbeddings" >> ReadEmbeddings(input_dir) if embedded else None
    semantic_rejects = []
    if semantic is not None:
        records, rejected = (records, rows) | "SemanticDedup" >> semantic
        semantic_rejects.append(rejected)
    kept, select_rejects, dropped = apply_select(
        records, "Select", select_config, emit_unselected=select_config.keep_unselected
    )
    written, manifests, shard_rejects = kept | "Shards" >> WriteShards(output_dir, curate.shards, run_config)
    done = []
    if rows is not None:
        embeddings_config = curate.embeddings.model_copy(update={"text": has_text_embeddings(input_dir)})
        # Samples re-admitted from unselected/ have no stored embedding: written without one.
        embeddings_written = (written, rows) | "Embeddings" >> WriteEmbeddings(
            output_dir, embeddings_config, require_all=False
        )
        done.append(embeddings_written | "CountEmbeddings" >> beam.combiners.Count.Globally())
    if dropped is not None:
        unselected_written, _, _ = dropped | "UnselectedShards" >> WriteShards(
            FileSystems.join(output_dir, UNSELECTED_DIR), curate.shards, run_config
        )
        done.append(unselected_written | "CountUnselected" >> beam.combiners.Count.Globally())
    all_rejects = (carried, *semantic_rejects, select_rejects, shard_rejects) | "AllRejects" >> beam.Flatten()
    input_rows = pipeline | "InputRows" >> beam.Create([report_in.input_rows])
    # The source's unreadable input files are still missing from this dataset.
    input_errors = pipeline | "InputErrors" >> beam.Create(report_in.input_errors)
    report = outputs.write_outputs(output_dir, input_rows, written, manifests, all_rejects, input_errors)
    html_written = add_report(output_dir, report, written, all_rejects, records)
    tmp_dirs = [FileSystems.join(output_dir, SHARDS_DIR, TMP_DIR)]
    if dropped is not None:
        tmp_dirs.append(FileSystems.join(output_dir, UNSELECTED_DIR, SHARDS_DIR, TMP_DIR))
    finished = (html_written, *done) | "Finished" >> beam.Flatten() if done else html_written
    cleanup_after(finished, tmp_dirs)
    return report, run_config


# ---------------------------------------------------------------- CLI

_FLAGS = {
    "min_clip_similarity": "keep clip_similarity >= X",
    "max_nsfw_score": "keep nsfw_score (NudeNet) <= X",
    "max_punsafe": "keep punsafe (CLIP NSFW head) <= X",
    "max_pwatermark": "keep pwatermark <= X",
    "min_aesthetic_score": "keep aesthetic_score >= X",
}


def _threshold(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="beam run select",
        description="Re-apply selection thresholds to a scored curate output without running any model. "
        "Thresholds default to the ones the input was made with; `none` disables one.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="What it reads:" + __doc__.split("What it reads:", 1)[1],
    )
    parser.add_argument("--input", required=True, help="A finished curate (or select) output folder.")
    parser.add_argument("--output", required=True, help="New output folder (must differ from --input).")
    parser.add_argument("--config", help="YAML file with a `select:` mapping (or the select keys at top level).")
    for name, text in _FLAGS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=_threshold, default=argparse.SUPPRESS, metavar="X", help=text)
    parser.add_argument(
        "--semantic-threshold",
        type=float,
        default=None,
        metavar="X",
        help="Re-run semantic dedup at cosine X from the input's saved embeddings (no model needed).",
    )
    parser.add_argument(
        "--semantic-clusters",
        type=int,
        default=None,
        metavar="K",
        help="With --semantic-threshold: fit K k-means clusters anew instead of the input's saved centroids.",
    )
    parser.add_argument(
        "--keep-unselected",
        action="store_true",
        default=argparse.SUPPRESS,
        help="Also write the samples this run drops to OUTPUT/unselected/ (so a later select can loosen again).",
    )
    runs.add_run_arguments(parser)
    return parser


def resolve_select_config(input_dir: str, args: argparse.Namespace) -> SelectConfig:
    """The input's thresholds, then the YAML file's, then the flags'."""
    _, curate = load_source(input_dir)
    values = curate.select.model_dump()
    if getattr(args, "config", None):
        import yaml

        try:
            with open(args.config, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as err:
            raise SelectError(f"{args.config}: {err}") from err
        values.update(data.get("select", data) if isinstance(data, dict) else {})
    for name in [*_FLAGS, "keep_unselected"]:
        if hasattr(args, name):
            values[name] = getattr(args, name)
    try:
        return SelectConfig.model_validate(values)
    except ValidationError as err:
        raise SelectError(f"select thresholds: {err}") from err


def run_select(argv: list[str], test_pipeline=None) -> int:
    """`beam run select ...`; returns the exit status (see `pipelines/runs.py`)."""
    return runs.run_main(
        "beam run select", _parser(), argv, lambda args, beam_argv: _run_select(args, beam_argv, test_pipeline)
    )


def _run_select(args, beam_argv: list[str], test_pipeline) -> int:
    from pipelines.runner import create_runner, make_pipeline_options

    runs.check_options("beam run select", beam_argv)
    try:
        options = make_pipeline_options(beam_argv)
        FileSystems.set_options(options)  # the input is read before the pipeline exists
        select_config = resolve_select_config(args.input, args)
        _, source_config = load_source(args.input)
        p = test_pipeline or beam.Pipeline(runner=create_runner(options), options=options)
        _, run_config = build_select(
            p,
            args.input,
            args.output,
            select_config,
            {"beam_args": beam_argv},
            semantic_threshold=args.semantic_threshold,
            semantic_clusters=args.semantic_clusters,
        )
    except (SelectError, ValueError) as err:
        raise runs.RunRefused(str(err)) from err
    runs.claim_output(args.output, overwrite=args.overwrite, command="select", details={"input": args.input})
    outputs.write_config(args.output, run_config)
    from pipelines.progress import run_with_progress

    result = run_with_progress(p, "select", enabled=args.progress_interval > 0, log_interval=args.progress_interval)
    not_readmittable = _counter(result, "not_readmittable")
    if not_readmittable:
        LOG.warning(
            "%d sample(s) dropped by selection in %s would pass the new thresholds but their images were not kept; "
            "curate with select.keep_unselected to be able to loosen thresholds",
            not_readmittable,
            args.input,
        )
    report = outputs.read_report(args.output)
    runs.finish_run(args.output, "finished")
    print_summary(args.output, report, outputs.INDEX)
    return runs.exit_status(report, source_config.max_error_rate)


def _counter(result, name: str) -> int:
    from apache_beam.metrics.metric import MetricsFilter

    try:
        counters = result.metrics().query(MetricsFilter().with_namespace(Stage.SELECT.value).with_name(name))["counters"]
    except Exception:  # some runners do not report metrics
        return 0
    return sum(c.committed or 0 for c in counters)

"""`beam run curate`: URL lists in, WebDataset shards and tables out.

Stages, cheapest first (each labelled, each with its rejects side output):

    Read -> UrlHygiene -> CaptionHygiene -> Crawl (by host: fetch, decode, stage bytes, commit parts)
         -> Dedup -> [Decontaminate] -> [model stages]
         -> WriteShards -> index.parquet, rejects.parquet, report.json, report.html
                        -> [embeddings/ (with CLIP), stages/embeddings.py]

Caption hygiene runs before the crawl because it needs no pixels: a row with
`IMG_4782.jpg` as its alt text costs no fetch. Everything that holds image
bytes (fetch, decode, stage) runs in one DoFn call per crawl key, with no
shuffle inside; see `stages/crawl.py` for the grouping by host,
`stages/units.py` for the committed parts that `--resume` skips, and
`stages/staging.py` for how the bytes reach the shard writers.
"""

from __future__ import annotations

import argparse
import logging

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from pipelines import outputs, runs
from pipelines.funnel import print_summary
from pipelines.report import add_report
from pipelines.scoring import UNSELECTED_DIR, ModelStages, check_models
from schemas import CurateConfig, SampleRecord
from schemas.overrides import set_dotted
from stages.base import apply_filter
from stages.caption import CaptionHygieneDoFn
from stages.decontaminate import DecontaminateByPhash, eval_items
from stages.dedup import Deduplicate
from stages.embeddings import WriteEmbeddings
from stages.core.read import make_key
from stages.read import ReadUrlLists, match_inputs
from stages.shards import SHARDS_DIR, TMP_DIR, WriteShards
from stages.staging import cleanup_after, staging_dir
from stages.units import CrawlCommitted, parts_dir
from stages.url import UrlHygiene

LOG = logging.getLogger(__name__)

# What dedup across runs reads of the dataset's samples (`--append`).
EXISTING_COLUMNS = [
    "key", "url", "caption_original", "source_file", "source_row", "original_width", "original_height",
    "image_sha256", "phash", "status",
]


class ConfigError(ValueError):
    pass


def load_config(path: str | None, overrides: dict | None = None) -> CurateConfig:
    """Read a YAML config (every key optional) and apply CLI overrides
    (dotted keys, e.g. {"crawl.allow_private_network": True})."""
    data = runs.read_yaml_mapping(path, ConfigError) if path else {}
    try:
        for dotted, value in (overrides or {}).items():
            set_dotted(data, dotted, value)
        return CurateConfig.model_validate(data)
    except ValueError as err:  # pydantic's ValidationError, or an override into a value
        raise ConfigError(f"{path or 'config'}: {err}") from err


def _model_stages(config: CurateConfig, output_dir: str | None = None) -> ModelStages | None:
    """The scoring/selection/recaption composite, when any of it is configured."""
    stages = ModelStages(config, output_dir)
    return stages if stages.enabled else None


def build_curate(
    p: beam.Pipeline,
    input_pattern: str,
    output_dir: str,
    config: CurateConfig,
    run_config: dict,
    source=None,
    append: dict | None = None,
):
    """Add the curate graph to `p`; returns the PCollection holding the Report.

    `source`: (records, rejects) PCollections from an upstream graph (`beam run
    extract-curate`), read instead of the URL lists at `input_pattern`.
    `append`: run.json's `append` section (`pipelines/runs.append_output`): the
    run adds to the dataset already in `output_dir`."""
    first_ordinal = append["first_file_ordinal"] if append else 0
    if source is not None:
        records, read_rejects = source
        input_errors = None
    else:
        records, read_rejects, input_errors = p | "Read" >> ReadUrlLists(input_pattern, config.read, first_ordinal)
    input_rows = (
        (records, read_rejects)
        | "InputRows" >> beam.Flatten()
        | "CountInputRows" >> beam.combiners.Count.Globally()
    )
    existing = existing_urls = None
    if append:
        # The dataset's samples (metadata only), for URL and image dedup across runs.
        existing = outputs.read_table(
            p, FileSystems.join(append["base"], outputs.INDEX), "ExistingIndex", EXISTING_COLUMNS
        ) | "ExistingSamples" >> beam.Map(outputs.from_row, SampleRecord)
        existing_urls = existing | "ExistingUrls" >> beam.Map(lambda r: (r.url, r.key))
    records, url_rejects = records | "UrlHygiene" >> UrlHygiene(config.url, config.decode, existing_urls)
    records, caption_rejects = apply_filter(
        records, "CaptionHygiene", CaptionHygieneDoFn(config.caption), config.max_error_rate
    )
    # Grouped by host into crawl keys (the per-host budgets hold for the whole
    # job), fetched, decoded, hashed and staged, committed in parts under
    # DIR/_parts/ so that --resume fetches no committed row again.
    staged, crawl_rejects = records | "Crawl" >> CrawlCommitted(
        output_dir, config.crawl, config.decode, config.checkpoint, config.max_error_rate
    )
    if existing is not None:
        # Existing samples outrank new ones in dedup (stages/dedup.py), so an
        # overlap is dropped naming the existing sample; they leave no output.
        staged = (staged, existing) | "WithExisting" >> beam.Flatten()
    kept, dedup_rejects = staged | "Dedup" >> Deduplicate(config.dedup)
    if existing is not None:
        first_key = make_key(first_ordinal, 0)
        kept = kept | "OnlyNewSamples" >> beam.Filter(lambda r: r.status != "kept")
        dedup_rejects = dedup_rejects | "OnlyNewRejects" >> beam.Filter(lambda r, first: r.key >= first, first_key)
    rejects = [read_rejects, url_rejects, caption_rejects, crawl_rejects, dedup_rejects]
    if config.dedup.eval_sets:
        # Samples within the pHash threshold of an evaluation image (stages/decontaminate.py).
        kept, eval_rejects = kept | "Decontaminate" >> DecontaminateByPhash(config.dedup, eval_items(config.dedup))
        rejects.append(eval_rejects)

    model_stages = _model_stages(config, output_dir)
    unselected_written = None
    if model_stages is not None:
        kept, model_rejects = kept | "Models" >> model_stages
        rejects.append(model_rejects)
        if model_stages.unselected is not None:
            # Samples the thresholds dropped stay in rejects.parquet; their
            # images are kept under DIR/unselected/ so `beam run select` can
            # loosen the thresholds later without crawling again. (Their rows are
            # already counted as select rejects, so a lost one is not counted twice.)
            unselected_written, _, _ = model_stages.unselected | "UnselectedShards" >> WriteShards(
                FileSystems.join(output_dir, UNSELECTED_DIR),
                config.shards,
                run_config,
                append["first_unselected_shard"] if append else 0,
            )

    written, manifests, shard_rejects = kept | "Shards" >> WriteShards(
        output_dir, config.shards, run_config, append["first_shard"] if append else 0
    )
    rejects.append(shard_rejects)
    embeddings_written = None
    if model_stages is not None and model_stages.embeddings is not None and config.embeddings.enabled:
        # DIR/embeddings/: the kept samples' CLIP embeddings (stages/embeddings.py).
        embeddings_written = (written, model_stages.embeddings) | "Embeddings" >> WriteEmbeddings(
            output_dir, config.embeddings
        )
    all_rejects = tuple(rejects) | "AllRejects" >> beam.Flatten()

    report = outputs.write_outputs(
        output_dir, input_rows, written, manifests, all_rejects, input_errors, append["base"] if append else None
    )
    # report.html reads sampled images back from the staging files: before cleanup.
    html_written = add_report(output_dir, report, written, all_rejects, staged)
    done = [html_written | "ReportDone" >> beam.Map(lambda _: None)]
    temporary = [staging_dir(output_dir), parts_dir(output_dir), FileSystems.join(output_dir, SHARDS_DIR, TMP_DIR)]
    if append:
        temporary.append(append["base"])
    if embeddings_written is not None:
        done.append(embeddings_written | "EmbeddingsDone" >> beam.Map(lambda _: None))
    if unselected_written is not None:
        done.append(unselected_written | "UnselectedDone" >> beam.Map(lambda _: None))
        temporary.append(FileSystems.join(output_dir, UNSELECTED_DIR, SHARDS_DIR, TMP_DIR))
    cleanup_after(tuple(done) | "AllDone" >> beam.Flatten(), temporary)
    return report


# ---- the runner: `beam run curate` ----------------------------------------------------------

DESCRIPTION = (
    "URL lists (url + alt text) -> crawled, filtered, deduplicated (and, when configured, scored and "
    "recaptioned) WebDataset shards, index.parquet, rejects.parquet, report.json."
)

_BEAM_OPTIONS_HELP = """\
Beam pipeline options (passed through to Beam; the common ones):
  --runner NAME               DirectRunner (default, offline), PortableRunner, DataflowRunner, FlinkRunner
  --direct_num_workers N      local parallelism (0 = one per core)
  --direct_running_mode M     in_memory | multi_processing (multi_threading: one worker only)
  --job_endpoint HOST:PORT    PortableRunner job service
  --environment_type T        DOCKER | PROCESS | EXTERNAL | LOOPBACK
  --environment_config C      image, boot command or worker pool address
  --setup_file PATH           the project's pyproject.toml, staged to remote workers
  --project, --region, --temp_location, --staging_location, --max_num_workers, --sdk_container_image  (Dataflow)
Run `beam run curate --help-beam` for every Beam option.
"""


def _curate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="beam run curate",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every config key and its default: `beam run curate --print-config`.\n\n" + _BEAM_OPTIONS_HELP,
    )
    parser.add_argument("--input", required=True, help="URL list: one file or a glob (parquet, csv, tsv, jsonl, optionally .gz); any Beam FileSystems path.")
    parser.add_argument("--output", required=True, help="Output folder (local, gs://, s3://): shards/, index.parquet, rejects.parquet, report.json, config.json.")
    parser.add_argument("--config", help="YAML config; every key optional (see --print-config for all keys and defaults).")
    parser.add_argument(
        "--allow-private-network",
        action="store_true",
        help="Let the crawler fetch from loopback, private, link-local and reserved addresses (tests, demos, your own intranet). Off by default.",
    )
    runs.add_run_arguments(parser)
    parser.add_argument(
        "--resume",
        action="store_true",
        help="Continue the killed or failed run in --output (same --config and --input): committed rows are not fetched again.",
    )
    parser.add_argument(
        "--append",
        action="store_true",
        help="Add --input to the finished dataset in --output (same config): rows whose URL or image is already in it "
        "are rejected as duplicates of the existing sample; new shards are numbered after the existing ones.",
    )
    return parser


def run_curate(argv: list[str], test_pipeline=None) -> int:
    """`beam run curate ...` (after `--print-config`/`--help-beam`, which the CLI
    answers itself); returns the exit status (see `pipelines/runs.py`)."""
    return runs.run_main(
        "beam run curate", _curate_parser(), argv, lambda args, beam_argv: _run_curate(args, beam_argv, test_pipeline)
    )


def _run_curate(args, beam_argv: list[str], test_pipeline) -> int:
    from pipelines.runner import create_runner, make_pipeline_options

    runs.check_options("beam run curate", beam_argv)
    chosen = [flag for flag, on in (("--overwrite", args.overwrite), ("--resume", args.resume), ("--append", args.append)) if on]
    if len(chosen) > 1:
        raise runs.RunRefused(f"{' and '.join(chosen)} cannot be combined: choose one")
    overrides = {"crawl.allow_private_network": True} if args.allow_private_network else {}
    try:
        options = make_pipeline_options(beam_argv)
        # Before reading the config: a gs:// or s3:// config file needs the file system
        # options (--s3_endpoint_url, credentials...) that Beam otherwise sets only when
        # the pipeline object is made.
        FileSystems.set_options(options)
        config = load_config(args.config, overrides)
        check_models(config)
        run_config = outputs.resolved_config(config, {"input": args.input, "beam_args": beam_argv})
        # What the folder holds decides how the run starts (read only; the folder
        # changes once the graph is known to build).
        run = None
        if args.resume:
            run = runs.check_resume(args.output, run_config)
        elif args.append:
            if config.embeddings.enabled and config.scoring.clip is not None:
                raise runs.RunRefused(
                    "--append: datasets with CLIP embeddings (embeddings/) cannot be appended to yet; "
                    "curate the new URL lists into their own folder"
                )
            run = runs.check_append(args.output, run_config, len(match_inputs(args.input)))
        p = test_pipeline or beam.Pipeline(runner=create_runner(options), options=options)
        build_curate(p, args.input, args.output, config, run_config, append=run.get("append") if run else None)
    except ValueError as err:
        # Config, input and model-path problems are all ValueErrors raised while
        # the graph is built: report them before any work starts.
        logging.getLogger(__name__).debug("pipeline construction failed", exc_info=True)
        raise runs.RunRefused(str(err)) from err
    if args.resume:
        runs.start_resume(args.output, run)
    elif args.append:
        runs.start_append(args.output, run)
    else:
        runs.claim_output(
            args.output,
            overwrite=args.overwrite,
            command="curate",
            details={"input": args.input, "next_file_ordinal": len(match_inputs(args.input))},
        )
    outputs.write_config(args.output, run_config)
    from pipelines.progress import run_with_progress

    run_with_progress(p, "curate", enabled=args.progress_interval > 0, log_interval=args.progress_interval)
    report = outputs.read_report(args.output)
    runs.finish_run(args.output, "finished")
    print_summary(args.output, report, outputs.INDEX)
    return runs.exit_status(report, config.max_error_rate)

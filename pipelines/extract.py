"""`beam run extract`: WARC/WAT files or HTML page lists in, image-text pairs out.

    ReadSources (one file per work unit: records -> pages -> <img> -> pairs)
      -> DedupPairs (exact (URL, caption), then a per-URL caption cap)
      -> DIR/pairs-SSSSS-of-NNNNN.parquet, DIR/rejects/rejects.parquet,
         DIR/report.json, DIR/config.json

`beam run curate --input 'DIR/*.parquet'` reads the pairs as they are.
`beam run extract-curate` hands the pairs to the curate graph in the same
pipeline instead (extract's report and rejects go to DIR/extract/).
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import sys

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from pydantic import BaseModel, ValidationError

from pipelines import outputs, runs
from schemas import Provenance, SampleRecord
from schemas.extract import DEDUP_REASONS, IMAGE_REASONS, PAGE_REASONS, ExtractConfig, ExtractRejection, ExtractReport, ImagePair
from stages.extract import DedupPairs, ReadSources
from stages.core.read import make_key

LOG = logging.getLogger(__name__)
PAIRS_PREFIX = "pairs"
REJECTS_TABLE = "rejects/rejects.parquet"
REPORT = "report.json"
CONFIG = "config.json"


class ConfigError(ValueError):
    pass


class AccountingError(RuntimeError):
    """A record, page or image counted in no place or in two."""


def load_config(path: str | None) -> ExtractConfig:
    """Read a YAML extract config (every key optional)."""
    data = runs.read_yaml_mapping(path, ConfigError) if path else {}
    try:
        return ExtractConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{path or 'config'}: {err}") from err


def build_report(input_files: int, file_counts: dict, reject_counts: dict, pairs: int) -> ExtractReport:
    other = {k.split(":", 1)[1]: v for k, v in sorted(file_counts.items()) if k.startswith("other:")}
    rejects = {r.value: reject_counts.get(r.value, 0) for r in (*PAGE_REASONS, *IMAGE_REASONS, *DEDUP_REASONS)}
    tallied = {k.split(":", 1)[1]: v for k, v in file_counts.items() if k.startswith("reject:")}
    records, pages = file_counts.get("records", 0), file_counts.get("pages", 0)
    images, candidates = file_counts.get("images", 0), file_counts.get("candidates", 0)
    ok = (
        records == sum(other.values()) + pages + sum(rejects[r.value] for r in PAGE_REASONS)
        and images == candidates + sum(rejects[r.value] for r in IMAGE_REASONS)
        and candidates == pairs + sum(rejects[r.value] for r in DEDUP_REASONS)
        and all(tallied.get(k, 0) == rejects.get(k, 0) for k in set(tallied) | {r.value for r in (*PAGE_REASONS, *IMAGE_REASONS)})
    )
    return ExtractReport(
        input_files=input_files, records=records, other_records=other, pages=pages, images=images,
        candidates=candidates, pairs=pairs, rejects=rejects, accounting_ok=ok,
    )


class _WriteReport(beam.DoFn):
    def __init__(self, output_dir: str, input_files: int):
        self.output_dir = output_dir
        self.input_files = input_files

    def process(self, _, file_counts, reject_counts, pairs):
        report = build_report(self.input_files, file_counts, dict(reject_counts), pairs)
        path = FileSystems.join(self.output_dir, REPORT)
        with FileSystems.create(path, compression_type="uncompressed") as f:
            f.write(report.model_dump_json(indent=2).encode())
        if not report.accounting_ok:
            raise AccountingError(f"extract counts do not add up; see {path}")
        yield report


def _sum_counts(dicts) -> dict:
    total: collections.Counter = collections.Counter()
    for d in dicts:
        total.update(d)
    return dict(total)


def _write_parquet(pcoll, path_prefix: str, model: type[BaseModel], label: str, **kwargs):
    return (
        pcoll
        | f"{label}/ToRows" >> beam.Map(outputs.to_row)
        | f"{label}/Write" >> beam.io.WriteToParquet(path_prefix, outputs.arrow_schema(model), **kwargs)
    )


class ExtractGraph(beam.PTransform):
    """The extract graph (one composite, so it chains with curate's labels);
    `expand` returns (pairs, report PCollection). Inputs are matched and
    checked when it is constructed."""

    def __init__(self, input_pattern: str, output_dir: str, config: ExtractConfig, write_pairs: bool = True):
        super().__init__()
        self.sources = ReadSources(input_pattern, config)
        self.output_dir, self.config, self.write_pairs = output_dir, config, write_pairs

    def expand(self, pbegin):
        output_dir, config = self.output_dir, self.config
        candidates, page_rejects, file_counts = pbegin | "Read" >> self.sources
        pairs, dedup_rejects = candidates | "Dedup" >> DedupPairs(config.dedup)
        rejects = (page_rejects, dedup_rejects) | "AllRejects" >> beam.Flatten()

        written = [
            _write_parquet(rejects, FileSystems.join(output_dir, REJECTS_TABLE), ExtractRejection, "Rejects",
                           num_shards=1, shard_name_template="")
        ]
        if self.write_pairs:
            written.append(
                _write_parquet(pairs, FileSystems.join(output_dir, PAIRS_PREFIX), ImagePair, "Pairs",
                               file_name_suffix=".parquet", num_shards=config.output.num_files)
            )
        counts = file_counts | "SumCounts" >> beam.CombineGlobally(_sum_counts)
        reject_counts = (
            rejects | "ReasonKey" >> beam.Map(lambda r: (r.reason.value, 1)) | "CountReasons" >> beam.CombinePerKey(sum)
        )
        pair_count = pairs | "CountPairs" >> beam.combiners.Count.Globally()
        # The report says the run is complete only once every table is written.
        done = tuple(written) | "TablesWritten" >> beam.Flatten() | "AllWritten" >> beam.combiners.Count.Globally()
        report = done | "Report" >> beam.ParDo(
            _WriteReport(output_dir, len(self.sources.paths)),
            beam.pvalue.AsSingleton(counts),
            beam.pvalue.AsList(reject_counts),
            beam.pvalue.AsSingleton(pair_count),
        )
        return pairs, report


def build_extract(p: beam.Pipeline, input_pattern: str, output_dir: str, config: ExtractConfig, write_pairs: bool = True):
    """Add the extract graph to `p`; returns (pairs, report PCollection).

    With `write_pairs=False` (extract-curate) the pairs are not written; the
    report and rejects still are, under `output_dir`."""
    return p | "Extract" >> ExtractGraph(input_pattern, output_dir, config, write_pairs)


def to_sample_record(pair: ImagePair) -> SampleRecord:
    """A pair as curate's input record (extract-curate): keyed by input file
    ordinal and the image's index in that file, as curate keys (file, row)."""
    return SampleRecord(
        key=make_key(pair.file_ordinal, pair.image_index),
        url=pair.url,
        caption_original=pair.caption,
        declared_width=pair.width,
        declared_height=pair.height,
        provenance=Provenance(source_file=pair.source_file, source_row=pair.image_index),
    )


def write_config(output_dir: str, resolved: dict) -> None:
    if not FileSystems.exists(output_dir):
        FileSystems.mkdirs(output_dir)
    with FileSystems.create(FileSystems.join(output_dir, CONFIG), compression_type="uncompressed") as f:
        f.write(json.dumps(resolved, indent=2, sort_keys=True).encode())


def read_report(output_dir: str) -> ExtractReport:
    with FileSystems.open(FileSystems.join(output_dir, REPORT), compression_type="uncompressed") as f:
        return ExtractReport.model_validate_json(f.read())


def print_report(report: ExtractReport, out=None) -> None:
    out = out or sys.stdout
    print(f"{'input files':<24} {report.input_files:>10}", file=out)
    print(f"{'records':<24} {report.records:>10}", file=out)
    for kind, n in report.other_records.items():
        print(f"  {'not a page: ' + kind:<22} {-n:>10}", file=out)
    for reason in PAGE_REASONS:
        print(f"  {reason.value:<22} {-report.rejects[reason.value]:>10}", file=out)
    print(f"{'pages':<24} {report.pages:>10}", file=out)
    print(f"{'images':<24} {report.images:>10}", file=out)
    for reason in (*IMAGE_REASONS, *DEDUP_REASONS):
        print(f"  {reason.value:<22} {-report.rejects[reason.value]:>10}", file=out)
    print(f"{'pairs':<24} {report.pairs:>10}", file=out)
    print(f"{'accounting':<24} {'ok' if report.accounting_ok else 'MISMATCH':>10}", file=out)


# ------------------------------------------------------------------ command line


def _parser(prog: str, curate: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--input", required=True,
        help="WARC (.warc, .warc.gz), WAT (.wat.gz, .warc.wat.gz) files or page lists (.tsv: FILE<TAB>PAGE_URL); a path or glob, any Beam FileSystems path.",
    )
    parser.add_argument("--output", required=True, help="Output folder (local, gs://, s3://).")
    if curate:
        parser.add_argument("--extract-config", help="YAML extract config (see `beam run extract --print-config`).")
        parser.add_argument("--config", help="YAML curate config (see `beam run curate --print-config`).")
        parser.add_argument("--allow-private-network", action="store_true", help="As for `beam run curate`.")
    else:
        parser.add_argument("--config", help="YAML config; every key optional (see --print-config).")
    runs.add_run_arguments(parser)
    return parser


def _print_config() -> int:
    from pipelines.cli import config_reference

    print(config_reference(ExtractConfig))
    return 0


def run_extract(argv: list[str], test_pipeline=None) -> int:
    """`beam run extract ...`; returns the exit status (see `pipelines/runs.py`)."""
    if "--print-config" in argv:
        return _print_config()
    return runs.run_main(
        "beam run extract", _parser("beam run extract", curate=False), argv,
        lambda args, beam_argv: _run_extract(args, beam_argv, test_pipeline),
    )  # fmt: skip


def _run_extract(args, beam_argv: list[str], test_pipeline) -> int:
    from pipelines.progress import run_with_progress
    from pipelines.runner import create_runner, make_pipeline_options

    runs.check_options("beam run extract", beam_argv)
    try:
        options = make_pipeline_options(beam_argv)
        FileSystems.set_options(options)  # the config may live on gs:// or s3://
        config = load_config(args.config)
        p = test_pipeline or beam.Pipeline(runner=create_runner(options), options=options)
        build_extract(p, args.input, args.output, config)
    except ValueError as err:
        LOG.debug("pipeline construction failed", exc_info=True)
        raise runs.RunRefused(str(err)) from err
    runs.claim_output(args.output, overwrite=args.overwrite, command="extract", details={"input": args.input})
    write_config(args.output, {"extract": config.model_dump(mode="json"), "input": args.input, "beam_args": beam_argv})
    # The progress line follows curate's counters; extract's own are in its report.
    run_with_progress(p, "extract", enabled=False)
    report = read_report(args.output)
    runs.finish_run(args.output, "finished")
    print_report(report)
    print(f"pairs: {args.output.rstrip('/')}/{PAIRS_PREFIX}-*.parquet  (beam run curate --input '{args.output.rstrip('/')}/*.parquet')")
    return runs.EXIT_OK if report.accounting_ok else runs.EXIT_ACCOUNTING


def run_extract_curate(argv: list[str], test_pipeline=None) -> int:
    """extract and curate in one pipeline: no intermediate pairs folder."""
    return runs.run_main(
        "beam run extract-curate", _parser("beam run extract-curate", curate=True), argv,
        lambda args, beam_argv: _run_extract_curate(args, beam_argv, test_pipeline),
    )  # fmt: skip


def _run_extract_curate(args, beam_argv: list[str], test_pipeline) -> int:
    from pipelines.curate import build_curate
    from pipelines.curate import load_config as load_curate_config
    from pipelines.funnel import print_funnel
    from pipelines.progress import run_with_progress
    from pipelines.runner import create_runner, make_pipeline_options

    runs.check_options("beam run extract-curate", beam_argv)
    extract_dir = FileSystems.join(args.output, "extract")
    overrides = {"crawl.allow_private_network": True} if args.allow_private_network else {}
    try:
        options = make_pipeline_options(beam_argv)
        FileSystems.set_options(options)  # the configs may live on gs:// or s3://
        extract_config = load_config(args.extract_config)
        curate_config = load_curate_config(args.config, overrides)
        run_config = outputs.resolved_config(
            curate_config, {"extract": extract_config.model_dump(mode="json"), "input": args.input, "beam_args": beam_argv}
        )
        p = test_pipeline or beam.Pipeline(runner=create_runner(options), options=options)
        pairs, _ = build_extract(p, args.input, extract_dir, extract_config, write_pairs=False)
        records = pairs | "ToCurateRecords" >> beam.Map(to_sample_record)
        no_read_rejects = p | "NoReadRejects" >> beam.Create([])
        build_curate(p, args.input, args.output, curate_config, run_config, source=(records, no_read_rejects))
    except ValueError as err:
        LOG.debug("pipeline construction failed", exc_info=True)
        raise runs.RunRefused(str(err)) from err
    runs.claim_output(args.output, overwrite=args.overwrite, command="extract-curate", details={"input": args.input})
    outputs.write_config(args.output, run_config)
    run_with_progress(p, "extract-curate", enabled=args.progress_interval > 0, log_interval=args.progress_interval)
    extract_report = read_report(extract_dir)
    print_report(extract_report)
    report = outputs.read_report(args.output)
    runs.finish_run(args.output, "finished")
    print_funnel(report)
    if not extract_report.accounting_ok:
        return runs.EXIT_ACCOUNTING
    return runs.exit_status(report, curate_config.max_error_rate)

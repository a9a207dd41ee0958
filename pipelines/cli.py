"""The `beam` command line.

    beam list                                 the pipelines and what they do
    beam run curate --input PATH --output DIR [--config FILE.yaml]
                    [--allow-private-network] [any Beam pipeline option]
    beam run select --input DIR --output DIR2 [thresholds]
    beam report DIR                           rebuild DIR/report.html
    beam schemas [--write | --check]          the records' JSON Schemas

Options this parser does not know are handed to Beam (`--runner`,
`--direct_num_workers`, `--project`, `--setup_file`, ...). DirectRunner is the
default and runs offline (see `pipelines/runner.py`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

PIPELINES = {
    "curate": "URL lists (url + alt text) -> crawled, filtered, deduplicated (and, when configured, scored and "
    "recaptioned) WebDataset shards, index.parquet, rejects.parquet, report.json.",
    "select": "Re-apply selection thresholds to a scored curate output without running any model.",
}

_BEAM_OPTIONS_HELP = """\
Beam pipeline options (passed through to Beam; the common ones):
  --runner NAME               DirectRunner (default, offline), PortableRunner, DataflowRunner, FlinkRunner
  --direct_num_workers N      local parallelism (0 = one per core)
  --direct_running_mode M     in_memory | multi_threading | multi_processing
  --job_endpoint HOST:PORT    PortableRunner job service
  --environment_type T        DOCKER | PROCESS | EXTERNAL | LOOPBACK
  --environment_config C      image, boot command or worker pool address
  --setup_file PATH           the project's pyproject.toml, staged to remote workers
  --project, --region, --temp_location, --staging_location, --max_num_workers, --sdk_container_image  (Dataflow)
Run `beam run curate --help-beam` for every Beam option.
"""

SCHEMAS_DIR = Path(__file__).resolve().parent.parent / "schemas" / "json"


def _curate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="beam run curate",
        description=PIPELINES["curate"],
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
    add_progress_argument(parser)
    return parser


def add_progress_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--progress-interval",
        type=float,
        default=30.0,
        metavar="S",
        help="Live progress (local runner): a line refreshed in place on a terminal, else a log line every S seconds "
        "(default 30); 0 turns it off.",
    )


def config_reference(model=None, indent: int = 0) -> str:
    """The config as commented YAML: every key, its default and its description."""
    import yaml
    from pydantic import BaseModel

    from schemas import CurateConfig

    model = model or CurateConfig
    pad = "  " * indent
    lines = []
    if model.__doc__ and indent == 0:
        lines += [f"# {line.strip()}" for line in model.__doc__.strip().splitlines()]
    for name, field in model.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            doc = (type(default).__doc__ or "").strip().splitlines()
            lines.append(f"{pad}{name}:" + (f"  # {doc[0].strip()}" if doc else ""))
            lines.append(config_reference(type(default), indent + 1))
            continue
        if field.description:
            lines += [f"{pad}# {chunk}" for chunk in _wrap(field.description, 100 - len(pad))]
        dumped = yaml.safe_dump({name: default.model_dump(mode="json") if isinstance(default, BaseModel) else default},
                                default_flow_style=True, width=1000).strip()
        lines.append(f"{pad}{dumped[1:-1] if dumped.startswith('{') else dumped}")
    return "\n".join(lines)


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width=max(40, width))


def _print_config() -> int:
    print(config_reference())
    return 0


def _print_beam_help() -> int:
    from apache_beam.options.pipeline_options import PipelineOptions

    parser = argparse.ArgumentParser(prog="beam run curate", add_help=False)
    for cls in PipelineOptions.__subclasses__():
        cls._add_argparse_args(parser)
    parser.print_help()
    return 0


def print_funnel(report, out=None) -> None:
    out = out or sys.stdout
    width = max([len(f"{row.stage.value}/{row.reason.value}") for row in report.funnel] + [24])
    line = "-" * (width + 12)
    print(line, file=out)
    print(f"{'input rows':<{width}} {report.input_rows:>10}", file=out)
    stage = None
    for row in report.funnel:
        if row.stage != stage:
            stage = row.stage
            print(f"{stage.value}:", file=out)
        print(f"  {row.reason.value:<{width - 2}} {-row.count:>10}", file=out)
    print(line, file=out)
    print(f"{'kept':<{width}} {report.kept:>10}  in {report.shards} shard(s)", file=out)
    print(f"{'rejected':<{width}} {report.rejected:>10}", file=out)
    status = "ok" if report.accounting_ok else "MISMATCH"
    print(f"{'accounting':<{width}} {status:>10}  ({report.input_rows} = {report.kept} + {report.rejected})", file=out)


def run_curate(argv: list[str], test_pipeline=None) -> int:
    if "--print-config" in argv:
        return _print_config()
    if "--help-beam" in argv:
        return _print_beam_help()
    args, beam_argv = _curate_parser().parse_known_args(argv)

    import apache_beam as beam

    from pipelines import outputs
    from pipelines.curate import build_curate, load_config
    from pipelines.runner import create_runner, make_pipeline_options

    overrides = {"crawl.allow_private_network": True} if args.allow_private_network else {}
    try:
        config = load_config(args.config, overrides)
        options = make_pipeline_options(beam_argv)
        run_config = outputs.resolved_config(config, {"input": args.input, "beam_args": beam_argv})
        p = test_pipeline or beam.Pipeline(runner=create_runner(options), options=options)
        build_curate(p, args.input, args.output, config, run_config)
        outputs.write_config(args.output, run_config)
    except ValueError as err:
        # Config, input and model-path problems are all ValueErrors raised while
        # the graph is built: report them before any work starts.
        logging.getLogger(__name__).debug("pipeline construction failed", exc_info=True)
        print(f"beam run curate: error: {err}", file=sys.stderr)
        return 2
    from pipelines.progress import run_with_progress

    run_with_progress(p, "curate", enabled=args.progress_interval > 0, log_interval=args.progress_interval)
    report = outputs.read_report(args.output)
    print_funnel(report)
    print(f"shards: {args.output.rstrip('/')}/shards/  index: {args.output.rstrip('/')}/{outputs.INDEX}")
    return 0 if report.accounting_ok else 1


def run_schemas(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="beam schemas", description="JSON Schemas of the records, checked in under schemas/json/.")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="(Re)write schemas/json/*.json from the models.")
    mode.add_argument("--check", action="store_true", help="Exit 1 if the checked-in files differ from the models.")
    args = parser.parse_args(argv)
    from schemas import JSON_SCHEMA_MODELS

    stale = []
    for name, model in JSON_SCHEMA_MODELS.items():
        text = json.dumps(model.model_json_schema(), indent=2, sort_keys=True) + "\n"
        path = SCHEMAS_DIR / f"{name}.schema.json"
        if args.write:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        elif args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path.name)
        else:
            print(f"# {path.name}\n{text}")
    if stale:
        print(f"stale JSON Schemas: {stale}; run `make schemas`", file=sys.stderr)
        return 1
    return 0


class _HarmlessBeamWarnings(logging.Filter):
    """Drops the warnings Beam logs at import that say nothing about the run
    (the first thing a user sees should be the run itself)."""

    PREFIXES = (
        # apache_beam.io.gcp.internal.clients.bigquery without google-apitools: BigQuery is not used.
        "apitools not found",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.PREFIXES)


def setup_logging() -> None:
    """Logging for the CLI, set up before Beam is imported (Beam logs through
    the root logger at import time)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    if not any(isinstance(f, _HarmlessBeamWarnings) for f in root.filters):
        root.addFilter(_HarmlessBeamWarnings())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    setup_logging()
    usage = "usage: beam {list | run PIPELINE ... | report DIR | schemas}\n"
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "list":
        for name, text in PIPELINES.items():
            print(f"{name:<8} {text}")
        return 0
    if command == "schemas":
        return run_schemas(rest)
    if command == "report":
        from pipelines.report import run_report

        return run_report(rest)
    if command == "run":
        if not rest or rest[0] not in PIPELINES:
            print(f"{usage}pipelines: {', '.join(PIPELINES)}", file=sys.stderr)
            return 2
        if rest[0] == "curate":
            return run_curate(rest[1:])
        from pipelines.select import run_select  # noqa: PLC0415 - built with the scoring stages

        return run_select(rest[1:])
    print(usage, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())

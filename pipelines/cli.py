"""The `beam` command line.

    beam list                                 the pipelines and what they do
    beam run curate --input PATH --output DIR [--config FILE.yaml]
                    [--allow-private-network] [any Beam pipeline option]
    beam run select --input DIR --output DIR2 [thresholds]
    beam run extract --input 'crawl/*.warc.gz' --output DIR [--config FILE.yaml]
    beam run extract-curate --input 'crawl/*.warc.gz' --output DIR [--extract-config E.yaml] [--config C.yaml]
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
    "extract": "WARC/WAT files or HTML page lists -> image-text pair parquet files (url, caption, width, height, "
    "provenance) that `beam run curate` reads, rejects.parquet, report.json.",
    "extract-curate": "extract, then curate on its pairs in the same pipeline (no intermediate folder).",
}

SCHEMAS_DIR = Path(__file__).resolve().parent.parent / "schemas" / "json"


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
            print(f"{name:<15} {text}")
        return 0
    if command == "schemas":
        return run_schemas(rest)
    if command == "report":
        from pipelines.report_html import run_report  # noqa: PLC0415 - imports Beam

        return run_report(rest)
    if command == "run":
        if not rest or rest[0] not in PIPELINES:
            print(f"{usage}pipelines: {', '.join(PIPELINES)}", file=sys.stderr)
            return 2
        if rest[0] == "curate":
            if "--print-config" in rest:
                return _print_config()
            if "--help-beam" in rest:
                return _print_beam_help()
            from pipelines.curate import run_curate  # noqa: PLC0415 - imports Beam

            return run_curate(rest[1:])
        if rest[0] in ("extract", "extract-curate"):
            from pipelines.extract import run_extract, run_extract_curate  # noqa: PLC0415

            return (run_extract if rest[0] == "extract" else run_extract_curate)(rest[1:])
        from pipelines.select import run_select  # noqa: PLC0415 - built with the scoring stages

        return run_select(rest[1:])
    print(usage, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())

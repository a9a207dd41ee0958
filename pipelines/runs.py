"""What every `beam run` shares before and after the pipeline: who owns the
output folder, which options are real, exit statuses, and errors a user reads.

Exit statuses of `beam run curate` and `beam run select`:

    0  finished; every input row is in a shard or in rejects.parquet
    1  finished, but the accounting identity (input rows = kept + rejected) failed
    2  refused before any work: bad arguments, config, input, or output folder
    3  finished, but some input files failed part-way (report.json `input_errors`)
    4  the run failed (a worker error, or more unexpected row errors than
       `max_error_rate`); the output folder holds no complete dataset

**An output folder belongs to one run.** A run writes `DIR/run.json` first
(its id, command, input and start time) and marks it finished at the end. A
run into a folder that already holds anything is refused unless
`--overwrite` is given, which deletes what an earlier imagemill run wrote
there (`OWNED_NAMES`, and only those) and nothing else; a folder that is not
an imagemill output (no `run.json` or `config.json`) is never deleted from.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import sys
import traceback
import uuid
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone

EXIT_OK = 0
EXIT_ACCOUNTING = 1
EXIT_REFUSED = 2
EXIT_INPUT_ERRORS = 3
EXIT_FAILED = 4

RUN_FILE = "run.json"
# Everything a curate, select or extract run writes at the top of its output
# folder (fnmatch patterns).
OWNED_NAMES = (
    RUN_FILE,
    "config.json",
    "report.json",
    "report.html",
    "report_files",
    "index.parquet",
    "rejects.parquet",
    "shards",
    "unselected",
    "embeddings",
    "semantic",
    "_staging",
    "pairs-*.parquet",  # beam run extract
    "rejects",  # beam run extract
    "extract",  # beam run extract-curate
)

logger = logging.getLogger(__name__)


class RunRefused(ValueError):
    """A run that must not start; the message is the one line the user sees."""


# -- options ----------------------------------------------------------------------


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every `beam run` pipeline shares."""
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="The output folder holds an earlier run's output: delete what that run wrote (and only that) first.",
    )
    parser.add_argument("--verbose", action="store_true", help="Show tracebacks and debug logs.")
    parser.add_argument(
        "--progress-interval",
        type=float,
        default=30.0,
        metavar="S",
        help="Live progress (local runner): a line refreshed in place on a terminal, else a log line every S seconds "
        "(default 30); 0 turns it off.",
    )


def _option_classes() -> Iterable[type]:
    from apache_beam.options.pipeline_options import PipelineOptions

    seen: set[type] = set()
    todo = list(PipelineOptions.__subclasses__())
    while todo:
        cls = todo.pop()
        if cls not in seen:
            seen.add(cls)
            todo.extend(cls.__subclasses__())
    return seen


def unknown_options(beam_argv: Sequence[str]) -> list[str]:
    """The `--flags` in `beam_argv` that no Beam options class defines.

    Beam itself only logs "Discarding unparseable args" and runs without
    them, so `--resmue` would silently become a fresh run."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for cls in _option_classes():
        try:
            cls._add_argparse_args(parser)
        except argparse.ArgumentError:
            continue  # a flag two option classes both define: already registered
    _, rest = parser.parse_known_args(list(beam_argv))
    return [arg.split("=", 1)[0] for arg in rest if arg.startswith("-")]


def check_options(prog: str, beam_argv: Sequence[str]) -> None:
    unknown = unknown_options(beam_argv)
    if unknown:
        raise RunRefused(
            f"unknown option(s) {', '.join(unknown)}: neither {prog} nor Beam knows them "
            f"(`{prog} --help`, `{prog} --help-beam`)"
        )


# -- the output folder --------------------------------------------------------------


def _entries(output_dir: str) -> list[str]:
    """Every file under `output_dir` (`**`: in subfolders too). No `exists()`
    first: on GCS and S3 a prefix with objects under it does not "exist"."""
    from apache_beam.io.filesystems import FileSystems

    try:
        matches = FileSystems.match([FileSystems.join(output_dir, "**")])
    except Exception as err:  # noqa: BLE001 - shown as one line; never taken for "empty"
        raise RunRefused(f"{output_dir}: cannot list the output folder: {err}") from err
    return [m.path for r in matches for m in r.metadata_list]


def _top_level_name(output_dir: str, path: str) -> str:
    rest = path[len(output_dir.rstrip("/")) :].lstrip("/")
    return rest.split("/", 1)[0]


def claim_output(output_dir: str, *, overwrite: bool, command: str, details: dict) -> str:
    """Make `output_dir` this run's: refuse a used folder unless `overwrite`,
    delete an earlier run's outputs if so, then write `run.json`. Returns the run id."""
    from apache_beam.io.filesystems import FileSystems

    entries = _entries(output_dir)
    if entries:
        names = sorted({_top_level_name(output_dir, path) for path in entries})
        ours = RUN_FILE in names or "config.json" in names
        if not overwrite:
            what = "an earlier imagemill run's output" if ours else f"{len(names)} entr{'y' if len(names) == 1 else 'ies'}"
            raise RunRefused(
                f"{output_dir} is not empty (it holds {what}: {', '.join(names[:6])}{', ...' if len(names) > 6 else ''}); "
                "choose an empty folder, or pass --overwrite to delete what the earlier run wrote there"
            )
        if not ours:
            raise RunRefused(
                f"{output_dir} is not an imagemill output (no {RUN_FILE} or config.json); --overwrite only deletes "
                "what an earlier run wrote, so choose an empty folder"
            )
        owned_names = [name for name in names if any(fnmatch.fnmatchcase(name, pattern) for pattern in OWNED_NAMES)]
        # File by file: object stores have no folders to delete, only objects.
        owned = [path for path in entries if _top_level_name(output_dir, path) in owned_names]
        logger.warning("--overwrite: deleting %d files of an earlier run (%s)", len(owned), ", ".join(owned_names))
        try:
            FileSystems.delete(owned)
        except Exception as err:  # noqa: BLE001 - shown as one line
            raise RunRefused(f"{output_dir}: cannot delete the earlier run's outputs: {err}") from err
    run_id = uuid.uuid4().hex
    write_run_file(output_dir, {"run_id": run_id, "command": command, "status": "running",
                                "started_at": datetime.now(timezone.utc).isoformat(), **details})
    return run_id


def write_run_file(output_dir: str, content: dict) -> None:
    from apache_beam.io.filesystems import FileSystems

    try:
        if not FileSystems.exists(output_dir):
            FileSystems.mkdirs(output_dir)
        with FileSystems.create(FileSystems.join(output_dir, RUN_FILE), compression_type="uncompressed") as f:
            f.write(json.dumps(content, indent=2, sort_keys=True).encode())
    except Exception as err:  # noqa: BLE001 - an unwritable output is one line, not a traceback
        raise RunRefused(f"{output_dir}: cannot write the output folder: {err}") from err


def read_run_file(output_dir: str) -> dict:
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(FileSystems.join(output_dir, RUN_FILE), compression_type="uncompressed") as f:
        return json.loads(f.read())


def finish_run(output_dir: str, status: str) -> None:
    content = read_run_file(output_dir)
    content.update(status=status, finished_at=datetime.now(timezone.utc).isoformat())
    write_run_file(output_dir, content)


def read_yaml_mapping(path: str, error: type[Exception]) -> dict:
    """A YAML config file (any Beam FileSystems path) as a mapping; `error`
    (a ValueError subclass) names the file and what is wrong with it."""
    import apache_beam as beam
    import yaml
    from apache_beam.io.filesystems import FileSystems

    try:
        with FileSystems.open(path, compression_type="uncompressed") as f:
            data = yaml.safe_load(f.read().decode("utf-8")) or {}
    except (OSError, beam.io.filesystem.BeamIOError) as err:
        raise error(f"{path}: cannot read config: {err}") from err
    except yaml.YAMLError as err:
        raise error(f"{path}: invalid YAML: {err}") from err
    if not isinstance(data, dict):
        raise error(f"{path}: expected a mapping at the top level")
    return data


# -- exit statuses and errors -------------------------------------------------------


def run_main(prog: str, parser: argparse.ArgumentParser, argv: list[str], body: Callable[..., int]) -> int:
    """Parse `argv` (what the parser does not know goes to Beam), then run
    `body(args, beam_argv)` under `guarded`."""
    args, beam_argv = parser.parse_known_args(argv)
    if args.verbose:
        logging.getLogger().setLevel(logging.DEBUG)
    return guarded(prog, args.verbose, lambda: body(args, beam_argv))


def exit_status(report, max_error_rate: float) -> int:
    """The exit status of a finished run, from its report (see the module docstring)."""
    internal = sum(row.count for row in report.funnel if row.reason.value == "internal_error")
    if internal and report.input_rows and internal > max_error_rate * report.input_rows:
        print(
            f"error: {internal} of {report.input_rows} rows raised unexpected errors (over max_error_rate="
            f"{max_error_rate}); see rejects.parquet, reason internal_error",
            file=sys.stderr,
        )
        return EXIT_FAILED
    if not report.accounting_ok:
        return EXIT_ACCOUNTING
    if report.input_errors:
        for error in report.input_errors:
            print(f"input error: {error.path}: {error.error} (after {error.rows_read} rows)", file=sys.stderr)
        return EXIT_INPUT_ERRORS
    return EXIT_OK


def guarded(prog: str, verbose: bool, body: Callable[[], int]) -> int:
    """Run `body`; an exception becomes one line on stderr (the traceback with
    --verbose) and the matching exit status."""
    try:
        return body()
    except RunRefused as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the point: no traceback unless asked for
        if verbose:
            traceback.print_exc()
        message = str(err).strip().splitlines()
        # Runners wrap a worker's exception in pages of context; its last line is the cause.
        line = message[-1] if message else type(err).__name__
        print(f"{prog}: error: the run failed: {line[:500]}", file=sys.stderr)
        if not verbose:
            print(f"{prog}: run again with --verbose for the traceback", file=sys.stderr)
        return EXIT_FAILED

"""What every `beam run` shares before and after the pipeline: who owns the
output folder, which options are real, exit statuses, and errors a user reads.

Exit statuses of `beam run curate` and `beam run select`:

    0  finished; every input row is in a shard or in rejects.parquet
    1  finished, but the accounting identity (input rows = kept + rejected) failed
    2  refused before any work: bad arguments, config, input, or output folder
    3  finished, but some input files failed part-way (report.json `input_errors`)
    4  the run failed (a worker error, or more unexpected row errors than
       `max_error_rate`); the output folder holds no complete dataset

**An output folder belongs to one dataset.** A run writes `DIR/run.json`
first (its id, command, input and start time) and marks it finished at the
end. A run into a folder that already holds anything is refused unless one of:

- `--overwrite`: delete what an earlier imagemill run wrote there
  (`OWNED_NAMES`, and only those) and start afresh; a folder that is not an
  imagemill output (no `run.json` or `config.json`) is never deleted from;
- `--resume` (curate): continue the killed or failed run in the folder. The
  config and input must be the same (differences are named). Its committed
  parts (`stages/units.py`) are kept and not fetched again; everything its
  finalize steps wrote is deleted and written again from all committed rows;
- `--append` (curate): add new URL lists to the finished dataset in the
  folder, under the same config. Rows whose URL or image is already in the
  dataset are rejected naming the existing sample; new keys and shard numbers
  follow the dataset's; existing shards are not touched. `run.json` keeps the
  history of the runs that made the dataset.
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
    "_parts",
    "_append_base",
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


# What a resumed run keeps of the killed one: its identity and config, and the
# committed parts with the staged bytes they refer to (`stages/units.py`).
# Everything else it owned is rewritten by the finalize steps.
APPEND_BASE = "_append_base"
MAX_INPUT_FILES = 100_000
KEPT_ON_RESUME = (RUN_FILE, "config.json", "_parts", "_staging", APPEND_BASE)


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved configs."""
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new)):
            found += config_differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return found
    return [] if old == new else [prefix.rstrip(".")]


def _describe_differences(old: dict, new: dict, keys: Sequence[str]) -> list[str]:
    return [name for key in keys for name in config_differences(old.get(key), new.get(key), f"{key}.")]


def _read_json(path: str) -> dict:
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path, compression_type="uncompressed") as f:
        return json.loads(f.read())


def _earlier_run(output_dir: str, flag: str) -> tuple[dict, dict]:
    """(run.json, config.json) of the run in `output_dir`; refuses if there is none."""
    from apache_beam.io.filesystems import FileSystems

    try:
        return read_run_file(output_dir), _read_json(FileSystems.join(output_dir, "config.json"))
    except Exception as err:  # noqa: BLE001 - one line: there is nothing to continue
        raise RunRefused(f"{flag}: {output_dir} holds no earlier curate run ({RUN_FILE} or config.json unreadable: {err})") from err


def _delete_entries(output_dir: str, paths: list[str], why: str) -> None:
    from apache_beam.io.filesystems import FileSystems

    if not paths:
        return
    logger.info("%s: deleting %d files", why, len(paths))
    try:
        FileSystems.delete(paths)
    except Exception as err:  # noqa: BLE001 - shown as one line
        raise RunRefused(f"{output_dir}: cannot delete {why}: {err}") from err


def check_resume(output_dir: str, run_config: dict) -> dict:
    """The run.json of the killed or failed run in `output_dir` that `--resume`
    continues; refuses (naming the differences) unless the config and input
    are the earlier run's. Reads only; `start_resume` changes the folder."""
    run, config = _earlier_run(output_dir, "--resume")
    if run.get("command") != "curate":
        raise RunRefused(f"--resume: {output_dir} holds a `{run.get('command')}` run; only curate runs resume")
    if run.get("status") == "finished":
        raise RunRefused(
            f"--resume: the run in {output_dir} already finished; nothing to resume (--append adds new URL lists)"
        )
    differences = _describe_differences(config, run_config, ("curate", "input"))
    if differences:
        raise RunRefused(
            f"--resume: the config differs from the run being resumed in {', '.join(differences[:8])}"
            f"{', ...' if len(differences) > 8 else ''}; resume with the same --config and --input"
        )
    return run


def start_resume(output_dir: str, run: dict) -> None:
    """Delete what the killed run's finalize steps wrote (shards, tables,
    reports...; for an `--append` run only what it added), keep the committed
    parts and their staged bytes, and mark the run running again."""
    stale = []
    for path in _entries(output_dir):
        name = _top_level_name(output_dir, path)
        if name in KEPT_ON_RESUME or not any(fnmatch.fnmatchcase(name, pattern) for pattern in OWNED_NAMES):
            continue
        if run.get("append") and not _added_by_append(output_dir, path, run["append"]):
            continue
        stale.append(path)
    _delete_entries(output_dir, stale, "the killed run's unfinished outputs")
    run.update(status="running", resumed_at=[*run.get("resumed_at", []), datetime.now(timezone.utc).isoformat()])
    write_run_file(output_dir, run)


def _shard_number(output_dir: str, path: str, folder: str) -> int | None:
    """The shard number of `DIR/<folder>/shards/NNNNNN.(tar|json)`, else None."""
    rest = path[len(output_dir.rstrip("/")) :].lstrip("/")
    prefix = f"{folder}/shards/" if folder else "shards/"
    if not rest.startswith(prefix):
        return None
    name = rest[len(prefix) :]
    stem = name.split(".", 1)[0]
    return int(stem) if "/" not in name and stem.isdigit() else None


def _added_by_append(output_dir: str, path: str, append: dict) -> bool:
    """Whether `path` is an output the append run writes (so a resumed append may delete it)."""
    name = _top_level_name(output_dir, path)
    if name in ("shards", "unselected"):
        folder = "" if name == "shards" else "unselected"
        number = _shard_number(output_dir, path, folder)
        first = append["first_shard"] if name == "shards" else append["first_unselected_shard"]
        return number is None or number >= first
    # Tables and reports are rewritten whole from the snapshot in _append_base.
    return name not in ("embeddings", "semantic")


def next_shard(output_dir: str, folder: str = "") -> int:
    """One past the highest shard number under `DIR[/folder]/shards/` (0 if none)."""
    numbers = [n for path in _entries(output_dir) if (n := _shard_number(output_dir, path, folder)) is not None]
    return max(numbers) + 1 if numbers else 0


def check_append(output_dir: str, run_config: dict, input_files: int) -> dict:
    """The run.json of an `--append` run into `output_dir`'s finished dataset:
    where its keys and shard numbers start. The config must be the dataset's
    (the input may differ). Reads only; `start_append` changes the folder."""
    run, config = _earlier_run(output_dir, "--append")
    if run.get("command") != "curate":
        raise RunRefused(f"--append: {output_dir} holds a `{run.get('command')}` run; only curate datasets take --append")
    if run.get("status") != "finished":
        raise RunRefused(
            f"--append: the run in {output_dir} did not finish (status {run.get('status')!r}); "
            "finish it with --resume first"
        )
    if "next_file_ordinal" not in run:
        raise RunRefused(f"--append: {output_dir} was written before --append existed; curate it again to append to it")
    if run["next_file_ordinal"] + input_files > MAX_INPUT_FILES:
        raise RunRefused(f"--append: a dataset holds at most {MAX_INPUT_FILES} input files in all (keys have 5 digits for the file)")
    differences = _describe_differences(config, run_config, ("curate",))
    if differences:
        raise RunRefused(
            f"--append: the config differs from the dataset's in {', '.join(differences[:8])}"
            f"{', ...' if len(differences) > 8 else ''}; a dataset is curated under one config"
        )
    from apache_beam.io.filesystems import FileSystems

    history = [*run.get("history", []), {k: run.get(k) for k in ("run_id", "input", "started_at", "finished_at", "append")}]
    return {
        "run_id": uuid.uuid4().hex,
        "command": "curate",
        "status": "running",
        "started_at": datetime.now(timezone.utc).isoformat(),
        "input": run_config.get("input"),
        "next_file_ordinal": run["next_file_ordinal"] + input_files,
        "append": {
            "first_file_ordinal": run["next_file_ordinal"],
            "first_shard": next_shard(output_dir),
            "first_unselected_shard": next_shard(output_dir, "unselected"),
            "base": FileSystems.join(output_dir, APPEND_BASE),
        },
        "history": history,
    }


def start_append(output_dir: str, run: dict) -> None:
    """Copy the dataset's index and rejects tables to `_append_base/` (the run
    reads the dataset from there, so a killed append resumes against the same
    base) and write the append run's run.json."""
    from apache_beam.io.filesystems import FileSystems

    base = run["append"]["base"]
    try:
        if "://" not in base and not FileSystems.exists(base):
            FileSystems.mkdirs(base)  # object stores have no folders to make
        FileSystems.copy(
            [FileSystems.join(output_dir, "index.parquet"), FileSystems.join(output_dir, "rejects.parquet")],
            [FileSystems.join(base, "index.parquet"), FileSystems.join(base, "rejects.parquet")],
        )
    except Exception as err:  # noqa: BLE001 - shown as one line
        raise RunRefused(f"--append: cannot copy the dataset's tables in {output_dir}: {err}") from err
    write_run_file(output_dir, run)


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

    return _read_json(FileSystems.join(output_dir, RUN_FILE))


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

"""The run's tables and report: `index.parquet`, `rejects.parquet`,
`report.json` (the funnel) and `config.json`.

Every file here is committed whole on any file system: the parquet tables by
Beam's file sink (temporary files, closed, then copied to the final name),
`report.json` and `config.json` by `write_atomically`. `report.json` is
written last, after both tables: its presence means the run's tables are final.

Parquet schemas are derived from the pydantic models, so a field added to
`SampleRecord` or `Rejection` becomes a column without touching this file.
"""

from __future__ import annotations

import enum
import json
import types
import typing
from datetime import datetime

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems
from pydantic import BaseModel

from schemas import (
    CurateConfig,
    FunnelRow,
    InputFileError,
    OptOutRow,
    RejectReason,
    Rejection,
    Report,
    SampleRecord,
    Stage,
)
from stages.core.host_schedule import host_of
from stages.shards import write_atomically

INDEX = "index.parquet"
REJECTS_TABLE = "rejects.parquet"
REPORT = "report.json"
CONFIG = "config.json"

# Internal to a run: never written to the outputs.
_EXCLUDED = {"image_ref"}


class AccountingError(RuntimeError):
    """Input rows != kept + rejected: a row was lost or counted twice."""


def _arrow_type(annotation) -> pa.DataType:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _arrow_type(args[0])
    if origin is typing.Literal:
        return pa.string()
    if origin in (list, tuple):
        (item,) = typing.get_args(annotation)[:1]
        return pa.list_(_arrow_type(item))
    if isinstance(annotation, type):
        if issubclass(annotation, bool):
            return pa.bool_()
        if issubclass(annotation, int):
            return pa.int64()
        if issubclass(annotation, float):
            return pa.float64()
        if issubclass(annotation, datetime):
            return pa.timestamp("us", tz="UTC")
        if issubclass(annotation, (str, enum.Enum)):
            return pa.string()
    raise TypeError(f"no parquet type for {annotation!r}")


def _flat_fields(model: type[BaseModel]) -> list[tuple[str, str | None, typing.Any]]:
    """(column, nested model field or None, annotation) for each column."""
    columns = []
    for name, field in model.model_fields.items():
        if name in _EXCLUDED:
            continue
        annotation = field.annotation
        nested = next(
            (a for a in typing.get_args(annotation) or (annotation,) if isinstance(a, type) and issubclass(a, BaseModel)),
            None,
        )
        if nested is not None:
            columns += [(sub, name, f.annotation) for sub, f in nested.model_fields.items()]
        else:
            columns.append((name, None, annotation))
    return columns


def arrow_schema(model: type[BaseModel]) -> pa.Schema:
    return pa.schema([pa.field(column, _arrow_type(annotation)) for column, _, annotation in _flat_fields(model)])


def to_row(item: BaseModel) -> dict:
    """Flatten a record (nested models become columns) for parquet."""
    dumped = item.model_dump(mode="python")
    row = {}
    for column, parent, _ in _flat_fields(type(item)):
        value = (dumped.get(parent) or {}).get(column) if parent else dumped.get(column)
        row[column] = value.value if isinstance(value, enum.Enum) else value
    return row


def from_row(row: dict, model: type[BaseModel]) -> BaseModel:
    """The inverse of `to_row`: a flat parquet row back to a `model` instance."""
    data: dict = {}
    for column, parent, _ in _flat_fields(model):
        if column not in row:
            continue
        if parent:
            data.setdefault(parent, {})[column] = row[column]
        else:
            data[column] = row[column]
    return model.model_validate(data)


def read_table(p: beam.Pipeline, path: str, label: str, columns: list[str] | None = None) -> beam.PCollection:
    """A parquet table as a PCollection of flat row dicts. Not checked while
    the graph is built: the table may be written between then and the run."""
    return p | label >> beam.io.ReadFromParquet(path, columns=columns, validate=False)


def write_table(
    pcoll: beam.PCollection, output_dir: str, name: str, model: type[BaseModel], label: str, base_rows=None
):
    """Write a PCollection of `model` instances as one parquet file `DIR/name`;
    `base_rows` (flat row dicts, e.g. the dataset's earlier rows on `--append`)
    are written with them."""
    rows = pcoll | f"{label}/ToRows" >> beam.Map(to_row)
    if base_rows is not None:
        rows = (base_rows, rows) | f"{label}/WithBase" >> beam.Flatten()
    return (
        rows
        | f"{label}/Write"
        >> beam.io.WriteToParquet(
            FileSystems.join(output_dir, name),
            arrow_schema(model),
            num_shards=1,
            shard_name_template="",
        )
    )


# What a site says to keep its content out; the report counts rows and hosts of each.
OPT_OUT_REASONS = (RejectReason.ROBOTS_DISALLOWED, RejectReason.TDM_RESERVED, RejectReason.OPT_OUT)


def build_report(
    input_rows: int,
    kept: int,
    shards: int,
    reject_counts: list[tuple[tuple[str, str], int]],
    input_errors: list[InputFileError] = (),
    opt_out_hosts: list[tuple[str, int]] = (),
) -> Report:
    stage_order = {stage.value: i for i, stage in enumerate(Stage)}
    funnel = sorted(
        (FunnelRow(stage=Stage(s), reason=RejectReason(r), count=n) for (s, r), n in reject_counts),
        key=lambda row: (stage_order[row.stage.value], -row.count, row.reason.value),
    )
    rejected = sum(row.count for row in funnel)
    hosts = dict(opt_out_hosts)
    opt_outs = [
        OptOutRow(reason=reason, rows=sum(row.count for row in funnel if row.reason == reason), hosts=hosts[reason.value])
        for reason in OPT_OUT_REASONS
        if reason.value in hosts
    ]
    return Report(
        input_rows=input_rows,
        kept=kept,
        rejected=rejected,
        shards=shards,
        funnel=funnel,
        accounting_ok=input_rows == kept + rejected,
        input_errors=sorted(input_errors, key=lambda e: e.path),
        opt_outs=opt_outs,
    )


class _WriteReport(beam.DoFn):
    def __init__(self, output_dir: str):
        self.output_dir = output_dir

    def process(self, _, input_rows, kept, shards, reject_counts, input_errors, opt_out_hosts):
        report = build_report(input_rows, kept, shards, reject_counts, input_errors, opt_out_hosts)
        write_atomically(FileSystems.join(self.output_dir, REPORT), report.model_dump_json(indent=2).encode())
        if not report.accounting_ok:
            raise AccountingError(
                f"{report.input_rows} input rows but {report.kept} kept + {report.rejected} rejected; "
                f"see {FileSystems.join(self.output_dir, REPORT)}"
            )
        yield report


def write_outputs(
    output_dir: str,
    input_rows: beam.PCollection,
    kept: beam.PCollection,
    manifests: beam.PCollection,
    rejects: beam.PCollection,
    input_errors: beam.PCollection | None = None,
    base: str | None = None,
) -> beam.PCollection:
    """Write index.parquet, rejects.parquet and report.json.

    `input_rows` is a singleton PCollection with the number of input rows;
    `input_errors` holds an `InputFileError` per file that failed part-way.
    `base`: on `--append`, the folder holding the dataset's tables before this
    run; their rows are written with the new ones (the report counts this run's).
    Returns a PCollection that holds the `Report` once everything is written.
    """
    if input_errors is None:
        input_errors = rejects.pipeline | "NoInputErrors" >> beam.Create([])
    base_index = base_rejects = None
    if base is not None:
        base_index = read_table(kept.pipeline, FileSystems.join(base, INDEX), "BaseIndex")
        base_rejects = read_table(kept.pipeline, FileSystems.join(base, REJECTS_TABLE), "BaseRejects")
    index_done = write_table(kept, output_dir, INDEX, SampleRecord, "Index", base_index)
    rejects_done = write_table(rejects, output_dir, REJECTS_TABLE, Rejection, "Rejects", base_rejects)
    kept_count = kept | "CountKept" >> beam.combiners.Count.Globally()
    shard_count = manifests | "CountShards" >> beam.combiners.Count.Globally()
    reject_counts = (
        rejects
        | "ReasonKey" >> beam.Map(lambda r: ((r.stage.value, r.reason.value), 1))
        | "CountReasons" >> beam.CombinePerKey(sum)
    )
    opt_out_values = {reason.value for reason in OPT_OUT_REASONS}
    opt_out_hosts = (
        rejects
        | "OptOuts" >> beam.Filter(lambda r: r.reason.value in opt_out_values)
        | "OptOutHost" >> beam.Map(lambda r: (r.reason.value, host_of(r.url)))
        | "OptOutHosts" >> beam.Distinct()
        | "OptOutHostCount" >> beam.combiners.Count.PerKey()
    )
    # Wait for both tables before the report says the run is complete.
    tables_written = (
        (index_done, rejects_done) | "TablesWritten" >> beam.Flatten() | "AllWritten" >> beam.combiners.Count.Globally()
    )
    return tables_written | "Report" >> beam.ParDo(
        _WriteReport(output_dir),
        beam.pvalue.AsSingleton(input_rows),
        beam.pvalue.AsSingleton(kept_count),
        beam.pvalue.AsSingleton(shard_count),
        beam.pvalue.AsList(reject_counts),
        beam.pvalue.AsList(input_errors),
        beam.pvalue.AsList(opt_out_hosts),
    )


def resolved_config(config: CurateConfig, extra: dict | None = None) -> dict:
    """What DIR/config.json and every shard manifest record about the run."""
    return {"curate": config.model_dump(mode="json"), **(extra or {})}


def write_config(output_dir: str, resolved: dict) -> None:
    """Write DIR/config.json (before the pipeline runs)."""
    if "://" not in output_dir and not FileSystems.exists(output_dir):
        FileSystems.mkdirs(output_dir)  # object stores have no folders to make
    write_atomically(FileSystems.join(output_dir, CONFIG), json.dumps(resolved, indent=2, sort_keys=True).encode())


def read_report(output_dir: str) -> Report:
    with FileSystems.open(FileSystems.join(output_dir, REPORT), compression_type="uncompressed") as f:
        return Report.model_validate_json(f.read())

"""The funnel a finished run prints: input rows, each stage's drops by reason, kept,
rejected and whether they add up (`report.json` read back). Shared by the runners of
`beam run curate` and `beam run select`."""

from __future__ import annotations

import sys


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
    if report.opt_outs:
        print(line, file=out)
        print("opt-outs honoured:", file=out)
        for row in report.opt_outs:
            print(f"  {row.reason.value:<{width - 2}} {row.rows:>10} rows from {row.hosts} host(s)", file=out)
    if report.input_errors:
        print(line, file=out)
        print(f"input files that failed part-way: {len(report.input_errors)} (their later rows are not counted above)", file=out)
        for error in report.input_errors:
            print(f"  {error.path}: {error.rows_read} rows read, then {error.error}", file=out)


def print_summary(output: str, report, index_name: str) -> None:
    """Print the funnel and where the outputs are."""
    print_funnel(report)
    print(f"shards: {output.rstrip('/')}/shards/  index: {output.rstrip('/')}/{index_name}")

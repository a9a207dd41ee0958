"""Dataflow Flex Template entry point for `beam run curate` (FLEX_TEMPLATE_PYTHON_PY_FILE).

The template launcher runs `python curate_main.py --input=... --output=...
[--config=...] --project=... --region=... --temp_location=... ...`; this hands
those arguments to the `beam` CLI. A flex template only runs on Dataflow, so
`--runner=DataflowRunner` is added when the launcher does not pass a runner.
A script, not importable project code.
"""

import sys

from pipelines.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if not any(a == "--runner" or a.startswith("--runner=") for a in args):
        args.append("--runner=DataflowRunner")
    sys.exit(main(["run", "curate", *args]))

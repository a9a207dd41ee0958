"""The `beam` command line (filled in by the curate pipeline)."""


def main(argv=None) -> int:
    raise SystemExit("beam: not built yet")

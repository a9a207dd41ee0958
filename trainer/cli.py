"""The `trainer` command line."""


def main(argv=None) -> int:
    raise SystemExit("trainer: not built yet")

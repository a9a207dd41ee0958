"""Dotted overrides of a config tree, before it is validated into a config model:
`--set key.path=value` on the `trainer` and `trainer lora` command lines and the
CLI overrides of `beam run curate`. Plain dict manipulation, no I/O (values are
parsed as YAML scalars or flow collections: `--set optim.lr=3e-4`,
`--set preview.prompts=[a, b]`)."""

from __future__ import annotations

from collections.abc import Iterable

import yaml


def set_dotted(tree: dict, dotted: str, value) -> None:
    """`tree[a][b][c] = value` for `dotted` "a.b.c", creating missing sections.
    Raises ValueError when a parent on the path is a value, not a section."""
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {dotted}: {key} is not a section")
    node[keys[-1]] = value


def apply_set_overrides(tree: dict, overrides: Iterable[str]) -> dict:
    """Apply `key.path=value` strings (as given to `--set`) to `tree` in order; returns it."""
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep:
            raise ValueError(f"--set expects key.path=value, got {override!r}")
        set_dotted(tree, key.strip(), yaml.safe_load(raw))
    return tree

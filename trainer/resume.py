"""What `trainer fit --resume` and `trainer lora --resume` share: the one resume
policy and the metrics log both runs append to.

Resume policy: a run continues exactly (the same weights and metrics as an
uninterrupted run) or not at all. A resume whose config differs from the one
the checkpoint was written with is refused, naming every differing field
(nested fields dotted), rather than continued with a warning: a silently
different run under the old run's name is the worse outcome, and the remedy
(resume without changing options, or start a new --output) is cheap.
"""

from __future__ import annotations

import json
from pathlib import Path


def config_changes(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted names of every field that differs between two config dumps."""
    changes = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append(f"{prefix}{key}")
    return changes


def check_resume_config(saved: dict, current: dict, where: str | Path) -> None:
    """Refuse to resume `where` (a checkpoint or run folder) with a config other
    than `saved`, the one it was written with (both `model_dump(mode="json")`)."""
    changed = config_changes(saved, current)
    if changed:
        raise ValueError(
            f"{where} was started with a different config ({', '.join(changed)} differ); "
            "an exact resume needs the same config: resume without changing options, or start a new --output"
        )


def read_metrics(path: Path) -> list[dict]:
    """The records of a `metrics.jsonl` (one JSON object a line); [] when there is none."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_metrics(path: Path, record: dict) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records past `last_step`: a killed run may have logged steps past its
    last checkpoint, and the resumed run redoes them."""
    if not path.is_file():
        return
    kept = [r for r in read_metrics(path) if r["step"] <= last_step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))

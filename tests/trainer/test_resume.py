"""trainer.resume: the one resume policy of `trainer fit` and `trainer lora`, and the metrics log."""

from __future__ import annotations

import pytest

from trainer.resume import append_metrics, check_resume_config, config_changes, read_metrics, truncate_metrics


def test_config_changes_names_nested_fields_dotted():
    saved = {"seed": 0, "optim": {"lr": 1e-4, "betas": [0.9, 0.99]}, "data": {"cache": "a"}}
    current = {"seed": 0, "optim": {"lr": 3e-4, "betas": [0.9, 0.99]}, "data": {"cache": "b"}, "new": 1}
    assert config_changes(saved, current) == ["data.cache", "new", "optim.lr"]
    assert config_changes(saved, saved) == []


def test_a_changed_config_is_refused_naming_every_difference(tmp_path):
    check_resume_config({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 2}}, tmp_path)  # same: resumes
    with pytest.raises(ValueError, match=r"different config \(a, b\.c differ\); an exact resume needs the same config"):
        check_resume_config({"a": 1, "b": {"c": 2}}, {"a": 2, "b": {"c": 3}}, tmp_path)


def test_metrics_log_round_trips_and_truncates_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert read_metrics(path) == []
    for step in (1, 2, 3):
        append_metrics(path, {"step": step, "loss": 1.0 / step})
    truncate_metrics(path, 2)
    assert read_metrics(path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipelines.cli import config_reference, main
from pipelines.funnel import print_funnel
from pipelines.outputs import build_report
from schemas import CurateConfig


def test_list_names_every_pipeline(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "curate" in out and "select" in out


def test_curate_help_documents_options(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["run", "curate", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for option in ("--input", "--output", "--config", "--allow-private-network", "--runner", "--print-config"):
        assert option in out


def test_config_reference_is_valid_yaml_with_every_default(capsys):
    assert main(["run", "curate", "--print-config"]) == 0
    text = capsys.readouterr().out
    assert CurateConfig.model_validate(yaml.safe_load(text)) == CurateConfig()
    assert "# Images whose shorter side is below this are rejected; 0 disables." in config_reference()


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: None, "no input file matches"),
        (lambda d: pq.write_table(pa.table({"link": ["http://a/x.jpg"], "caption": ["c"]}), d / "in.parquet"), "missing column"),
        (lambda d: (pq.write_table(pa.table({"url": ["u"], "caption": ["c"]}), d / "in.parquet"),
                    (d / "c.yaml").write_text("decode: {min_sid: 3}")), "min_sid"),
        (lambda d: (pq.write_table(pa.table({"url": ["u"], "caption": ["c"]}), d / "in.parquet"),
                    (d / "c.yaml").write_text("decode: [")), "invalid YAML"),
    ],
    ids=["no-input", "missing-column", "unknown-key", "bad-yaml"],
)
def test_bad_input_is_a_clear_error_before_any_work(tmp_path, capsys, setup, message):
    setup(tmp_path)
    argv = ["run", "curate", "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out")]
    if (tmp_path / "c.yaml").exists():
        argv += ["--config", str(tmp_path / "c.yaml")]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_funnel_table_shows_every_reason_and_the_identity(capsys):
    report = build_report(10, 6, 2, [(("crawl", "timeout"), 1), (("decode", "too_small"), 3)])
    print_funnel(report)
    out = capsys.readouterr().out
    assert "timeout" in out and "too_small" in out and "(10 = 6 + 4)" in out and "ok" in out
    assert not build_report(10, 6, 2, [(("crawl", "timeout"), 1)]).accounting_ok

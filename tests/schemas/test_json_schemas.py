"""The checked-in JSON Schemas must match the pydantic models."""

import json

import jsonschema
import pytest

from pipelines.cli import SCHEMAS_DIR, run_schemas
from schemas import JSON_SCHEMA_MODELS, CurateConfig, Provenance, SampleRecord


@pytest.mark.parametrize("name", sorted(JSON_SCHEMA_MODELS))
def test_checked_in_schema_matches_model(name):
    on_disk = json.loads((SCHEMAS_DIR / f"{name}.schema.json").read_text())
    assert on_disk == JSON_SCHEMA_MODELS[name].model_json_schema(), f"run `make schemas` after changing {name}"


def test_check_mode_detects_drift(tmp_path, monkeypatch):
    monkeypatch.setattr("pipelines.cli.SCHEMAS_DIR", tmp_path)
    assert run_schemas(["--check"]) == 1  # nothing written there yet
    assert run_schemas(["--write"]) == 0
    assert run_schemas(["--check"]) == 0
    path = tmp_path / "sample_record.schema.json"
    path.write_text(path.read_text().replace('"key"', '"kee"', 1))
    assert run_schemas(["--check"]) == 1


def test_record_validates_against_its_schema():
    record = SampleRecord(key="00000000000001", url="http://a/b.jpg", caption_original="a cat",
                          provenance=Provenance(source_file="in.parquet", source_row=1))
    schema = json.loads((SCHEMAS_DIR / "sample_record.schema.json").read_text())
    jsonschema.validate(json.loads(record.model_dump_json()), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**json.loads(record.model_dump_json()), "schema_version": "0.9"}, schema)


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="min_sid"):
        CurateConfig.model_validate({"decode": {"min_sid": 3}})

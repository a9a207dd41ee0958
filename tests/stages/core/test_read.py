"""stages.core.read: one input row -> record, with the pipeline's version in its provenance."""

from __future__ import annotations

import importlib.metadata

from schemas import ReadConfig
from stages.core.read import pipeline_version, row_to_record


def test_provenance_carries_the_installed_pipeline_version():
    record, drop = row_to_record("in.csv", 0, 3, {"url": "http://x/a.jpg", "caption": "a cat"}, "", ReadConfig())
    assert drop is None
    assert record.provenance.pipeline_version == pipeline_version() == importlib.metadata.version("imagemill")

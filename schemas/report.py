"""What the HTML report shows of individual samples: `DIR/report_files/samples.json`.

Written by the last step of `beam run curate` / `beam run select` while the
image bytes are still readable (staging files, shards); `beam report DIR`
re-renders `DIR/report.html` from it, the tables and `report.json`.
"""

from __future__ import annotations

from pydantic import BaseModel, Field


class SampleCard(BaseModel):
    """One sample as the report shows it: its thumbnail (if its image was
    downloaded and staged), URL, caption and why it was dropped."""

    key: str
    url: str
    caption: str = ""
    caption_synthetic: str | None = None
    stage: str | None = Field(None, description="Rejecting stage; None for a kept sample.")
    reason: str | None = None
    detail: str = ""
    duplicate_of: str | None = None
    thumbnail: str | None = Field(None, description="`data:image/jpeg;base64,...`; None: no image (rejected before download).")


class ReportSamples(BaseModel):
    """Bounded random samples of a run (sizes in `pipelines/report.py`)."""

    kept: list[SampleCard] = []
    recaptioned: list[SampleCard] = []
    rejects: dict[str, list[SampleCard]] = Field(default_factory=dict, description="`stage/reason` -> sample.")
    survivors: dict[str, SampleCard] = Field(default_factory=dict, description="Key -> the sample a sampled duplicate lost to.")

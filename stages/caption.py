"""Caption hygiene stage: the Beam adapter over `stages/core/caption.py`
(which says what is dropped and why)."""

from __future__ import annotations

from schemas import CaptionConfig, SampleRecord, Stage
from stages.base import FilterDoFn
from stages.core.caption import check_caption, normalize_caption


class CaptionHygieneDoFn(FilterDoFn):
    """Drops bad alt text; keeps the record with its caption whitespace-normalised."""

    stage = Stage.CAPTION

    def __init__(self, config: CaptionConfig):
        super().__init__()
        self.config = config

    def apply(self, record: SampleRecord):
        if not self.config.enabled:
            return record
        drop = check_caption(record.caption_original, self.config)
        if drop is not None:
            return drop
        return record.model_copy(update={"caption_original": normalize_caption(record.caption_original)})

"""URL hygiene stage: the Beam adapter over `stages/core/url.py` (which says
what is dropped and why), plus the duplicate-URL drop, which needs a grouping
by URL: the row with the smallest key is kept and named in `duplicate_of`.
"""

from __future__ import annotations

import typing

import apache_beam as beam

from schemas import DecodeConfig, RejectReason, SampleRecord, Stage, UrlConfig
from stages.base import REJECTS, Drop, FilterDoFn, StageMetrics, rejection
from stages.core.url import check_declared_size, normalize_url


class UrlHygieneDoFn(FilterDoFn):
    stage = Stage.URL

    def __init__(self, config: UrlConfig, decode: DecodeConfig):
        super().__init__()
        self.config = config
        self.decode = decode

    def apply(self, record: SampleRecord):
        url = normalize_url(record.url, self.config.allowed_schemes)
        if isinstance(url, Drop):
            return url
        drop = check_declared_size(record, self.decode)
        if drop is not None:
            return drop
        return record.model_copy(update={"url": url})


class UrlHygiene(beam.PTransform):
    """PCollection[SampleRecord] -> (records, rejects)."""

    def __init__(self, config: UrlConfig, decode: DecodeConfig, existing=None):
        """`existing`: a PCollection of `(url, key)` of samples already in the
        dataset (`--append`); rows with one of those URLs are `duplicate_url`
        rejects naming the existing sample."""
        super().__init__()
        self.config = config
        self.decode = decode
        self.existing = existing

    def expand(self, records):
        checked = records | "Normalize" >> beam.ParDo(UrlHygieneDoFn(self.config, self.decode)).with_outputs(
            REJECTS, main="kept"
        )
        if not self.config.dedup_urls:
            return checked.kept, checked[REJECTS]
        keyed = [checked.kept | "KeyByUrl" >> beam.Map(lambda r: (r.url, r))]
        if self.existing is not None:
            keyed.append(self.existing | "ExistingUrls" >> beam.Map(lambda kv: (kv[0], _Existing(kv[1]))))
        deduped = (
            keyed
            | "FlattenUrls" >> beam.Flatten()
            | "GroupByUrl" >> beam.GroupByKey()
            | "KeepFirst" >> beam.ParDo(DedupUrlsDoFn()).with_outputs(REJECTS, main="kept")
        )
        rejects = (checked[REJECTS], deduped[REJECTS]) | "MergeRejects" >> beam.Flatten()
        return deduped.kept, rejects


class DedupUrlsDoFn(beam.DoFn):
    """(url, records) -> the record with the smallest key; the others are
    `duplicate_url` rejects naming it. Two passes over the group and nothing
    held, so a URL repeated millions of times is fine."""

    def __init__(self):
        self.metrics = StageMetrics(Stage.URL)

    def process(self, element):
        _, records = element
        existing = next((r.key for r in records if isinstance(r, _Existing)), None)
        survivor = existing or min(r.key for r in records)
        detail = f"already in the dataset as {survivor}" if existing else f"same URL as {survivor}"
        for record in records:  # grouped values are re-iterable: two passes, nothing held
            if isinstance(record, _Existing):
                continue
            if record.key == survivor:
                self.metrics.kept.inc()
                yield record
                continue
            self.metrics.dropped(RejectReason.DUPLICATE_URL).inc()
            drop = Drop(RejectReason.DUPLICATE_URL, detail, duplicate_of=survivor)
            yield beam.pvalue.TaggedOutput(REJECTS, rejection(record, Stage.URL, drop))


class _Existing(typing.NamedTuple):
    """A URL's sample already in the dataset (`--append`)."""

    key: str

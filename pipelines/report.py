"""The report step of `beam run curate` and `beam run select`: the samples
behind `DIR/report.html`, drawn inside the pipeline.

`add_report` draws bounded random samples (`beam.combiners.Sample`: kept,
recaptioned, per reject reason), looks up the sampled keys' `image_ref`s
(metadata only, a side input of at most a few hundred keys), and, on one
worker, reads those byte ranges back (from the staging files, which are deleted
only after this step, or from the shards for `select`), makes thumbnails
(`stages/core/thumbnails.py`), writes `DIR/report_files/samples.json` and calls
`pipelines.report_html.render`, which draws the page (what it shows, its size
bound and `beam report DIR` are described there).

Samples rejected by decode (too small, truncated, ...) were downloaded but
never staged, so they show their URL and detail without a thumbnail, like the
rows dropped before download.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import apache_beam as beam

from pipelines.report_html import (
    MAX_THUMBNAIL_GROUPS,
    N_DUPLICATE_PAIRS,
    N_KEPT,
    N_PER_REASON,
    N_RECAPTIONED,
    REPORT_HTML,
    SAMPLES,
    TEXT_CHARS,
    files_path,
    render,
    write_atomically,
)
from schemas import Rejection, SampleRecord
from schemas.report import ReportSamples, SampleCard
from stages.core import thumbnails

LOG = logging.getLogger(__name__)


def _cut(text: str | None) -> str:
    text = text or ""
    return text if len(text) <= TEXT_CHARS else text[: TEXT_CHARS - 1] + "\u2026"


# ---------------------------------------------------------------- pipeline step


def _reason_key(rejection: Rejection) -> tuple[str, Rejection]:
    return f"{rejection.stage.value}/{rejection.reason.value}", rejection


def _shown_duplicates(rejects) -> list[Rejection]:
    """The sampled duplicates whose survivor the report shows beside them."""
    duplicates = sorted((r for _, sample in rejects for r in sample if r.duplicate_of), key=lambda r: r.key)
    return duplicates[:N_DUPLICATE_PAIRS]


def _wanted_keys(_, kept, recaptioned, rejects) -> Iterable[frozenset]:
    keys = {r.key for r in kept} | {r.key for r in recaptioned}
    for _, sample in rejects:
        keys |= {r.key for r in sample}
    keys |= {r.duplicate_of for r in _shown_duplicates(rejects)}
    yield frozenset(keys)


class _WriteSamples(beam.DoFn):
    """Reads the sampled images back, thumbnails them, writes samples.json and
    report.html. Runs once, on one worker, over a bounded number of images."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir

    def process(self, _, kept, recaptioned, rejects, images):
        from stages.staging import ImageReader

        self._reader = ImageReader()
        self._images = images
        try:
            samples = ReportSamples(
                kept=[self._card(r) for r in sorted(kept, key=lambda r: r.key)],
                recaptioned=[
                    self._card(r, caption=_cut(r.caption_original), caption_synthetic=_cut(r.caption_synthetic))
                    for r in sorted(recaptioned, key=lambda r: r.key)
                ],
            )
            for group, (reason, sample) in enumerate(sorted(rejects)):
                samples.rejects[reason] = [
                    self._card(
                        r, group < MAX_THUMBNAIL_GROUPS, stage=r.stage.value, reason=r.reason.value,
                        detail=_cut(r.detail), duplicate_of=r.duplicate_of,
                    )  # fmt: skip
                    for r in sorted(sample, key=lambda r: r.key)
                ]
            for r in _shown_duplicates(rejects):
                if r.duplicate_of in images and r.duplicate_of not in samples.survivors:
                    samples.survivors[r.duplicate_of] = self._card(images[r.duplicate_of])
        finally:
            self._reader.close()
        write_atomically(files_path(self.output_dir, SAMPLES), samples.model_dump_json().encode())
        render(self.output_dir)
        yield REPORT_HTML

    def _card(self, record: SampleRecord | Rejection, with_image: bool = True, **extra) -> SampleCard:
        image = self._images.get(record.key) if with_image else None
        thumb = None
        if image is not None and image.image_ref is not None:
            try:
                thumb = thumbnails.data_uri(thumbnails.thumbnail(self._reader.read(image.image_ref)))
            except (OSError, thumbnails.ThumbnailError) as err:
                LOG.warning("report: no thumbnail for %s: %s", record.key, err)
        source = record if isinstance(record, SampleRecord) else image
        caption = (source.caption or source.caption_original) if source is not None else ""
        extra.setdefault("caption", _cut(caption))
        return SampleCard(key=record.key, url=_cut(record.url), thumbnail=thumb, **extra)


def add_report(
    output_dir: str,
    report: beam.PCollection,
    kept: beam.PCollection,
    rejects: beam.PCollection,
    images: beam.PCollection,
    label: str = "HtmlReport",
) -> beam.PCollection:
    """Add the report step; returns a PCollection that is non-empty once
    `report.html` is written (wait on it before deleting the staging files).

    `report`: the singleton from `outputs.write_outputs` (tables written);
    `kept`: the kept records; `rejects`: every Rejection; `images`: records
    whose `image_ref` is still readable (staged, or read from shards)."""
    kept_sample = kept | f"{label}/SampleKept" >> beam.combiners.Sample.FixedSizeGlobally(N_KEPT)
    recaptioned = (
        kept
        | f"{label}/Recaptioned" >> beam.Filter(lambda r: r.caption_synthetic is not None)
        | f"{label}/SampleRecaptioned" >> beam.combiners.Sample.FixedSizeGlobally(N_RECAPTIONED)
    )
    reject_sample = (
        rejects
        | f"{label}/ByReason" >> beam.Map(_reason_key)
        | f"{label}/SampleRejects" >> beam.combiners.Sample.FixedSizePerKey(N_PER_REASON)
    )
    wanted = report | f"{label}/WantedKeys" >> beam.FlatMap(
        _wanted_keys,
        beam.pvalue.AsSingleton(kept_sample),
        beam.pvalue.AsSingleton(recaptioned),
        beam.pvalue.AsList(reject_sample),
    )
    # Only the sampled keys' records (metadata, a few hundred at most) reach the writer.
    sampled_images = images | f"{label}/SampledImages" >> beam.FlatMap(
        lambda record, keys: [(record.key, record)] if record.key in keys else [],
        beam.pvalue.AsSingleton(wanted),
    )
    return report | f"{label}/Write" >> beam.ParDo(
        _WriteSamples(output_dir),
        beam.pvalue.AsSingleton(kept_sample),
        beam.pvalue.AsSingleton(recaptioned),
        beam.pvalue.AsList(reject_sample),
        beam.pvalue.AsDict(sampled_images),
    )

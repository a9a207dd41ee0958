"""Beam adapters for `beam run extract`: one input file per work unit, then the
two global steps by grouping.

- `ReadSources(pattern, config)`: matches and checks the inputs when the
  pipeline is built; yields (pairs, rejects, per-file counts).
- `DedupPairs(config.dedup)`: exact (image URL, caption) dedup, then at most
  `max_captions_per_url` distinct captions per image URL. Both keep the first
  rows in input order (file ordinal, image index), so the result does not
  depend on the runner; a group's values are streamed, never held beyond
  `max_captions_per_url` of them.

A WARC file is one work unit and is read streaming, so a worker holds one
record at a time. Files are not split by record offset: a Common Crawl WARC is
about 1 GiB of ~35k pages and a crawl has ~90k of them, so file-level
parallelism already exceeds any worker count.
"""

from __future__ import annotations

import heapq
import itertools

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from schemas.extract import DedupConfig, ExtractConfig, ExtractReason, ExtractRejection, ImagePair
from stages.base import REJECTS
from stages.core import extract as core
from stages.core.warc import source_kind
from stages.read import InputError, match_inputs

COUNTS = "counts"
NAMESPACE = "extract"


def open_raw(path: str):
    """The file's bytes as stored (no decompression): WARC readers handle
    per-record gzip themselves and offsets must be positions in the file."""
    return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)


class ExtractFileDoFn(beam.DoFn):
    """(file ordinal, path) -> ImagePair main output, `rejects`, and one `counts` dict per file."""

    def __init__(self, config: ExtractConfig):
        self.config = config

    def setup(self):
        self._pairs = Metrics.counter(NAMESPACE, "candidates")
        self._pages = Metrics.counter(NAMESPACE, "pages")
        self._dropped = {reason: Metrics.counter(NAMESPACE, f"dropped_{reason.value}") for reason in ExtractReason}

    def process(self, element: tuple[int, str]):
        ordinal, path = element
        counts = core.FileCounts()
        for item in core.extract_file(path, ordinal, open_raw, self.config, counts):
            if isinstance(item, ImagePair):
                self._pairs.inc()
                yield item
            else:
                self._dropped[item.reason].inc()
                yield beam.pvalue.TaggedOutput(REJECTS, item)
        self._pages.inc(counts["pages"])
        yield beam.pvalue.TaggedOutput(COUNTS, dict(counts))


class ReadSources(beam.PTransform):
    """Every file matching `pattern` (WARC, WAT, page lists); returns (pairs, rejects, counts)."""

    def __init__(self, pattern: str, config: ExtractConfig):
        super().__init__()
        self.paths = match_inputs(pattern)
        for path in self.paths:
            try:
                source_kind(path)
            except ValueError as err:
                raise InputError(str(err)) from err
        self.config = config

    def expand(self, pbegin):
        outputs = (
            pbegin
            | "Files" >> beam.Create(list(enumerate(self.paths)))
            # One file per worker: spread them before the expensive part.
            | "SpreadFiles" >> beam.Reshuffle()
            | "Extract" >> beam.ParDo(ExtractFileDoFn(self.config)).with_outputs(REJECTS, COUNTS, main="pairs")
        )
        return outputs.pairs, outputs[REJECTS], outputs[COUNTS]


def _dedup_rejection(row: ImagePair, lost_to: ImagePair | None, reason: ExtractReason, cap: int = 0) -> ExtractRejection:
    if reason == ExtractReason.DUPLICATE_PAIR:
        detail = f"same URL and caption as {lost_to.source_file}@{lost_to.source_offset}#{lost_to.position}"
    else:
        detail = f"more than {cap} distinct captions for this URL"
    return ExtractRejection(
        reason=reason, detail=detail, source_file=row.source_file, source_offset=row.source_offset,
        page_url=row.page_url, image_url=row.url,
    )


class _FirstOfPair(beam.DoFn):
    """((url, caption), rows) -> the first row by input order; each other row
    goes to `rejects` with the row it lost to when it was met (which may itself
    lose to an earlier one later). Streams the group: O(1) memory."""

    def process(self, element):
        _, rows = element
        first = None
        for row in rows:
            if first is None:
                first = row
            elif row.sort_key() < first.sort_key():
                yield beam.pvalue.TaggedOutput(REJECTS, (first, row))
                first = row
            else:
                yield beam.pvalue.TaggedOutput(REJECTS, (row, first))
        yield first


class _CapCaptions(beam.DoFn):
    """(url, rows) -> the first `cap` rows by input order; the rest to
    `rejects`. Holds at most `cap` rows of the group."""

    def __init__(self, cap: int):
        self.cap = cap

    def process(self, element):
        _, rows = element
        heap: list = []  # the `cap` earliest rows so far, latest on top (sort key negated)
        tie = itertools.count()
        for row in rows:
            entry = (tuple(-k for k in row.sort_key()), next(tie), row)
            if len(heap) < self.cap:
                heapq.heappush(heap, entry)
            elif entry[0] > heap[0][0]:  # earlier in input order than the latest kept
                yield beam.pvalue.TaggedOutput(REJECTS, heapq.heapreplace(heap, entry)[2])
            else:
                yield beam.pvalue.TaggedOutput(REJECTS, row)
        yield from sorted((e[2] for e in heap), key=ImagePair.sort_key)


class DedupPairs(beam.PTransform):
    """pairs -> (kept pairs, rejects): `duplicate_pair`, then `caption_cap`."""

    def __init__(self, config: DedupConfig):
        super().__init__()
        self.config = config

    def expand(self, pairs):
        rejects = []
        if self.config.exact:
            exact = (
                pairs
                | "ByPair" >> beam.Map(lambda r: ((r.url, r.caption), r))
                | "GroupPairs" >> beam.GroupByKey()
                | "FirstOfPair" >> beam.ParDo(_FirstOfPair()).with_outputs(REJECTS, main="kept")
            )
            pairs = exact.kept
            rejects.append(exact[REJECTS] | "DuplicateRejects" >> beam.MapTuple(_dedup_rejection, ExtractReason.DUPLICATE_PAIR))
        if self.config.max_captions_per_url:
            capped = (
                pairs
                | "ByUrl" >> beam.Map(lambda r: (r.url, r))
                | "GroupUrls" >> beam.GroupByKey()
                | "CapCaptions" >> beam.ParDo(_CapCaptions(self.config.max_captions_per_url)).with_outputs(REJECTS, main="kept")
            )
            pairs = capped.kept
            cap = self.config.max_captions_per_url
            rejects.append(capped[REJECTS] | "CapRejects" >> beam.Map(_dedup_rejection, None, ExtractReason.CAPTION_CAP, cap))
        if not rejects:
            rejects.append(pairs.pipeline | "NoDedupRejects" >> beam.Create([]))
        return pairs, tuple(rejects) | "DedupRejects" >> beam.Flatten()

"""One input file -> image-text pairs and rejects, streaming. Beam-free.

`extract_file(path, ordinal, open_raw, config)` reads a WARC, WAT or page-list
file (kind from its name, see `warc.source_kind`) record by record and yields
`ImagePair`s and `ExtractRejection`s; `FileCounts` tallies every record, page
and image so that the report can check its identities.
"""

from __future__ import annotations

import collections
import gzip
import io
from collections.abc import Callable, Iterator
from typing import BinaryIO

from schemas.extract import ExtractConfig, ExtractReason, ExtractRejection, ImagePair
from stages.core import html_images, warc


class FileCounts(collections.Counter):
    """Keys: `records`, `other:<warc type>`, `pages`, `images`, `candidates`, `reject:<reason>`."""


def _page_rejection(item: warc.RecordReject) -> ExtractRejection:
    return ExtractRejection(
        reason=item.reason, detail=item.detail[:2000], source_file=item.source_file, source_offset=item.offset, page_url=item.url
    )


def _lines(raw: BinaryIO, path: str) -> Iterator[str]:
    stream = gzip.GzipFile(fileobj=raw) if path.lower().endswith(".gz") else raw
    yield from io.TextIOWrapper(stream, encoding="utf-8-sig", errors="replace", newline="")


def source_items(path: str, raw: BinaryIO, open_raw: Callable[[str], BinaryIO], config: ExtractConfig) -> Iterator[warc.SourceItem]:
    kind = warc.source_kind(path)
    if kind == "warc":
        return warc.iter_warc(raw, path, config.records)
    if kind == "wat":
        return warc.iter_wat(raw, path, config.records)
    return warc.iter_page_list(path, _lines(raw, path), open_raw, config.records)


def extract_items(
    items: Iterator[warc.SourceItem], ordinal: int, config: ExtractConfig, counts: FileCounts
) -> Iterator[ImagePair | ExtractRejection]:
    """Pairs and rejects of one file's records, in file order; tallies into `counts`."""
    parse = html_images.PARSERS[config.images.parser]
    image_index = 0
    for item in items:
        counts["records"] += 1
        if isinstance(item, warc.OtherRecord):
            counts[f"other:{item.record_type}"] += 1
            continue
        if isinstance(item, warc.RecordReject):
            counts[f"reject:{item.reason.value}"] += 1
            yield _page_rejection(item)
            continue
        try:
            parsed = parse(item.text) if isinstance(item, warc.HtmlPage) else html_images.parse_wat_metadata(item.html_metadata)
        except Exception as err:  # noqa: BLE001 - parsers are lenient; anything left is this page's reject
            counts[f"reject:{ExtractReason.BAD_RECORD.value}"] += 1
            yield ExtractRejection(
                reason=ExtractReason.BAD_RECORD, detail=f"parse: {type(err).__name__}: {err}"[:2000],
                source_file=item.source_file, source_offset=item.offset, page_url=item.url,
            )
            continue
        why = html_images.opt_out(parsed, item.headers, config.opt_out)
        if why is not None:
            counts[f"reject:{ExtractReason.PAGE_OPT_OUT.value}"] += 1
            yield ExtractRejection(
                reason=ExtractReason.PAGE_OPT_OUT, detail=why[:2000], source_file=item.source_file,
                source_offset=item.offset, page_url=item.url,
            )
            continue
        counts["pages"] += 1
        language = html_images.clean_text(parsed.lang, 64)
        for position, result in enumerate(html_images.page_images(item.url, parsed, config.images)):
            counts["images"] += 1
            if isinstance(result, html_images.ImageDrop):
                counts[f"reject:{result.reason.value}"] += 1
                yield ExtractRejection(
                    reason=result.reason, detail=result.detail[:2000], source_file=item.source_file,
                    source_offset=item.offset, page_url=item.url, image_url=result.url,
                )
            else:
                counts["candidates"] += 1
                yield ImagePair(
                    url=result.url, caption=result.caption, caption_source=result.caption_source,
                    width=result.width, height=result.height, alt=result.alt, title=result.title,
                    figcaption=result.figcaption, page_url=item.url, language=language,
                    source_file=item.source_file, source_offset=item.offset, position=position,
                    file_ordinal=ordinal, image_index=image_index,
                )
            image_index += 1


def extract_file(
    path: str, ordinal: int, open_raw: Callable[[str], BinaryIO], config: ExtractConfig, counts: FileCounts
) -> Iterator[ImagePair | ExtractRejection]:
    """Open `path` with `open_raw` (raw bytes, no decompression: WARC offsets
    are positions in the compressed file) and extract it, streaming."""
    with open_raw(path) as raw:
        yield from extract_items(source_items(path, raw, open_raw, config), ordinal, config, counts)

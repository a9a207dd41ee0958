"""Pages out of WARC files, WAT files and page lists, streaming. Beam-free.

WARC reading uses warcio (Webrecorder): a pure-Python wheel that installs on
any worker image, reads from any Python file object (so Beam's FileSystems
serve local, gs:// and s3:// paths alike), handles per-record gzip members and
gives each record's byte offset in the compressed file (what Common Crawl's
index calls `offset`). FastWARC is faster at WARC parsing, but 2.0 is a fresh
Rust rewrite that installs only where a matching binary wheel exists (its sdist
needs a Rust toolchain), and WARC parsing is a small share of extraction time
next to HTML parsing (see benchmarks/extract_bench.py).

What a source yields, one item per WARC record (or per listed page):

- `HtmlPage`: an HTML response, decoded to text (WARC `response` records, or a
  page list's files),
- `WatPage`: a WAT `metadata` record describing an HTML response (its parsed
  `HTML-Metadata`),
- `OtherRecord`: a record that is not a page (`request`, `revisit`,
  `warcinfo`, `metadata`, ...), counted by type and otherwise ignored,
- `RecordReject`: `bad_record` (unreadable, or the file breaks off: the rest of
  the file cannot be resynchronised and is counted as this one reject),
  `not_html` (a response of another media type), `decode_error` (no charset
  decodes it).

Decoding (`decode_html`): a body whose first 4 KiB hold binary data bytes
(WHATWG MIME sniffing: controls other than tab, newline, form feed, carriage
return, escape) is a `decode_error` unless a UTF-16/32 charset is declared.
Otherwise the charsets of a BOM, the HTTP `Content-Type` and `<meta charset>` /
`<meta http-equiv>` in the first 4 KiB, then `records.fallback_encoding`, are
tried strictly in that order; then the first of them with replacement
characters if at most `records.max_replacement_fraction` of the text is
replaced (a mostly-UTF-8 page with a stray byte); then charset-normalizer's
detection; otherwise `decode_error`.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import posixpath
import re
from collections.abc import Callable, Iterator
from typing import BinaryIO

import charset_normalizer
from warcio.archiveiterator import ArchiveIterator

from schemas.extract import ExtractReason, RecordsConfig

SNIFF_BYTES = 4096
_META_CHARSET = re.compile(rb"""<meta[^>]+?charset\s*=\s*["']?\s*([A-Za-z0-9._:-]+)""", re.IGNORECASE)
_HTML_START = re.compile(rb"^\s*(<!--.*?-->\s*)*<(!doctype\s+html|html|head|body)", re.IGNORECASE | re.DOTALL)
_BOMS = ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


@dataclasses.dataclass(frozen=True)
class HtmlPage:
    url: str
    text: str
    headers: list[tuple[str, str]]
    source_file: str
    offset: int


@dataclasses.dataclass(frozen=True)
class WatPage:
    url: str
    html_metadata: dict
    headers: list[tuple[str, str]]
    source_file: str
    offset: int


@dataclasses.dataclass(frozen=True)
class OtherRecord:
    record_type: str


@dataclasses.dataclass(frozen=True)
class RecordReject:
    reason: ExtractReason
    detail: str
    source_file: str
    offset: int | None
    url: str | None = None


SourceItem = HtmlPage | WatPage | OtherRecord | RecordReject


def source_kind(path: str) -> str:
    """`warc`, `wat` or `pages` from the file name (before any .gz)."""
    name = posixpath.basename(path).lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith(".wat") or name.endswith(".wat.warc"):
        return "wat"
    if name.endswith(".warc"):
        return "warc"
    if name.endswith((".tsv", ".txt")):
        return "pages"
    raise ValueError(
        f"{path}: cannot tell the input kind from the name; expected .warc[.gz], .wat[.gz] (or .warc.wat.gz), "
        "or a page list .tsv (file<TAB>page URL per line)"
    )


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def _declared_charset(content_type: str | None) -> str | None:
    for part in (content_type or "").split(";")[1:]:
        key, _, value = part.partition("=")
        if key.strip().lower() == "charset" and value.strip():
            return value.strip().strip("\"'")
    return None


def _codec(name: str | None) -> str | None:
    if not name:
        return None
    try:
        return codecs.lookup(name).name
    except LookupError:
        return None


def charset_candidates(body: bytes, content_type: str | None, config: RecordsConfig) -> list[str]:
    """Charsets to try strictly, in order, without duplicates or unknown names."""
    names: list[str | None] = []
    for bom, name in _BOMS:
        if body.startswith(bom):
            names.append(name)
    names.append(_declared_charset(content_type))
    match = _META_CHARSET.search(body[:SNIFF_BYTES])
    if match:
        names.append(match.group(1).decode("ascii", "replace"))
    names.append(config.fallback_encoding)
    out: list[str] = []
    for name in names:
        codec = _codec(name)
        if codec and codec not in out:
            out.append(codec)
    return out


_BINARY_BYTES = re.compile(rb"[\x00-\x08\x0b\x0e-\x1a\x1c-\x1f]")


def decode_html(body: bytes, content_type: str | None, config: RecordsConfig) -> str | None:
    """The page as text, or None if it is not text in any charset (see the module doc)."""
    candidates = charset_candidates(body, content_type, config)
    if not any(c.replace("-", "_").startswith(("utf_16", "utf_32")) for c in candidates) and _BINARY_BYTES.search(body[:SNIFF_BYTES]):
        return None  # WHATWG MIME sniffing's "binary data bytes": not text in an ASCII-compatible charset
    for codec in candidates:
        try:
            return body.decode(codec)
        except (UnicodeDecodeError, LookupError):
            continue
    if candidates:
        text = body.decode(candidates[0], errors="replace")
        if text.count("\ufffd") <= config.max_replacement_fraction * max(len(text), 1):
            return text
    best = charset_normalizer.from_bytes(body[: 1 << 20]).best()
    if best is not None and best.encoding:
        return body.decode(best.encoding, errors="replace")
    return None


def looks_like_html(body: bytes) -> bool:
    return bool(_HTML_START.match(body[:SNIFF_BYTES]))


def is_html(content_type: str | None, body: bytes, config: RecordsConfig) -> bool:
    media = _media_type(content_type)
    if media:
        return media in config.html_content_types
    return looks_like_html(body)


def _header_pairs(headers) -> list[tuple[str, str]]:
    return [(str(k), str(v)) for k, v in (headers.headers if headers is not None else [])]


def iter_warc(stream: BinaryIO, source_file: str, config: RecordsConfig) -> Iterator[SourceItem]:
    """Every record of a WARC file (gzipped per record, or not), in order.

    `stream` is the raw file (not decompressed by the caller): offsets are
    positions in it.
    """
    records = ArchiveIterator(stream)
    while True:
        try:
            record = next(records)
        except StopIteration:
            return
        except Exception as err:  # noqa: BLE001 - warcio raises several types for a broken file
            yield RecordReject(ExtractReason.BAD_RECORD, f"unreadable from here on: {type(err).__name__}: {err}", source_file, _offset(records))
            return
        offset = records.offset  # the record's start; get_record_offset() would consume the record
        try:
            item = _warc_item(record, source_file, offset, config)
        except Exception as err:  # noqa: BLE001 - one record's broken payload must not end the file
            item = RecordReject(ExtractReason.BAD_RECORD, f"{type(err).__name__}: {err}", source_file, offset, _target(record))
        yield item


def _offset(records: ArchiveIterator) -> int | None:
    offset = getattr(records, "offset", None)
    return offset if isinstance(offset, int) else None


def _target(record) -> str | None:
    return record.rec_headers.get_header("WARC-Target-URI")


def _warc_item(record, source_file: str, offset: int, config: RecordsConfig) -> SourceItem:
    if record.rec_type != "response":
        return OtherRecord(record.rec_type or "unknown")
    url = _target(record)
    if not url:
        return RecordReject(ExtractReason.BAD_RECORD, "response without WARC-Target-URI", source_file, offset)
    if record.http_headers is None:
        media = _media_type(record.rec_headers.get_header("Content-Type"))
        return RecordReject(ExtractReason.NOT_HTML, f"not an HTTP response ({media or 'no content type'})", source_file, offset, url)
    content_type = record.http_headers.get_header("Content-Type") or record.rec_headers.get_header(
        "WARC-Identified-Payload-Type"
    )
    body = record.content_stream().read(config.max_page_bytes)
    if not is_html(content_type, body, config):
        return RecordReject(ExtractReason.NOT_HTML, _media_type(content_type) or "no content type", source_file, offset, url)
    text = decode_html(body, content_type, config)
    if text is None:
        return RecordReject(ExtractReason.DECODE_ERROR, f"no charset decodes it (tried {content_type!r})", source_file, offset, url)
    return HtmlPage(url, text, _header_pairs(record.http_headers), source_file, offset)


def iter_wat(stream: BinaryIO, source_file: str, config: RecordsConfig) -> Iterator[SourceItem]:
    """Every record of a WAT file: the `metadata` records that describe HTML
    responses become `WatPage`s (their `HTML-Metadata`)."""
    records = ArchiveIterator(stream)
    while True:
        try:
            record = next(records)
        except StopIteration:
            return
        except Exception as err:  # noqa: BLE001
            yield RecordReject(ExtractReason.BAD_RECORD, f"unreadable from here on: {type(err).__name__}: {err}", source_file, _offset(records))
            return
        offset = records.offset  # the record's start; get_record_offset() would consume the record
        try:
            item = _wat_item(record, source_file, offset, config)
        except Exception as err:  # noqa: BLE001
            item = RecordReject(ExtractReason.BAD_RECORD, f"{type(err).__name__}: {err}", source_file, offset, _target(record))
        yield item


def _wat_item(record, source_file: str, offset: int, config: RecordsConfig) -> SourceItem:
    if record.rec_type != "metadata" or _media_type(record.rec_headers.get_header("Content-Type")) != "application/json":
        return OtherRecord(record.rec_type or "unknown")
    url = _target(record)
    try:
        envelope = json.loads(record.content_stream().read())["Envelope"]
    except (ValueError, KeyError, TypeError) as err:
        return RecordReject(ExtractReason.BAD_RECORD, f"WAT JSON: {err}", source_file, offset, url)
    described = (envelope.get("WARC-Header-Metadata") or {}).get("WARC-Type", "unknown")
    if described != "response":
        return OtherRecord(f"wat:{described}")
    response = (envelope.get("Payload-Metadata") or {}).get("HTTP-Response-Metadata") or {}
    headers = response.get("Headers") or {}
    header_pairs = [(str(k), str(v)) for k, v in headers.items()] if isinstance(headers, dict) else []
    content_type = next((v for k, v in header_pairs if k.lower() == "content-type"), None)
    html = response.get("HTML-Metadata")
    media = _media_type(content_type)
    if not isinstance(html, dict) or (media and media not in config.html_content_types):
        return RecordReject(ExtractReason.NOT_HTML, media or "no HTML metadata", source_file, offset, url)
    return WatPage(url or "", html, header_pairs, source_file, offset)


def iter_page_list(
    list_path: str, lines: Iterator[str], open_page: Callable[[str], BinaryIO], config: RecordsConfig
) -> Iterator[SourceItem]:
    """A page list: `FILE<TAB>PAGE_URL` per line, FILE relative to the list's
    folder (or absolute). Offsets are 0-based line numbers. A line without two
    fields or a file that cannot be read is a `bad_record`."""
    folder = list_path.rsplit("/", 1)[0] if "/" in list_path else "."
    for number, line in enumerate(lines):
        line = line.rstrip("\r\n")
        if not line.strip():
            yield OtherRecord("blank_line")
            continue
        name, _, url = line.partition("\t")
        name, url = name.strip(), url.strip()
        if not name or not url:
            yield RecordReject(ExtractReason.BAD_RECORD, f"expected FILE<TAB>URL, got {line[:200]!r}", list_path, number)
            continue
        path = name if name.startswith("/") or "://" in name else f"{folder}/{name}"
        try:
            with open_page(path) as f:
                body = f.read(config.max_page_bytes)
        except Exception as err:  # noqa: BLE001 - a missing or unreadable file is this line's reject
            yield RecordReject(ExtractReason.BAD_RECORD, f"{path}: {type(err).__name__}: {err}", list_path, number, url)
            continue
        text = decode_html(body, None, config)
        if text is None:
            yield RecordReject(ExtractReason.DECODE_ERROR, f"{path}: no charset decodes it", list_path, number, url)
            continue
        yield HtmlPage(url, text, [], list_path, number)

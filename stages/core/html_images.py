"""Images and their texts out of an HTML page. Beam-free.

Two parsers read a page into the same neutral `ParsedPage` (selectolax's
Lexbor engine, the default, and lxml, kept as the measured alternative in
benchmarks/extract_bench.py); one set of rules then turns its <img> tags into
pairs or counted drops:

URL: resolved against `<base href>` (itself resolved against the page URL) or
the page URL, fragment removed. Candidates come from `srcset` and the lazy
`data-srcset` family on the <img>, and from `srcset` on every <source> of an
enclosing <picture>; if there are any, the largest wins (the largest width
descriptor if any candidate has one, else the largest density; a candidate
without descriptor is 1x). Without candidates, the first lazy attribute
(`data-src`, ...) is used, then `src`. `data:` candidates lose to any other.

Drops, in this order: no URL or a URL that is not absolute http(s) after
resolution (`bad_url`), a `data:` URI (`data_uri`), a declared width or height
of at most `images.tracking_pixel_max_side` or a URL matching
`images.tracking_url_patterns` (`tracking_pixel`), no alt, title or figcaption
text (`no_text`).

Caption: the first non-empty of `images.caption_order` (default: alt, then
the <figcaption> of the enclosing <figure>, then title); texts are
whitespace-collapsed and cut to `images.max_caption_chars`.

Opt-out: a `<meta name="robots">` (or `<meta name=TOKEN>` for the configured
user-agent token), or an `X-Robots-Tag` response header for all agents or for
the token, carrying any of `opt_out.directives` drops every image of the page.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable
from functools import lru_cache
from urllib.parse import urldefrag, urljoin, urlsplit

from schemas.extract import ExtractReason, ImagesConfig, OptOutConfig

_SPACE = re.compile(r"\s+")
_DIMENSION = re.compile(r"^\s*(\d+)(?:\.\d*)?\s*(px)?\s*$", re.IGNORECASE)
_URL_WHITESPACE = re.compile(r"[\t\n\r]")


@dataclasses.dataclass(frozen=True)
class ImgTag:
    """An <img> as the rules need it."""

    attrs: dict[str, str]
    source_srcsets: tuple[str, ...] = ()
    figcaption: str | None = None


@dataclasses.dataclass(frozen=True)
class ParsedPage:
    base_href: str | None
    lang: str | None
    metas: tuple[tuple[str, str], ...]  # (name lowercased, content)
    images: tuple[ImgTag, ...]


@dataclasses.dataclass(frozen=True)
class Candidate:
    """An image that passed the per-image checks."""

    url: str
    caption: str
    caption_source: str
    width: int | None
    height: int | None
    alt: str | None
    title: str | None
    figcaption: str | None


@dataclasses.dataclass(frozen=True)
class ImageDrop:
    reason: ExtractReason
    detail: str
    url: str | None


def clean_text(value: str | None, limit: int = 10**9) -> str | None:
    if value is None:
        return None
    text = _SPACE.sub(" ", value).strip()
    return text[:limit] if text else None


# ------------------------------------------------------------------ parsers


def parse_selectolax(html: str) -> ParsedPage:
    from selectolax.lexbor import LexborHTMLParser

    tree = LexborHTMLParser(html)
    root = tree.css_first("html")
    lang = root.attributes.get("lang") if root is not None else None
    base = tree.css_first("base[href]")
    metas = tuple(
        ((node.attributes.get("name") or "").strip().lower(), node.attributes.get("content") or "")
        for node in tree.css("meta[name]")
    )
    images = []
    for node in tree.css("img"):
        attrs = {k.lower(): v for k, v in node.attributes.items() if v is not None}
        # One walk up for the enclosing <picture> (its <source>s) and <figure>.
        sources: tuple[str, ...] = ()
        figcaption = None
        picture_seen = False
        ancestor = node.parent
        while ancestor is not None:
            if ancestor.tag == "picture" and not picture_seen:
                picture_seen = True
                sources = tuple(s.attributes.get("srcset") or "" for s in ancestor.css("source"))
            elif ancestor.tag == "figure":
                caption_node = ancestor.css_first("figcaption")
                figcaption = caption_node.text(deep=True) if caption_node is not None else None
                break
            ancestor = ancestor.parent
        images.append(ImgTag(attrs, sources, figcaption))
    return ParsedPage(base.attributes.get("href") if base is not None else None, lang, metas, tuple(images))


@lru_cache(maxsize=1)
def _lxml_parser():
    import lxml.html

    return lxml.html.HTMLParser(encoding="utf-8")


def parse_lxml(html: str) -> ParsedPage:
    import lxml.etree
    import lxml.html

    try:
        root = lxml.html.document_fromstring(html.encode("utf-8", "replace"), parser=_lxml_parser())
    except (lxml.etree.ParserError, ValueError):  # an empty document
        return ParsedPage(None, None, (), ())
    lang = root.get("lang") if root.tag == "html" else None
    base = next((el.get("href") for el in root.iter("base") if el.get("href") is not None), None)
    metas = tuple(
        ((el.get("name") or "").strip().lower(), el.get("content") or "") for el in root.iter("meta") if el.get("name") is not None
    )
    images = []
    for el in root.iter("img"):
        attrs = {str(k).lower(): str(v) for k, v in el.attrib.items()}
        # libxml2 does not know <source> is void, so an <img> may sit inside one:
        # look for the nearest <picture> above, not just the parent.
        picture = next(el.iterancestors("picture"), None)
        sources = tuple(s.get("srcset") or "" for s in picture.iter("source")) if picture is not None else ()
        figcaption = None
        figure = next(el.iterancestors("figure"), None)
        if figure is not None:
            caption_el = next(figure.iter("figcaption"), None)
            figcaption = caption_el.text_content() if caption_el is not None else None
        images.append(ImgTag(attrs, sources, figcaption))
    return ParsedPage(base, lang, metas, tuple(images))


PARSERS: dict[str, Callable[[str], ParsedPage]] = {"selectolax": parse_selectolax, "lxml": parse_lxml}


def parse_wat_metadata(html_metadata: dict) -> ParsedPage:
    """A WAT record's `HTML-Metadata` as a ParsedPage: `Links` with path
    `IMG@/src` become images (alt and title only: WAT keeps no sizes,
    srcsets or figcaptions), `Head.Base` and `Head.Metas` as in HTML."""
    head = html_metadata.get("Head") or {}
    metas = tuple(
        ((m.get("name") or "").strip().lower(), m.get("content") or "")
        for m in head.get("Metas") or []
        if isinstance(m, dict) and m.get("name")
    )
    images = tuple(
        ImgTag({k: str(link[k]) for k in ("alt", "title") if link.get(k) is not None} | {"src": str(link.get("url") or "")})
        for link in html_metadata.get("Links") or []
        if isinstance(link, dict) and str(link.get("path", "")).upper() == "IMG@/SRC"
    )
    base = head.get("Base")
    return ParsedPage(base if isinstance(base, str) else None, None, metas, images)


# ------------------------------------------------------------------ rules


def parse_srcset(value: str) -> list[tuple[str, float | None, float | None]]:
    """(url, width, density) per candidate of a srcset, following the HTML
    spec's tokenising (URLs may contain commas; a trailing comma ends one)."""
    out = []
    i, n = 0, len(value)
    while i < n:
        while i < n and (value[i].isspace() or value[i] == ","):
            i += 1
        start = i
        while i < n and not value[i].isspace():
            i += 1
        url = value[start:i]
        if not url:
            break
        descriptor = ""
        if url.endswith(","):
            url = url.rstrip(",")
        else:
            depth, start = 0, i
            while i < n and (depth or value[i] != ","):
                depth += {"(": 1, ")": -1}.get(value[i], 0)
                i += 1
            descriptor = value[start:i].strip()
        width = density = None
        for token in descriptor.split():
            try:
                if token[-1:].lower() == "w":
                    width = float(token[:-1])
                elif token[-1:].lower() == "x":
                    density = float(token[:-1])
            except ValueError:
                pass
        if url:
            out.append((url, width, density))
    return out


def choose_url(tag: ImgTag, config: ImagesConfig) -> str | None:
    """The raw (unresolved) URL of the image, per the module doc."""
    candidates = []
    for srcset in (*tag.source_srcsets, tag.attrs.get("srcset"), *(tag.attrs.get(a) for a in config.lazy_srcset_attributes)):
        if srcset:
            candidates += parse_srcset(srcset)
    real = [c for c in candidates if not c[0].lower().startswith("data:")]
    if real:
        with_width = [c for c in real if c[1] is not None]
        if with_width:
            return max(with_width, key=lambda c: c[1])[0]
        return max(real, key=lambda c: c[2] if c[2] is not None else 1.0)[0]
    for attr in (*config.lazy_src_attributes, "src"):
        value = (tag.attrs.get(attr) or "").strip()
        if value and not (value.lower().startswith("data:") and attr != "src"):
            return value
    return candidates[0][0] if candidates else None


def _dimension(value: str | None) -> int | None:
    match = _DIMENSION.match(value or "")
    return int(match.group(1)) if match else None


def resolve(base: str, raw: str) -> str:
    return urldefrag(urljoin(base, _URL_WHITESPACE.sub("", raw.strip())))[0]


@lru_cache(maxsize=32)
def _tracking_regex(patterns: tuple[str, ...]) -> re.Pattern | None:
    return re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE) if patterns else None


def page_base(page_url: str, parsed: ParsedPage) -> str:
    if parsed.base_href and parsed.base_href.strip():
        return urljoin(page_url, _URL_WHITESPACE.sub("", parsed.base_href.strip()))
    return page_url


def image_result(tag: ImgTag, base: str, config: ImagesConfig) -> Candidate | ImageDrop:
    raw = choose_url(tag, config)
    if not raw:
        return ImageDrop(ExtractReason.BAD_URL, "no src", None)
    if raw.lower().startswith("data:"):
        return ImageDrop(ExtractReason.DATA_URI, raw[:40], None)
    try:
        url = resolve(base, raw)
        parts = urlsplit(url)
    except ValueError as err:
        return ImageDrop(ExtractReason.BAD_URL, f"{raw[:200]!r}: {err}", raw[:2000])
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return ImageDrop(ExtractReason.BAD_URL, f"not an absolute http(s) URL: {url[:200]!r}", url[:2000])
    width, height = _dimension(tag.attrs.get("width")), _dimension(tag.attrs.get("height"))
    limit = config.tracking_pixel_max_side
    if limit and any(side is not None and side <= limit for side in (width, height)):
        return ImageDrop(ExtractReason.TRACKING_PIXEL, f"declared {width}x{height}", url)
    pattern = _tracking_regex(tuple(config.tracking_url_patterns))
    if pattern is not None and (match := pattern.search(url)):
        return ImageDrop(ExtractReason.TRACKING_PIXEL, f"URL matches {match.group(0)!r}", url)
    texts = {
        "alt": clean_text(tag.attrs.get("alt"), config.max_caption_chars),
        "title": clean_text(tag.attrs.get("title"), config.max_caption_chars),
        "figcaption": clean_text(tag.figcaption, config.max_caption_chars),
    }
    source = next((name for name in config.caption_order if texts[name]), None)
    if source is None:
        return ImageDrop(ExtractReason.NO_TEXT, "no alt, title or figcaption", url)
    return Candidate(
        url=url,
        caption=texts[source],
        caption_source=source,
        width=width or None,
        height=height or None,
        alt=texts["alt"],
        title=texts["title"],
        figcaption=texts["figcaption"],
    )


def _directives(value: str) -> set[str]:
    return {d.strip().lower() for d in value.split(",") if d.strip()}


def opt_out(parsed: ParsedPage, headers: Iterable[tuple[str, str]], config: OptOutConfig) -> str | None:
    """Why the page opts out (for the reject's detail), or None."""
    wanted = {d.strip().lower() for d in config.directives}
    if not wanted:
        return None
    token = (config.user_agent_token or "").strip().lower()
    for name, content in parsed.metas:
        if name == "robots" or (token and name == token):
            hit = _directives(content) & wanted
            if hit:
                return f'<meta name="{name}" content="{",".join(sorted(hit))}">'
    for key, value in headers:
        if key.strip().lower() != "x-robots-tag":
            continue
        agent, sep, rest = value.partition(":")
        scoped = bool(sep) and not _directives(agent) & wanted and " " not in agent.strip()
        if scoped and agent.strip().lower() != token:
            continue
        hit = _directives(rest if scoped else value) & wanted
        if hit:
            return f"X-Robots-Tag: {value.strip()}"
    return None


def page_images(page_url: str, parsed: ParsedPage, config: ImagesConfig) -> list[Candidate | ImageDrop]:
    """One result per <img> of the page, in document order."""
    base = page_base(page_url, parsed)
    return [image_result(tag, base, config) for tag in parsed.images]

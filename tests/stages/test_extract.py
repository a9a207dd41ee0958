"""The extract core on WARC, WAT and page-list files written by the tests
(tests/stages/extract_cases.py says what must come out of each, exactly),
with both parsers; the rules one by one; and a real WARC file from another
project's package."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from schemas.extract import ExtractConfig, ExtractReason, ImagePair, ImagesConfig, OptOutConfig, RecordsConfig
from stages.core import extract as core
from stages.core import html_images, warc
from tests.stages import extract_cases as cases

PARSERS = ("selectolax", "lxml")
DATA = Path(__file__).resolve().parent.parent / "data"


def _open(path: str):
    return open(path, "rb")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return cases.write_corpus(tmp_path_factory.mktemp("extract-cases"))


def run_file(path: str, parser: str, ordinal: int = 0):
    config = ExtractConfig.model_validate({"images": {"parser": parser}})
    counts = core.FileCounts()
    items = list(core.extract_file(path, ordinal, _open, config, counts))
    return items, counts


_PAIR_FIELDS = ("page_url", "url", "caption", "caption_source", "width", "height", "alt", "title", "figcaption", "language")


@pytest.mark.parametrize("parser", PARSERS)
@pytest.mark.parametrize("name", ["main", "broken", "wat", "pages"])
def test_every_case_has_its_stated_fate(corpus, name, parser):
    items, counts = run_file(corpus[name], parser, ordinal=3)
    pairs = [i for i in items if isinstance(i, ImagePair)]
    rejects = [i for i in items if not isinstance(i, ImagePair)]
    assert [{f: getattr(p, f) for f in _PAIR_FIELDS} for p in pairs] == cases.PAIRS[name]
    assert [(r.reason.value, r.page_url, r.image_url) for r in rejects] == cases.REJECTS[name]
    other = {k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("other:")}
    assert other == {k: v for k, v in cases.OTHER[name].items() if v}
    # Accounting: every record is a page, another record type or a reject; every image a pair or a reject.
    page_rejects = sum(1 for r in rejects if r.image_url is None and r.reason.value in ("bad_record", "not_html", "decode_error", "page_opt_out"))
    image_rejects = len(rejects) - page_rejects
    assert counts["records"] == sum(other.values()) + counts["pages"] + page_rejects
    assert counts["images"] == counts["candidates"] + image_rejects == len(pairs) + image_rejects
    # Provenance: the file, the ordinal, and a running image index in file order.
    assert all(p.source_file == corpus[name] and p.file_ordinal == 3 for p in pairs)
    indices = [p.image_index for p in pairs]
    assert indices == sorted(set(indices))


def test_offsets_are_those_of_the_warc_records(tmp_path):
    from pipelines.testing import warcgen

    html = b'<html><body><img src="a.jpg" alt="Offset check"></body></html>'
    records = [warcgen.request("http://o.test/"), warcgen.response("http://o.test/1", html), warcgen.response("http://o.test/2", html)]
    for name in ("o.warc.gz", "o.warc"):
        offsets = warcgen.write_warc(tmp_path / name, records)
        items, _ = run_file(str(tmp_path / name), "selectolax")
        assert [p.source_offset for p in items] == offsets[1:]
        # The offset is where the record starts: warcio reads it back from there.
        from warcio.archiveiterator import ArchiveIterator

        with open(tmp_path / name, "rb") as f:
            f.seek(offsets[2])
            record = next(iter(ArchiveIterator(f)))
            assert record.rec_headers.get_header("WARC-Target-URI") == "http://o.test/2"


def test_truncated_payload_is_parsed_up_to_max_page_bytes(tmp_path):
    from pipelines.testing import warcgen

    html = b'<html><body><img src="a.jpg" alt="Early image">' + b"<p>filler</p>" * 1000 + b'<img src="late.jpg" alt="Late image"></body></html>'
    warcgen.write_warc(tmp_path / "t.warc.gz", [warcgen.response("http://t.test/", html)])
    config = ExtractConfig.model_validate({"records": {"max_page_bytes": 2000}})
    counts = core.FileCounts()
    items = list(core.extract_file(str(tmp_path / "t.warc.gz"), 0, _open, config, counts))
    assert [p.caption for p in items] == ["Early image"]


def test_unknown_input_kind_is_named():
    with pytest.raises(ValueError, match="cannot tell the input kind"):
        warc.source_kind("crawl/file.zip")
    assert [warc.source_kind(p) for p in ("a.warc.gz", "a.warc", "CC-x.warc.wat.gz", "b.wat", "pages.tsv")] == [
        "warc", "warc", "wat", "wat", "pages"
    ]


# ------------------------------------------------------------------ rules


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("a.jpg 1x, b.jpg 2x", [("a.jpg", None, 1.0), ("b.jpg", None, 2.0)]),
        ("a.jpg 100w,b.jpg 200w", [("a.jpg", 100.0, None), ("b.jpg", 200.0, None)]),
        ("a,b.jpg 1x, c.jpg", [("a,b.jpg", None, 1.0), ("c.jpg", None, None)]),
        ("  a.jpg,  b.jpg 3x ", [("a.jpg", None, None), ("b.jpg", None, 3.0)]),
        ("img.jpg 300w 200h, x.jpg (garbage) 2x", [("img.jpg", 300.0, None), ("x.jpg", None, 2.0)]),
        ("", []),
    ],
)
def test_parse_srcset(value, expected):
    assert html_images.parse_srcset(value) == expected


def _one(html: str, page="http://p.test/d/x.html", parser="selectolax", **images):
    parsed = html_images.PARSERS[parser](html)
    return html_images.page_images(page, parsed, ImagesConfig(**images))


@pytest.mark.parametrize("parser", PARSERS)
def test_caption_order_is_configurable(parser):
    html = '<figure><img src="a.jpg" alt="Alt text" title="Title text"><figcaption>Figure text</figcaption></figure>'
    assert _one(html, parser=parser)[0].caption == "Alt text"
    got = _one(html, parser=parser, caption_order=["title", "alt"])[0]
    assert (got.caption, got.caption_source, got.figcaption) == ("Title text", "title", "Figure text")


def test_tracking_checks_can_be_disabled():
    html = '<img src="/pixel.gif" width="1" height="1" alt="pixel alt">'
    assert _one(html)[0].reason == ExtractReason.TRACKING_PIXEL
    assert _one(html, tracking_pixel_max_side=0, tracking_url_patterns=[])[0].url == "http://p.test/pixel.gif"


def test_opt_out_rules():
    config = OptOutConfig()
    page = html_images.parse_selectolax('<meta name="robots" content="nofollow">')
    assert html_images.opt_out(page, [("X-Robots-Tag", "unavailable_after: 25 Jun 2010 15:00:00 PST")], config) is None
    assert html_images.opt_out(page, [("x-robots-tag", "NoImageIndex")], config) == "X-Robots-Tag: NoImageIndex"
    assert html_images.opt_out(page, [("X-Robots-Tag", "noai")], OptOutConfig(directives=[])) is None


def test_decode_order():
    records = RecordsConfig()
    text = "Grüße"
    assert warc.decode_html(text.encode("utf-8"), "text/html; charset=iso-8859-1", records) == text.encode("utf-8").decode("latin-1")
    assert warc.decode_html(b"\xef\xbb\xbf" + text.encode("utf-8"), None, records) == "\ufeff" + text
    assert warc.decode_html(text.encode("utf-16"), "text/html; charset=utf-16", records) == text
    # Mostly UTF-8 with one stray byte: the fallback with a replacement character.
    body = ("<html><body>" + "Plain text " * 50 + "Grüße</body></html>").encode() + b"\xff"
    decoded = warc.decode_html(body, "text/html; charset=utf-8", records)
    assert decoded is not None and "Grüße" in decoded


# ------------------------------------------------------------------ a real WARC file

REAL_WARC = DATA / "at.warc.gz"
REAL_WARC_SHA256 = "931438c6ac96de6292d85deb3b7d9e0156a1bf1b793542daacc9b982bee6a04e"


def test_real_warc_from_warcat(request):
    """`example/at.warc.gz` from the Warcat 2.2.5 sdist on PyPI (Archive Team's
    wget capture of www.archiveteam.org, 2013; see tests/data/README.md):
    8 records: warcinfo, 2 requests, 2 HTML responses (the 301 redirect page at
    `/` and MediaWiki's Main_Page) and 3 wget `resource` records (log, manifest).
    Main_Page has 3 <img> tags, all with alt text: 3 pairs, no rejects. Both
    parsers agree."""
    items, counts = run_file(str(REAL_WARC), "selectolax")
    pairs = [i for i in items if isinstance(i, ImagePair)]
    rejects = [i for i in items if not isinstance(i, ImagePair)]
    lxml_items, lxml_counts = run_file(str(REAL_WARC), "lxml")
    assert lxml_counts == counts and [i.model_dump() for i in lxml_items] == [i.model_dump() for i in items]
    summary = {
        "records": counts["records"], "pages": counts["pages"], "images": counts["images"],
        "pairs": len(pairs), "rejects": sorted(r.reason.value for r in rejects),
        "other": {k: v for k, v in counts.items() if k.startswith("other:")},
    }
    request.node.user_properties.append(("real_warc", summary))
    assert summary == REAL_WARC_SUMMARY
    assert hashlib.sha256(REAL_WARC.read_bytes()).hexdigest() == REAL_WARC_SHA256
    assert [(p.url, p.caption) for p in pairs] == [
        ("http://www.archiveteam.org/images/thumb/e/e6/Archiveteam.jpg/200px-Archiveteam.jpg", "Archiveteam.jpg"),
        ("http://www.archiveteam.org/images/8/8a/Archivetime.png", "Archivetime.png"),
        ("http://www.archiveteam.org/skins/common/images/poweredby_mediawiki_88x31.png", "Powered by MediaWiki"),
    ]
    assert {p.page_url for p in pairs} == {"http://www.archiveteam.org/index.php?title=Main_Page"}
    assert pairs[0].source_file == str(REAL_WARC)


REAL_WARC_SUMMARY = {
    "records": 8,
    "pages": 2,
    "images": 3,
    "pairs": 3,
    "rejects": [],
    "other": {"other:warcinfo": 1, "other:request": 2, "other:resource": 3},
}


@pytest.mark.parametrize("name", ["junk.warc.gz", "junk.warc", "junk.warc.wat.gz"])
def test_junk_and_empty_files_are_counted_not_crashes(tmp_path, name):
    import gzip
    import random

    junk = tmp_path / name
    junk.write_bytes(random.Random(1).randbytes(5000))
    items, counts = run_file(str(junk), "selectolax")
    assert [(i.reason.value, i.source_offset) for i in items] == [("bad_record", 0)] and counts["records"] == 1
    # A gzip member of junk: the same.
    junk.write_bytes(gzip.compress(random.Random(2).randbytes(5000)))
    items, _ = run_file(str(junk), "selectolax")
    assert [i.reason.value for i in items] == ["bad_record"]
    empty = tmp_path / ("empty-" + name)
    empty.write_bytes(b"")
    items, counts = run_file(str(empty), "selectolax")
    assert items == [] and counts["records"] == 0

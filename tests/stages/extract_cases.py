"""The case corpus for the extract tests: WARC, WAT and page-list files written
with warcio from generated pages, and what must come out of each, exactly.

Every image tag and every record has a stated fate: `PAIRS` lists the
candidates (before the global dedup steps) in file order, `REJECTS` every
record, page and image reject, `OTHER` the records that are not pages, and
`DEDUP` what the global steps drop with `max_captions_per_url: 2`.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

from pipelines.testing import warcgen

SITE = "http://site.test"

# -- main.warc.gz -----------------------------------------------------------------

P1 = f"{SITE}/dir/p1.html"
P1_HTML = f"""<!DOCTYPE html><html lang="de-DE"><head><title>one</title>
<meta name="robots" content="index, follow"></head><body>
<img src="img/a.jpg" alt="A red car">
<img src="/abs/b.jpg" alt="Absolute path b">
<img src="../up/c.jpg" title="Title C only">
<img src="//cdn.test/d.jpg" alt="  Spaced   alt
 text ">
<img src="e.jpg" srcset="e-1x.jpg 1x, e-2x.jpg 2x, e-15.jpg 1.5x" alt="Density E">
<img src="f.jpg" srcset="f-320.jpg 320w, f-1280.jpg 1280w, f-640.jpg 640w" sizes="100vw" alt="Width F">
<img src="g.jpg" width="640" height="480" alt="Sized G">
<img src="h.jpg#frag" width="100%" height="auto" alt="Percent H &amp; more">
</body></html>""".encode()

P2 = f"{SITE}/other/p2.html"
P2_HTML = b"""<html><head><base href="http://static.test/base/"></head><body>
<img src="g.jpg" alt="Based G">
<picture><source media="(min-width: 800px)" srcset="h-small.webp 480w, h-large.webp 1920w">
<source srcset="h.avif 1x, h-2x.avif 2x"><img src="h.jpg" alt="Picture H"></picture>
<picture><source srcset="q.avif 1x, q-3x.avif 3x"><img src="q.jpg" alt="Picture Q"></picture>
<img src="data:image/gif;base64,R0lGODlhAQABAAAAACw=" data-src="lazy-i.jpg" alt="Lazy I">
<img data-srcset="j-300.jpg 300w, j-900.jpg 900w" alt="Lazy J">
<figure><img src="k.jpg" alt="" title="Title K"><figcaption> Caption <em>K</em> </figcaption></figure>
<figure><div><img src="l.jpg" alt="Alt L"></div><figcaption>Fig L</figcaption></figure>
<img src="data:image/png;base64,iVBORw0KGgo=" alt="Data only">
<img src="t.gif" width="1" height="1" alt="tracker">
<img src="https://www.facebook.com/tr?id=1&amp;ev=PageView" alt="fb pixel">
<img src="m.jpg">
<img src="n.jpg" alt="   ">
<img src="javascript:void(0)" alt="js link">
<img alt="no src at all">
</body></html>"""

P3 = f"{SITE}/dir/p3.html"  # duplicates and the caption cap
P3_HTML = b"""<html><body>
<img src="img/a.jpg" alt="A red car">
<img src="/dir/img/a.jpg" alt="Another caption">
<img src="http://site.test/dir/img/a.jpg" alt="Third caption">
</body></html>"""

BROKEN = f"{SITE}/broken.html"
BROKEN_HTML = b"""<html><body><div><span><img src=t1.jpg alt=Unquoted one></span></div></span></div>
<table><tr><td><img src="t2.jpg" alt="In a broken table"></table>
<p>unclosed <b>bold <img src="t3.jpg" alt="Inside unclosed"> text that is cut off in the midd"""

CP1252 = f"{SITE}/cp1252.html"  # header says utf-8, bytes and <meta> are windows-1252
CP1252_HTML = '<html><head><meta charset="windows-1252"></head><body><img src="cafe.jpg" alt="Café crème"></body></html>'.encode("cp1252")
UNKNOWN = f"{SITE}/unknown-charset.html"  # header names a charset that does not exist
UNKNOWN_HTML = '<html><body><img src="u.jpg" alt="Ünïcode ok"></body></html>'.encode()
UNDECLARED = f"{SITE}/latin1.html"  # no charset anywhere, latin-1 bytes
UNDECLARED_HTML = '<html><body><img src="l1.jpg" alt="Straße und Brücke über den Fluß"></body></html>'.encode("latin-1")
GARBAGE = f"{SITE}/garbage.html"
GARBAGE_BODY = random.Random(0).randbytes(4096)

OPT_META = f"{SITE}/opt-meta.html"
OPT_HEADER = f"{SITE}/opt-header.html"
OPT_SCOPED_OTHER = f"{SITE}/opt-other-agent.html"
OPT_SCOPED_US = f"{SITE}/opt-our-agent.html"
OPT_META_TOKEN = f"{SITE}/opt-meta-token.html"

_IMG = b'<html><body><img src="x.jpg" alt="Opt case image"></body></html>'

# -- broken.warc.gz: one good record, then a cut gzip member -----------------------
GOOD = f"{SITE}/good.html"
GOOD_HTML = b'<html><body><img src="good.jpg" alt="Good before the cut"></body></html>'

# -- crawl.wat.gz ------------------------------------------------------------------
WAT_PAGE = f"{SITE}/wat/page.html"
WAT_OPT = f"{SITE}/wat/opt.html"
WAT_PDF = f"{SITE}/wat/doc.pdf"

# -- pages/pages.tsv -----------------------------------------------------------------
LIST_A = "http://list.test/a/"
LIST_B = "http://list.test/b/index.html"


def _wat_envelope(url: str, warc_type: str, headers: dict | None, html: dict | None) -> bytes:
    payload = {"Actual-Content-Type": "application/http; msgtype=response"}
    if headers is not None:
        response = {"Response-Message": {"Status": "200"}, "Headers": headers}
        if html is not None:
            response["HTML-Metadata"] = html
        payload["HTTP-Response-Metadata"] = response
    return json.dumps(
        {"Envelope": {"WARC-Header-Metadata": {"WARC-Type": warc_type, "WARC-Target-URI": url}, "Payload-Metadata": payload}}
    ).encode()


def write_corpus(root: Path) -> dict[str, str]:
    """Write every input file under `root`; returns {name: path}."""
    root.mkdir(parents=True, exist_ok=True)
    main = [
        warcgen.request(P1),
        warcgen.response(P1, P1_HTML),
        warcgen.response(P2, P2_HTML, content_type="text/html"),
        warcgen.revisit(P1),
        warcgen.response(f"{SITE}/photo.jpg", b"\xff\xd8\xff\xe0 not html", content_type="image/jpeg"),
        warcgen.response(f"{SITE}/doc.pdf", b"%PDF-1.4", content_type="application/pdf"),
        warcgen.response(P3, P3_HTML),
        warcgen.response(BROKEN, BROKEN_HTML),
        warcgen.response(CP1252, CP1252_HTML, content_type="text/html; charset=utf-8"),
        warcgen.response(UNKNOWN, UNKNOWN_HTML, content_type="text/html; charset=x-no-such-charset"),
        warcgen.response(UNDECLARED, UNDECLARED_HTML, content_type="text/html"),
        warcgen.response(GARBAGE, GARBAGE_BODY, content_type="text/html; charset=utf-8"),
        warcgen.response(OPT_META, b'<html><head><meta name="robots" content="noindex, NoAI"></head><body><img src="x.jpg" alt="Opt case image"></body></html>'),
        warcgen.response(OPT_HEADER, _IMG, headers=(("X-Robots-Tag", "noimageai"),)),
        warcgen.response(OPT_SCOPED_OTHER, _IMG, headers=(("X-Robots-Tag", "otherbot: noai, noindex"),)),
        warcgen.response(OPT_SCOPED_US, _IMG, headers=(("X-Robots-Tag", "img2dataset: noimageindex"),)),
        warcgen.response(OPT_META_TOKEN, b'<html><head><meta name="img2dataset" content="noimageai"></head><body><img src="x.jpg" alt="Opt case image"></body></html>'),
        warcgen.response(f"{SITE}/no-type.html", b"<!DOCTYPE html><html><body><img src='nt.jpg' alt='No content type header'></body></html>", content_type=None),
        warcgen.response(f"{SITE}/no-type.bin", b"\x00\x01binary", content_type=None),
    ]
    paths = {}
    paths["main"] = str(root / "main.warc.gz")
    with_info = root / "main.warc.gz"
    warcgen.write_warc(with_info, main)

    broken = root / "broken.warc.gz"
    warcgen.write_warc(broken, [warcgen.response(GOOD, GOOD_HTML)])
    lost = root / "lost.warc.gz"
    warcgen.write_warc(lost, [warcgen.response(f"{SITE}/lost.html", P1_HTML)])
    # Junk between two records: nothing after it can be found again.
    broken.write_bytes(broken.read_bytes() + b"this is not a WARC record\r\n\r\n" + lost.read_bytes())
    lost.unlink()
    paths["broken"] = str(broken)

    wat = [
        warcgen.metadata(WAT_PAGE, _wat_envelope(WAT_PAGE, "response", {"Content-Type": "text/html; charset=utf-8"}, {
            "Head": {"Title": "wat page", "Base": "http://static.test/w/", "Metas": [{"name": "robots", "content": "index"}]},
            "Links": [
                {"path": "A@/href", "url": "/about", "text": "About"},
                {"path": "IMG@/src", "url": "w1.jpg", "alt": "WAT image one"},
                {"path": "IMG@/src", "url": "/w2.jpg", "title": "WAT title two"},
                {"path": "IMG@/src", "url": "w3.jpg"},
                {"path": "IMG@/src", "url": "data:image/gif;base64,AAAA", "alt": "inline"},
            ],
        })),
        warcgen.metadata(WAT_PAGE, _wat_envelope(WAT_PAGE, "request", None, None)),
        warcgen.metadata(WAT_OPT, _wat_envelope(WAT_OPT, "response", {"Content-Type": "text/html", "X-Robots-Tag": "noai"}, {
            "Head": {}, "Links": [{"path": "IMG@/src", "url": "o.jpg", "alt": "opted out"}]})),
        warcgen.metadata(WAT_PDF, _wat_envelope(WAT_PDF, "response", {"Content-Type": "application/pdf"}, None)),
        warcgen.metadata(f"{SITE}/wat/bad.html", b'{"Envelope": '),
    ]
    paths["wat"] = str(root / "crawl.warc.wat.gz")
    warcgen.write_warc(root / "crawl.warc.wat.gz", wat)

    pages = root / "pages"
    pages.mkdir(exist_ok=True)
    (pages / "a.html").write_bytes(b'<html lang="fr"><body><img src="p/a1.jpg" alt="Liste une"><img src="a2.jpg"></body></html>')
    (pages / "sub").mkdir(exist_ok=True)
    (pages / "sub" / "b.html").write_bytes(b'<html><body><figure><img src="/b1.png"><figcaption>Liste deux</figcaption></figure></body></html>')
    (root / "pages.tsv").write_text(
        f"pages/a.html\t{LIST_A}\npages/sub/b.html\t{LIST_B}\n\npages/missing.html\thttp://list.test/missing\nno-url-here\n"
    )
    paths["pages"] = str(root / "pages.tsv")
    return paths


def _c(page, url, caption, source, *, width=None, height=None, alt=None, title=None, figcaption=None, language=None):
    return {
        "page_url": page, "url": url, "caption": caption, "caption_source": source, "width": width, "height": height,
        "alt": alt, "title": title, "figcaption": figcaption, "language": language,
    }


# Candidates per file, in file order (before dedup).
PAIRS = {
    "main": [
        _c(P1, f"{SITE}/dir/img/a.jpg", "A red car", "alt", alt="A red car", language="de-DE"),
        _c(P1, f"{SITE}/abs/b.jpg", "Absolute path b", "alt", alt="Absolute path b", language="de-DE"),
        _c(P1, f"{SITE}/up/c.jpg", "Title C only", "title", title="Title C only", language="de-DE"),
        _c(P1, "http://cdn.test/d.jpg", "Spaced alt text", "alt", alt="Spaced alt text", language="de-DE"),
        _c(P1, f"{SITE}/dir/e-2x.jpg", "Density E", "alt", alt="Density E", language="de-DE"),
        _c(P1, f"{SITE}/dir/f-1280.jpg", "Width F", "alt", alt="Width F", language="de-DE"),
        _c(P1, f"{SITE}/dir/g.jpg", "Sized G", "alt", width=640, height=480, alt="Sized G", language="de-DE"),
        _c(P1, f"{SITE}/dir/h.jpg", "Percent H & more", "alt", alt="Percent H & more", language="de-DE"),
        _c(P2, "http://static.test/base/g.jpg", "Based G", "alt", alt="Based G"),
        _c(P2, "http://static.test/base/h-large.webp", "Picture H", "alt", alt="Picture H"),
        _c(P2, "http://static.test/base/q-3x.avif", "Picture Q", "alt", alt="Picture Q"),
        _c(P2, "http://static.test/base/lazy-i.jpg", "Lazy I", "alt", alt="Lazy I"),
        _c(P2, "http://static.test/base/j-900.jpg", "Lazy J", "alt", alt="Lazy J"),
        _c(P2, "http://static.test/base/k.jpg", "Caption K", "figcaption", title="Title K", figcaption="Caption K"),
        _c(P2, "http://static.test/base/l.jpg", "Alt L", "alt", alt="Alt L", figcaption="Fig L"),
        _c(P3, f"{SITE}/dir/img/a.jpg", "A red car", "alt", alt="A red car"),
        _c(P3, f"{SITE}/dir/img/a.jpg", "Another caption", "alt", alt="Another caption"),
        _c(P3, f"{SITE}/dir/img/a.jpg", "Third caption", "alt", alt="Third caption"),
        _c(BROKEN, f"{SITE}/t1.jpg", "Unquoted", "alt", alt="Unquoted"),
        _c(BROKEN, f"{SITE}/t2.jpg", "In a broken table", "alt", alt="In a broken table"),
        _c(BROKEN, f"{SITE}/t3.jpg", "Inside unclosed", "alt", alt="Inside unclosed"),
        _c(CP1252, f"{SITE}/cafe.jpg", "Café crème", "alt", alt="Café crème"),
        _c(UNKNOWN, f"{SITE}/u.jpg", "Ünïcode ok", "alt", alt="Ünïcode ok"),
        _c(UNDECLARED, f"{SITE}/l1.jpg", "Straße und Brücke über den Fluß", "alt", alt="Straße und Brücke über den Fluß"),
        _c(OPT_SCOPED_OTHER, f"{SITE}/x.jpg", "Opt case image", "alt", alt="Opt case image"),
        _c(f"{SITE}/no-type.html", f"{SITE}/nt.jpg", "No content type header", "alt", alt="No content type header"),
    ],
    "broken": [_c(GOOD, f"{SITE}/good.jpg", "Good before the cut", "alt", alt="Good before the cut")],
    "wat": [
        _c(WAT_PAGE, "http://static.test/w/w1.jpg", "WAT image one", "alt", alt="WAT image one"),
        _c(WAT_PAGE, "http://static.test/w2.jpg", "WAT title two", "title", title="WAT title two"),
    ],
    "pages": [
        _c(LIST_A, "http://list.test/a/p/a1.jpg", "Liste une", "alt", alt="Liste une", language="fr"),
        _c(LIST_B, "http://list.test/b1.png", "Liste deux", "figcaption", figcaption="Liste deux"),
    ],
}

# (reason, page URL, image URL) per reject, in file order.
REJECTS = {
    "main": [
        ("data_uri", P2, None),
        ("tracking_pixel", P2, "http://static.test/base/t.gif"),
        ("tracking_pixel", P2, "https://www.facebook.com/tr?id=1&ev=PageView"),
        ("no_text", P2, "http://static.test/base/m.jpg"),
        ("no_text", P2, "http://static.test/base/n.jpg"),
        ("bad_url", P2, "javascript:void(0)"),
        ("bad_url", P2, None),
        ("not_html", f"{SITE}/photo.jpg", None),
        ("not_html", f"{SITE}/doc.pdf", None),
        ("decode_error", GARBAGE, None),
        ("page_opt_out", OPT_META, None),
        ("page_opt_out", OPT_HEADER, None),
        ("page_opt_out", OPT_SCOPED_US, None),
        ("page_opt_out", OPT_META_TOKEN, None),
        ("not_html", f"{SITE}/no-type.bin", None),
    ],
    "broken": [("bad_record", None, None)],
    "wat": [
        ("no_text", WAT_PAGE, "http://static.test/w/w3.jpg"),
        ("data_uri", WAT_PAGE, None),
        ("page_opt_out", WAT_OPT, None),
        ("not_html", WAT_PDF, None),
        ("bad_record", f"{SITE}/wat/bad.html", None),
    ],
    "pages": [
        ("no_text", LIST_A, "http://list.test/a/a2.jpg"),
        ("bad_record", "http://list.test/missing", None),
        ("bad_record", None, None),
    ],
}

OTHER = {
    "main": {"request": 1, "revisit": 1},
    "broken": {},
    "wat": {"wat:request": 1},
    "pages": {"blank_line": 1},
}

# With dedup.max_captions_per_url = 2: P3's first image repeats P1's pair, and
# a.jpg then has three distinct captions, of which the last is over the cap.
DEDUP = [
    ("duplicate_pair", P3, f"{SITE}/dir/img/a.jpg", "A red car"),
    ("caption_cap", P3, f"{SITE}/dir/img/a.jpg", "Third caption"),
]


def sort_rejects(rows):
    return sorted(rows, key=lambda r: tuple("" if v is None else str(v) for v in r))


def gzip_bytes(data: bytes) -> bytes:
    return gzip.compress(data)

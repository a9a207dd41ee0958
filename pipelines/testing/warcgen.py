"""WARC files written with warcio from generated pages, for tests, the
benchmark and demos of `beam run extract`.

    records = [response("http://site.test/a.html", b"<html>...", content_type="text/html"),
               request("http://site.test/a.html"), revisit("http://site.test/a.html")]
    write_warc(path, records)          # .warc.gz: one gzip member per record

`realistic_page(rng, target_bytes, ...)` makes an HTML page of about
`target_bytes` with text, links, scripts and a mix of image tags (plain, srcset,
lazy, picture, figure, pixels, data: URIs), like pages in Common Crawl.
"""

from __future__ import annotations

import dataclasses
import io
import random
from collections.abc import Iterable
from pathlib import Path

from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter


@dataclasses.dataclass(frozen=True)
class Record:
    url: str
    record_type: str
    payload: bytes = b""
    http_headers: tuple[tuple[str, str], ...] | None = None
    status: str = "200 OK"
    warc_headers: tuple[tuple[str, str], ...] = ()


def response(url: str, body: bytes, content_type: str | None = "text/html; charset=utf-8", headers=(), status="200 OK") -> Record:
    http = ((("Content-Type", content_type),) if content_type else ()) + tuple(headers)
    return Record(url, "response", body, http, status)


def request(url: str) -> Record:
    host = url.split("/")[2]
    return Record(url, "request", f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode(), None)


def revisit(url: str) -> Record:
    return Record(url, "revisit", b"", (("Content-Type", "text/html"),), warc_headers=(
        ("WARC-Profile", "http://netpreserve.org/warc/1.0/revisit/identical-payload-digest"),
        ("WARC-Refers-To-Target-URI", url),
    ))


def metadata(url: str, payload: bytes, content_type: str = "application/json") -> Record:
    return Record(url, "metadata", payload, None, warc_headers=(("Content-Type", content_type),))


def write_warc(path: str | Path, records: Iterable[Record], gzip: bool | None = None) -> list[int]:
    """Write `records`; returns each record's byte offset in the file."""
    path = Path(path)
    gzip = path.name.endswith(".gz") if gzip is None else gzip
    offsets = []
    with open(path, "wb") as f:
        writer = WARCWriter(f, gzip=gzip)
        for rec in records:
            offsets.append(f.tell())
            http = None
            if rec.http_headers is not None:
                http = StatusAndHeaders(rec.status, list(rec.http_headers), protocol="HTTP/1.1")
            extra = {k: v for k, v in rec.warc_headers if k != "Content-Type"}
            record = writer.create_warc_record(
                rec.url, rec.record_type, payload=io.BytesIO(rec.payload), http_headers=http,
                warc_headers_dict=extra, warc_content_type=dict(rec.warc_headers).get("Content-Type", ""),
            )
            writer.write_record(record)
    return offsets


_WORDS = (
    "river mountain garden city night market coffee table wooden chair old bridge sunset harbour boat "
    "yellow flower red car vintage poster family dinner winter forest street lamp stone house quiet "
    "morning light window portrait dog cat bicycle train station beach children playing"
).split()


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n)).capitalize()


def realistic_page(rng: random.Random, target_bytes: int, host: str = "site.test", n_images: int | None = None) -> tuple[str, int]:
    """(HTML of about `target_bytes`, number of image tags on it)."""
    n_images = rng.randint(5, 40) if n_images is None else n_images
    head = (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_sentence(rng, 6)}</title>'
        '<meta name="viewport" content="width=device-width"><link rel="stylesheet" href="/s.css">'
        "<script>window.dataLayer=window.dataLayer||[];function gtag(){dataLayer.push(arguments)}</script></head><body>"
    )
    parts = [head, '<nav><ul>' + "".join(f'<li><a href="/c/{i}">{rng.choice(_WORDS)}</a></li>' for i in range(20)) + "</ul></nav>"]
    images = []
    for i in range(n_images):
        kind = rng.random()
        name = f"/img/{rng.getrandbits(40):x}"
        alt = _sentence(rng, rng.randint(2, 9))
        if kind < 0.35:
            images.append(f'<img src="{name}.jpg" alt="{alt}" width="{rng.randint(200, 1600)}" height="{rng.randint(200, 1200)}">')
        elif kind < 0.55:
            images.append(f'<img src="{name}-400.jpg" srcset="{name}-400.jpg 400w, {name}-800.jpg 800w, {name}-1600.jpg 1600w" sizes="50vw" alt="{alt}">')
        elif kind < 0.7:
            images.append(f'<img src="data:image/gif;base64,R0lGODlhAQABAAAAACw=" data-src="{name}.jpg" class="lazy" alt="{alt}">')
        elif kind < 0.8:
            images.append(f'<picture><source type="image/webp" srcset="{name}.webp 1x, {name}@2x.webp 2x"><img src="{name}.jpg" alt="{alt}"></picture>')
        elif kind < 0.88:
            images.append(f'<figure><img src="https://cdn.{host}{name}.png"><figcaption>{_sentence(rng, 8)}</figcaption></figure>')
        elif kind < 0.94:
            images.append(f'<img src="/pixel.gif?u={rng.getrandbits(20)}" width="1" height="1" alt="">')
        else:
            images.append(f'<img src="{name}.png">')
    paragraphs = []
    size = len(head) + sum(len(x) for x in images)
    while size < target_bytes:
        para = f'<p class="c{rng.randint(0, 9)}">{_sentence(rng, rng.randint(20, 80))}. <a href="/p/{rng.getrandbits(32):x}">{rng.choice(_WORDS)}</a></p>'
        paragraphs.append(para)
        size += len(para)
    # Interleave the images with the text.
    step = max(1, len(paragraphs) // max(1, len(images)))
    body = []
    for i, para in enumerate(paragraphs):
        body.append(para)
        if i % step == 0 and images:
            body.append(images.pop())
    body.extend(images)
    parts.append("<main>" + "\n".join(body) + "</main>")
    parts.append('<footer><script src="/app.js"></script></footer></body></html>')
    return "".join(parts), n_images

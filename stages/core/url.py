"""URL hygiene, before any fetch is spent on a row: the plain-Python checks
(`stages/url.py` is the Beam adapter, with the duplicate-URL grouping).

Kept: http(s) URLs, normalised (scheme and host lower-cased, IDNA host, default
port and fragment removed, spaces percent-encoded). Dropped, each with its
reason: `malformed_url`, `unsupported_scheme` (anything but `allowed_schemes`),
`declared_too_small` / `declared_aspect_ratio` (the input's declared width and
height already fail the resolution stage's floor, as LAION's WIDTH/HEIGHT
columns allow), and `duplicate_url` (the same normalised URL seen anywhere in
the input; the row with the smallest key is kept and named in `duplicate_of`).
"""

from __future__ import annotations

from urllib.parse import quote, urlsplit, urlunsplit

from schemas import DecodeConfig, RejectReason, SampleRecord
from stages.core.verdict import Drop

_DEFAULT_PORTS = {"http": 80, "https": 443}


def normalize_url(url: str, allowed_schemes: list[str]) -> str | Drop:
    text = url.strip()
    if any(ch in text for ch in "\r\n\t\x00"):
        return Drop(RejectReason.MALFORMED_URL, "control characters in URL")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as err:
        return Drop(RejectReason.MALFORMED_URL, str(err))
    scheme = parts.scheme.lower()
    if not scheme:
        return Drop(RejectReason.MALFORMED_URL, "no scheme")
    if scheme not in allowed_schemes:
        return Drop(RejectReason.UNSUPPORTED_SCHEME, scheme)
    host = parts.hostname
    if not host:
        return Drop(RejectReason.MALFORMED_URL, "no host")
    if ":" in host:  # IPv6 literal
        netloc_host = f"[{host}]"
    else:
        try:
            netloc_host = host.encode("idna").decode("ascii")
        except UnicodeError as err:
            return Drop(RejectReason.MALFORMED_URL, f"invalid host {host!r}: {err}")
    netloc = netloc_host if port in (None, _DEFAULT_PORTS.get(scheme)) else f"{netloc_host}:{port}"
    if parts.username or parts.password:
        userinfo = quote(parts.username or "", safe="%") + (f":{quote(parts.password, safe='%')}" if parts.password else "")
        netloc = f"{userinfo}@{netloc}"
    path = quote(parts.path or "/", safe="/%:@!$&'()*+,;=~-._")
    query = quote(parts.query, safe="=&%:@!$'()*+,;/?~-._")
    return urlunsplit((scheme, netloc, path, query, ""))


def check_declared_size(record: SampleRecord, decode: DecodeConfig) -> Drop | None:
    width, height = record.declared_width, record.declared_height
    if not width or not height:
        return None
    if decode.min_side and min(width, height) < decode.min_side:
        return Drop(RejectReason.DECLARED_TOO_SMALL, f"declared {width}x{height} < {decode.min_side}px")
    if max(width, height) / min(width, height) > decode.max_aspect_ratio:
        return Drop(RejectReason.DECLARED_ASPECT_RATIO, f"declared {width}x{height} > {decode.max_aspect_ratio}:1")
    return None

import pytest

from schemas import DecodeConfig, Provenance, RejectReason, SampleRecord
from stages.core.url import check_declared_size, normalize_url
from stages.core.verdict import Drop

SCHEMES = ["http", "https"]


@pytest.mark.parametrize(
    "raw, normal",
    [
        ("  HTTP://Example.COM:80/a b.jpg#frag ", "http://example.com/a%20b.jpg"),
        ("https://example.com:8443/x?y=1", "https://example.com:8443/x?y=1"),
        ("https://bücher.example/p.png", "https://xn--bcher-kva.example/p.png"),
        ("http://[::1]:8080/i.jpg", "http://[::1]:8080/i.jpg"),
        ("http://example.com", "http://example.com/"),
    ],
)
def test_normalises(raw, normal):
    assert normalize_url(raw, SCHEMES) == normal


@pytest.mark.parametrize(
    "raw, reason",
    [
        ("http://", RejectReason.MALFORMED_URL),
        ("example.com/a.jpg", RejectReason.MALFORMED_URL),
        ("ftp://example.com/a.jpg", RejectReason.UNSUPPORTED_SCHEME),
        ("data:image/png;base64,xyz", RejectReason.UNSUPPORTED_SCHEME),
        ("javascript:alert(1)", RejectReason.UNSUPPORTED_SCHEME),
        ("http://example.com:99999/a", RejectReason.MALFORMED_URL),
        ("http://exa\nmple.com/", RejectReason.MALFORMED_URL),
    ],
)
def test_rejects(raw, reason):
    result = normalize_url(raw, SCHEMES)
    assert isinstance(result, Drop) and result.reason == reason


def _record(w, h):
    return SampleRecord(key="k", url="http://a/", caption_original="c", declared_width=w, declared_height=h,
                        provenance=Provenance(source_file="f", source_row=0))


def test_declared_size_floor_and_aspect():
    config = DecodeConfig(min_side=512, max_aspect_ratio=3)
    assert check_declared_size(_record(None, None), config) is None
    assert check_declared_size(_record(600, 512), config) is None
    assert check_declared_size(_record(600, 511), config).reason == RejectReason.DECLARED_TOO_SMALL
    assert check_declared_size(_record(2000, 600), config).reason == RejectReason.DECLARED_ASPECT_RATIO
    assert check_declared_size(_record(100, 100), DecodeConfig(min_side=0)) is None

import pytest

from schemas import CaptionConfig, RejectReason
from stages.core.caption import check_caption


@pytest.mark.parametrize(
    "caption, reason",
    [
        ("", RejectReason.EMPTY_CAPTION),
        ("   \n ", RejectReason.EMPTY_CAPTION),
        ("img_4782.jpg", RejectReason.FILENAME_CAPTION),
        ("DSC0001", RejectReason.FILENAME_CAPTION),
        ("IMG-20190101-WA0003", RejectReason.FILENAME_CAPTION),
        ("holiday photo 12.PNG", RejectReason.FILENAME_CAPTION),
        ("P1010234", RejectReason.FILENAME_CAPTION),
        ("beautiful pic", RejectReason.BOILERPLATE_CAPTION),
        ("Image.", RejectReason.BOILERPLATE_CAPTION),
        ("PHOTO", RejectReason.BOILERPLATE_CAPTION),
        ("a", RejectReason.SHORT_CAPTION),
        ("sunset", RejectReason.SHORT_CAPTION),
    ],
)
def test_bad_captions_get_their_reason(caption, reason):
    drop = check_caption(caption, CaptionConfig())
    assert drop is not None and drop.reason == reason


@pytest.mark.parametrize("caption", ["a dog", "2019 Ford Focus parked on a road", "a photo of 3 cats", "Mount Fuji at dawn"])
def test_real_captions_pass(caption):
    assert check_caption(caption, CaptionConfig()) is None


def test_limits_are_configurable():
    assert check_caption("sunset", CaptionConfig(min_words=0)) is None
    assert check_caption("beautiful pic", CaptionConfig(boilerplate=[])) is None

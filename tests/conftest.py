"""Settings the whole test suite shares. Keep this small."""

import os

import pytest

# img2dataset's resizer imports albumentations, which otherwise checks for
# updates over the network at import time.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

# Suite-wide fixtures, each started once per session: the headless browser
# (tests/browser.py), the S3 and GCS servers (tests/objstore.py).
from tests.browser import browser, browser_session  # noqa: E402, F401
from tests.objstore import gcs_server, s3_server  # noqa: E402, F401

CACHE_DIR_ENV = "IMAGEMILL_CACHE_DIR"  # pipelines.report_html.CACHE_DIR_ENV (not imported here: it imports Beam)


@pytest.fixture(scope="session", autouse=True)
def imagemill_cache(tmp_path_factory):
    """imagemill's cache (the report's JavaScript bundle: pipelines/report_html.py) in a
    folder of this session, not the user's: filled once, then read by every run,
    subprocess and portable-runner worker the session starts (they inherit it)."""
    if os.environ.get(CACHE_DIR_ENV):
        yield os.environ[CACHE_DIR_ENV]
        return
    os.environ[CACHE_DIR_ENV] = str(tmp_path_factory.mktemp("imagemill-cache"))
    yield os.environ[CACHE_DIR_ENV]
    del os.environ[CACHE_DIR_ENV]

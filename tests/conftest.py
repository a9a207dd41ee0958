"""Settings the whole test suite shares. Keep this small."""

import os

# img2dataset's resizer imports albumentations, which otherwise checks for
# updates over the network at import time.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

# Suite-wide fixtures, each started once per session: the headless browser
# (tests/browser.py), the S3 and GCS servers (tests/objstore.py).
from tests.browser import browser, browser_session  # noqa: E402, F401
from tests.objstore import gcs_server, s3_server  # noqa: E402, F401

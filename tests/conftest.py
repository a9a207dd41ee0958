"""Settings the whole test suite shares. Keep this small."""

import os

# img2dataset's resizer imports albumentations, which otherwise checks for
# updates over the network at import time.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

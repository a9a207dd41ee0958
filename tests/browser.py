"""Headless Chromium for the browser tests (the report, `trainer ui`).

Debian's `chromium` and `chromium-driver` (`.ci/run` installs them). Without
them the tests skip, saying why, except under CI (`CI=true`), where a missing
browser is a failure: CI must run them.

Screenshots go to `$IMAGEMILL_SCREENSHOTS` (default: the test's tmp folder);
`IMAGEMILL_SCREENSHOTS=docs/screenshots` refreshes the ones the README shows.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def _find_browser() -> tuple[str | None, str | None]:
    binary = next((shutil.which(name) for name in CHROMIUM_NAMES if shutil.which(name)), None)
    return binary, shutil.which("chromedriver")


def start_browser(download_dir: Path | None = None, width: int = 1280, height: int = 1400):
    """A headless Chromium WebDriver with the browser console log enabled."""
    binary, driver = _find_browser()
    if binary is None or driver is None:
        reason = "headless browser tests need Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason}; CI must have them (.ci/run installs them)")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", f"--window-size={width},{height}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    if download_dir is not None:
        options.add_experimental_option(
            "prefs", {"download.default_directory": str(download_dir), "download.prompt_for_download": False}
        )
    return webdriver.Chrome(service=Service(driver), options=options)


def console_errors(driver) -> list[dict]:
    """Browser console entries at level SEVERE since the last call."""
    return [entry for entry in driver.get_log("browser") if entry.get("level") == "SEVERE"]


def screenshot(driver, name: str, tmp_path: Path) -> Path:
    folder = Path(os.environ.get("IMAGEMILL_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    import io

    from PIL import Image

    # 128 colours keep the committed screenshots small; text and charts stay legible.
    image = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    return path

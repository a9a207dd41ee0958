"""Headless Chromium for the browser tests (the report, `trainer ui`).

Debian's `chromium` and `chromium-driver` (`.ci/run` installs them). Without
them the tests skip, saying why, except under CI (`CI=true`), where a missing
browser is a failure: CI must run them.

Screenshots go to `$IMAGEMILL_SCREENSHOTS` (default: the test's tmp folder);
`IMAGEMILL_SCREENSHOTS=docs/screenshots` refreshes the ones the README shows.

Fixtures (registered for the whole suite in tests/conftest.py): `browser_session`,
one Chromium for the test session (starting one costs seconds), and `browser`,
that Chromium handed to one test in a known state: a blank page, the default
window size, earlier console entries dropped, downloads going to the test's own
`tmp_path / "downloads"` (`driver.downloads`). A test that needs another window
size sets it (`driver.set_window_size`); the next test gets the default again.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
WIDTH, HEIGHT = 1280, 1400


def _find_browser() -> tuple[str | None, str | None]:
    binary = next((shutil.which(name) for name in CHROMIUM_NAMES if shutil.which(name)), None)
    return binary, shutil.which("chromedriver")


def start_browser(download_dir: Path | None = None, width: int = WIDTH, height: int = HEIGHT):
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


def set_download_dir(driver, folder: Path) -> None:
    """Send the browser's downloads to `folder` from now on (Chrome DevTools
    `Browser.setDownloadBehavior`; no prompt)."""
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(folder)})


@pytest.fixture(scope="session")
def browser_session():
    """One headless Chromium for the whole test session (see `browser`)."""
    driver = start_browser()
    yield driver
    driver.quit()


@pytest.fixture
def browser(browser_session, tmp_path):
    """The session's Chromium for one test: blank page, default window size, no
    earlier console entries, downloads into `driver.downloads` (this test's folder)."""
    driver = browser_session
    downloads = tmp_path / "downloads"
    downloads.mkdir(exist_ok=True)
    set_download_dir(driver, downloads)
    driver.downloads = downloads
    driver.set_window_size(WIDTH, HEIGHT)
    driver.get("about:blank")
    console_errors(driver)
    yield driver
    # Leave no page of this test running (its timers, sockets) while the next one works.
    driver.get("about:blank")


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

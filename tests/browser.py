"""Headless Chromium for the page tests: find the browser and its driver, start it offline, read its network log.

Debian's ``chromium`` and ``chromium-driver`` packages put them at /usr/bin/chromium and /usr/bin/chromedriver;
``CHROMIUM_BIN`` and ``CHROMEDRIVER_BIN`` point elsewhere. Nothing is ever downloaded: Selenium Manager is
skipped because the driver's path is always given.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# No network of its own: no component updates, no sync, no background fetches (the machines are offline).
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--no-default-browser-check",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
)


@dataclass(frozen=True)
class Browser:
    chromium: str
    chromedriver: str
    version: str


def find_browser() -> Browser | str:
    """The browser and driver to use, or a sentence saying what is missing."""
    chromium = _executable(os.environ.get("CHROMIUM_BIN")) if "CHROMIUM_BIN" in os.environ else None
    chromium = chromium or shutil.which("chromium") or shutil.which("chromium-browser")
    driver = _executable(os.environ.get("CHROMEDRIVER_BIN")) if "CHROMEDRIVER_BIN" in os.environ else None
    driver = driver or shutil.which("chromedriver")
    if not chromium or not driver:
        missing = " and ".join(n for n, p in (("chromium", chromium), ("chromedriver", driver)) if not p)
        return (
            f"no {missing} found (install Debian's packages: apt-get install chromium chromium-driver, "
            "or set CHROMIUM_BIN / CHROMEDRIVER_BIN)"
        )
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "the selenium package is not installed (pip install -r requirements.txt)"
    try:
        version = subprocess.run([chromium, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{chromium} does not run: {exc}"
    return Browser(chromium=chromium, chromedriver=driver, version=version or "unknown version")


def _executable(path: str | None) -> str | None:
    return path if path and os.path.isfile(path) and os.access(path, os.X_OK) else None


def start_chromium(browser: Browser, width: int = 1280, height: int = 900) -> Any:
    """A Selenium WebDriver on a fresh profile, with the performance (network) log on."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="page-test-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = browser.chromium
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=browser.chromedriver), options=options)
    driver.profile_dir = profile  # for the fixture to remove
    return driver


def stop_chromium(driver: Any) -> None:
    try:
        driver.quit()
    finally:
        shutil.rmtree(driver.profile_dir, ignore_errors=True)


def network_events(driver: Any) -> list[dict[str, Any]]:
    """The DevTools Network events logged since the last call (the log is drained by reading it)."""
    events = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"].startswith("Network."):
            events.append(message)
    return events


def save_screenshot(driver: Any, directory: Path, name: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.png"
    if not driver.save_screenshot(str(path)):
        raise AssertionError(f"the browser could not write the screenshot {path}")
    return path

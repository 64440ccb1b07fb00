"""Debian's headless Chromium, as the browser tests drive it through Playwright."""

from __future__ import annotations

import shutil
from pathlib import Path

from playwright.sync_api import Browser, Playwright

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def launch_chromium(playwright: Playwright) -> Browser:
    assert Path(CHROMIUM).exists(), "the browser tests need Debian's chromium (make test installs it)"
    return playwright.chromium.launch(
        executable_path=CHROMIUM,
        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
              "--disable-sync", "--no-first-run"],
    )

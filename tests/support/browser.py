"""A person in the MLflow UI, played by Playwright driving Debian's Chromium (installed by
`.ci/run`; Playwright's own browser download is not used)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CHROMIUM = Path(os.environ.get("CUL_CHROMIUM", "/usr/bin/chromium"))
# headless, and quiet on a closed network (no background connections to refuse)
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def require_chromium() -> None:
    """Skip on a laptop without Chromium; fail in CI, where `.ci/run` installs it."""
    if not CHROMIUM.exists():
        if os.environ.get("CUL_REQUIRE_BROWSER"):
            pytest.fail(f"{CHROMIUM} is missing (apt-get install chromium)")
        pytest.skip(f"{CHROMIUM} not installed")


def set_alias_in_ui(ui_url: str, model: str, version: int, alias: str, screenshot: Path | None = None) -> None:
    """Open the model version page, click "Add" next to Aliases, type the alias, press Enter and
    "Save aliases", as a person promoting a version would."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            page.goto(f"{ui_url}/#/models/{model}/versions/{version}")
            expect(page.get_by_role("heading", name=f"Version {version}")).to_be_visible()
            page.get_by_title("Add aliases").click()  # the "Add" beside Aliases (Tags has one too)
            dialog = page.get_by_role("dialog")
            expect(dialog).to_contain_text(f"alias for model version {version}")
            box = dialog.get_by_role("combobox")
            box.fill(alias)
            box.press("Enter")
            dialog.get_by_role("button", name="Save aliases").click()
            expect(dialog).to_be_hidden()
            expect(page.get_by_text(f"@ {alias}")).to_be_visible()
            if screenshot is not None:
                page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()

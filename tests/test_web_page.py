"""The web page at ``/``, in headless Chromium (Debian's ``/usr/bin/chromium``,
driven by Playwright): a generation end to end, a cancel, and a screenshot."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from sfumato.server.settings import ServerSettings

from .helpers import serving

CHROMIUM = Path(os.environ.get("SFUMATO_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = Path(os.environ.get("SFUMATO_ARTIFACTS", Path(__file__).resolve().parent.parent / "test-artifacts"))
# The flags a root, offline, headless run needs (no sandbox, no background traffic).
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]  # fmt: skip


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert CHROMIUM.is_file(), f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium)"
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=FLAGS)
        yield launched
        launched.close()


def _fill(page: Page, steps: int) -> None:
    page.fill("#prompt", "a lighthouse on a cliff")
    page.fill("#width", "64")
    page.fill("#height", "64")
    page.fill("#steps", str(steps))
    page.fill("#seed", "7")


def test_generate_and_cancel_in_the_browser(browser: Browser, settings: ServerSettings) -> None:
    with serving(settings) as url:
        page = browser.new_page(viewport={"width": 1000, "height": 700})
        page.goto(url)
        expect(page.locator("#model option")).to_have_count(1)
        expect(page.locator("#sampler")).to_have_value("Euler a")

        _fill(page, steps=2)
        page.click("#generate")
        expect(page.locator("#status")).to_have_class("state-done", timeout=180_000)
        expect(page.locator("#progress")).to_have_js_property("value", 100)
        assert page.eval_on_selector("#result", "img => img.src").startswith("data:image/png;base64,")
        assert page.eval_on_selector("#result", "img => [img.naturalWidth, img.naturalHeight]") == [64, 64]

        _fill(page, steps=60)
        page.click("#generate")
        expect(page.locator("#status")).to_contain_text("generation", timeout=120_000)
        # The live preview of this run (the latent projected: an eighth of the 64-pixel side) replaces
        # the last run's 64x64 image while it samples.
        page.wait_for_function("() => document.querySelector('#result').naturalWidth === 8", timeout=60_000)
        page.click("#cancel")
        expect(page.locator("#status")).to_have_class("state-cancelled", timeout=30_000)

        history = page.locator("#history li")
        expect(history.first).to_have_class("state-cancelled")
        expect(history.nth(1)).to_have_class("state-done")
        expect(page.locator("#status")).to_have_text(re.compile("cancelled"))
        history.nth(1).click()  # the finished job's image comes back from the history
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "web-page.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 0
        page.close()

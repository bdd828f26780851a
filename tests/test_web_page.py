"""The web page at ``/``, in headless Chromium (Debian's ``/usr/bin/chromium``,
driven by Playwright): a generation end to end with its live preview, a cancel,
the server's limits in the form, img2img from an uploaded image, inpainting with
a mask painted (and partly erased) on a dropped image, the recent jobs'
thumbnails reopening their parameters, and the README's screenshot."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, expect, sync_playwright

from sfumato.server.settings import ServerSettings

from .helpers import SIZE, serving

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


def _open(browser: Browser, url: str) -> tuple[Page, list[str]]:
    """The page at ``url``, and the list of every URL it requests from then on."""
    page = browser.new_page(viewport={"width": 1000, "height": 800})
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(url)
    return page, requested


def _only_from(url: str, requested: list[str]) -> None:
    """The page loaded no outside resource: everything came from the server, or from itself."""
    outside = [r for r in requested if not r.startswith((url + "/", "data:", "blob:"))]
    assert requested and not outside, outside


def test_generate_and_cancel_in_the_browser(browser: Browser, settings: ServerSettings) -> None:
    with serving(settings, "--max-steps", "90", "--max-pixels", str(512 * 256)) as url:
        page, requested = _open(browser, url)
        expect(page.locator("#model option")).to_have_count(1)
        # The form offers the server's limits and the job-queue API's defaults.
        expect(page.locator("#sampler")).to_have_value("DPM++ 2M Karras")
        expect(page.locator("#scheduler")).to_have_value("karras")
        expect(page.locator("#steps")).to_have_attribute("max", "90")
        expect(page.locator("#width")).to_have_attribute("max", "2048")  # 2048 x 64 is within 512 x 256 pixels
        expect(page.locator("#width")).to_have_value("512")
        expect(page.locator("#cfg")).to_have_value("7")
        page.fill("#width", "512")
        page.fill("#height", "512")
        page.click("#generate")  # over the server's pixels: refused before anything is queued
        expect(page.locator("#status")).to_have_class("state-error")
        expect(page.locator("#status")).to_contain_text("width: 512x512")
        expect(page.locator("#history li")).to_have_count(0)

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
        expect(page.locator("#result")).to_have_js_property("naturalWidth", SIZE)
        _only_from(url, requested)
        page.close()


def _source_png(path: Path) -> np.ndarray:
    """A 64x64 picture with structure in every channel, written to ``path``."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    pixels = np.stack([x * 4, y * 4, 255 - (x + y) * 2], axis=2).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def _distance(points: np.ndarray, start: tuple[float, float], end: tuple[float, float]) -> np.ndarray:
    """Each point's distance to the segment from ``start`` to ``end``."""
    a, b = np.asarray(start), np.asarray(end)
    t = np.clip(((points - a) @ (b - a)) / ((b - a) @ (b - a)), 0.0, 1.0)
    return np.linalg.norm(points - (a + t[..., None] * (b - a)), axis=-1)


def _drag(page: Page, start: tuple[float, float], end: tuple[float, float]) -> None:
    """A mouse stroke over the mask, from ``start`` to ``end`` in the source's pixels."""
    box = page.locator("#mask").bounding_box()
    assert box is not None
    scale = box["width"] / SIZE
    page.mouse.move(box["x"] + start[0] * scale, box["y"] + start[1] * scale)
    page.mouse.down()
    page.mouse.move(box["x"] + end[0] * scale, box["y"] + end[1] * scale, steps=12)
    page.mouse.up()


def _result(page: Page) -> np.ndarray:
    src = page.eval_on_selector("#result", "img => img.src")
    assert src.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB")).astype(np.int16)


def _jobs(url: str) -> list[dict]:
    with urllib.request.urlopen(f"{url}/queue?limit=10", timeout=10) as response:
        return json.load(response)["jobs"]


def test_img2img_inpainting_and_history_in_the_browser(
    browser: Browser, settings: ServerSettings, tmp_path: Path
) -> None:
    source = _source_png(tmp_path / "source.png")
    with serving(settings) as url:
        page, requested = _open(browser, url)
        expect(page.locator("#model option")).to_have_count(1)
        page.fill("#prompt", "a lighthouse on a cliff")
        page.fill("#steps", "3")
        page.select_option("#sampler", "Euler a")

        # img2img from an uploaded file: the form takes the source's size.
        page.set_input_files("#source-file", str(tmp_path / "source.png"))
        expect(page.locator("#source-panel")).to_be_visible()
        expect(page.locator("#width")).to_have_value(str(SIZE))
        page.locator("#strength").evaluate("(el) => { el.value = '0.5'; el.dispatchEvent(new Event('input')); }")
        expect(page.locator("#strength-value")).to_have_text("0.50")
        page.click("#generate")
        expect(page.locator("#status")).to_have_class("state-done", timeout=180_000)
        img2img = _jobs(url)[0]
        assert img2img["kind"] == "img2img" and img2img["payload"]["strength"] == 0.5
        assert img2img["payload"]["seed"] == -1 and img2img["seed"] >= 0  # a random seed was drawn
        assert img2img["payload"]["width"] == SIZE and "mask" not in img2img["payload"]
        assert page.eval_on_selector("#result", "img => [img.naturalWidth, img.naturalHeight]") == [SIZE, SIZE]

        # Inpainting: the same picture dropped on the page, a stroke painted and its end erased.
        data = base64.b64encode((tmp_path / "source.png").read_bytes()).decode()
        page.evaluate(
            """(data) => {
                const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
                const drop = new DataTransfer();
                drop.items.add(new File([bytes], "dropped.png", { type: "image/png" }));
                document.querySelector("#drop").dispatchEvent(
                    new DragEvent("drop", { dataTransfer: drop, bubbles: true, cancelable: true }));
            }""",
            data,
        )
        expect(page.locator("#status")).to_contain_text("dropped.png")
        box = page.locator("#mask").bounding_box()
        assert box is not None
        radius = 5.0  # in the source's pixels; the brush size is in the screen's
        page.fill("#brush-size", str(2 * radius * box["width"] / SIZE))
        painted, erased = ((8.0, 30.0), (44.0, 30.0)), ((40.0, 30.0), (60.0, 30.0))
        _drag(page, *painted)
        page.click("#eraser")
        _drag(page, *erased)
        page.locator("#strength").evaluate("(el) => { el.value = '1'; el.dispatchEvent(new Event('input')); }")
        page.click("#generate")
        expect(page.locator("#status")).to_have_class("state-done", timeout=180_000)

        centres = np.stack(np.mgrid[0:SIZE, 0:SIZE][::-1], axis=-1) + 0.5  # (x, y) of each pixel's centre
        to_paint, to_erase = _distance(centres, *painted), _distance(centres, *erased)
        inside = (to_paint < radius - 1) & (to_erase > radius + 1)
        outside = (to_paint > radius + 1) | (to_erase < radius - 1)
        assert inside.sum() > 150 and outside.sum() > 3000
        out = _result(page)
        assert np.abs(out[outside] - source[outside]).max() <= 1  # kept: the source's pixels
        assert np.abs(out[inside] - source[inside]).mean() > 10  # painted anew
        inpaint = _jobs(url)[0]
        assert inpaint["kind"] == "img2img" and inpaint["payload"]["strength"] == 1.0

        # The recent jobs are thumbnails; one reopens its parameters, the seed it ran with included.
        thumbnails = page.locator("#history li img")
        expect(thumbnails).to_have_count(2)
        page.wait_for_function("() => [...document.querySelectorAll('#history li img')].every((i) => i.naturalWidth)")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "web-page.png"
        page.screenshot(path=str(shot), full_page=True)
        assert Image.open(shot).size[0] == 1000
        page.fill("#prompt", "something else")
        page.fill("#steps", "9")
        page.locator(f"#history li[data-job='{img2img['job_id']}']").click()
        expect(page.locator("#prompt")).to_have_value("a lighthouse on a cliff")
        expect(page.locator("#steps")).to_have_value("3")
        expect(page.locator("#strength")).to_have_value("0.5")
        expect(page.locator("#sampler")).to_have_value("Euler a")
        expect(page.locator("#seed")).to_have_value(str(img2img["seed"]))
        expect(page.locator("#result")).to_have_attribute("data-job", img2img["job_id"])
        _only_from(url, requested)
        page.close()

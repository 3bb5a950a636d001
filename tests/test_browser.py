"""The web UI in a real browser: Playwright drives Debian's Chromium (headless) against `python app.py`.

It uploads an image, reads the tags, moves the threshold (the tag counts must equal the JSON API's), clicks
a tag to show its CAM, saves a screenshot and checks that the overlay is in it, switches the model selector
(two models are served) to the DINOv3 tagger (its top 30, max size instead of sequence length, no CAM),
uploads a corrupt file (a message, not a traceback), and checks that the page fetched nothing from outside
127.0.0.1 (offline). A stale error (a corrupt upload, a bad batch caption option) is gone once the next request
succeeds, at desktop and phone sizes.

Needs /usr/bin/chromium (`apt-get install -y chromium`); never `playwright install`. Set
HYDRA_WEBUI_SCREENSHOT=docs/webui.png to refresh the README screenshot.

Run: venv/bin/python -m pytest tests/test_browser.py -q   (about 40 s)
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import time
from urllib.parse import urlsplit

import numpy as np
import pytest
import requests
from PIL import Image
from test_app import DINO, make_fixture, server_args, start_server, stop_server

from hydra.web.cam import DESATURATE

CHROMIUM = "/usr/bin/chromium"
# A closed network makes Chromium hang on Google look-ups without these.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 60_000

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not os.path.exists(CHROMIUM):
        print(f"\nskipping the browser test: {CHROMIUM} is missing (apt-get install -y chromium)")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium)")
    folder = tmp_path_factory.mktemp("browser")
    files = make_fixture(folder)
    files["calibration"].unlink()  # threshold slider mode, as a first start without calibration.csv
    proc, url = start_server(folder, server_args(files))
    yield url, files
    stop_server(proc)


@contextlib.contextmanager
def open_page(url: str, width: int, height: int, on_request=None):
    """A headless Chromium page (`width` x `height`, the tests' default timeout) loaded from `url`; `on_request`
    sees every request the page makes from the start. Closed on the way out."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(TIMEOUT_MS)
            if on_request is not None:
                page.on("request", on_request)
            page.goto(url, wait_until="load")
            yield page
        finally:
            browser.close()


def tag_names(page) -> list[str]:
    return page.eval_on_selector_all("#tag-list .confidence-set .text", "els => els.map(e => e.textContent.trim())")


def image_box(page, shot: Image.Image) -> np.ndarray:
    """The displayed image's pixels, cropped from a screenshot of the page."""
    box = page.locator("#image img").first.bounding_box()
    crop = shot.crop((round(box["x"]), round(box["y"]), round(box["x"] + box["width"]),
                      round(box["y"] + box["height"])))
    return np.asarray(crop.convert("RGB"), dtype=np.float64)


def test_browser_upload_threshold_cam_screenshot(server, tmp_path):
    url, files = server
    api_count = {t: len(requests.post(url + "/api/tag", files={"image": files["image"].read_bytes()},
                                      data={"threshold": t}, timeout=60).json()["tags"]) for t in ("0.3", "0.1")}
    requests_seen: list[str] = []
    with open_page(url, 1400, 1000, on_request=lambda r: requests_seen.append(r.url)) as page:
        # upload: tags appear, in display spelling, agreeing with the JSON API at the default 0.30
        page.locator("#image input[type=file]").set_input_files(str(files["image"]))
        page.wait_for_function("document.querySelector('#caption textarea').value.length > 0")
        page.wait_for_function("document.querySelectorAll('#tag-list .confidence-set').length > 0")
        names = tag_names(page)
        assert len(names) == api_count["0.3"] and all("_" not in n for n in names)
        before = page.locator("#image img").first.get_attribute("src")
        plain = image_box(page, Image.open(io.BytesIO(page.screenshot())))

        # move the threshold: more tags pass, exactly as many as the API gives at that threshold
        page.locator("#threshold input[type=range]").fill("0.1")
        page.wait_for_function(f"document.querySelectorAll('#tag-list .confidence-set').length == "
                               f"{api_count['0.1']}")
        assert api_count["0.1"] > api_count["0.3"]
        assert page.locator("#threshold input[type=number]").input_value() == "0.1"

        # labels: p in the list, the slider's symmetric scale named, the CAM peak explained
        assert "probability p" in page.locator("#tag-list").inner_text()
        assert "symmetric scale" in page.locator("#threshold").inner_text()
        assert "peak" in page.locator("#cam-tag").inner_text()
        assert "p >= 55.0%" in page.locator("#status").inner_text()
        # the CAM picker: typing replaces the shown value and searches
        page.locator("#cam-tag input").click()
        page.keyboard.type("fox")
        assert page.locator("#cam-tag input").input_value() == "fox"
        options = page.eval_on_selector_all("ul[role=listbox] li", "els => els.map(e => e.textContent)")
        assert options and all("fox" in o for o in options)
        page.keyboard.press("Escape")

        # click the most probable tag: it becomes the CAM tag and the overlay replaces the image
        first = tag_names(page)[0]
        page.locator("#tag-list .confidence-set").first.click()
        page.wait_for_function("v => document.querySelector('#cam-tag input').value == v", arg=first)
        page.wait_for_function("s => document.querySelector('#image img').getAttribute('src') != s", arg=before)
        page.wait_for_function("document.querySelector('#image img').complete")
        shot_path = tmp_path / "webui.png"
        page.screenshot(path=str(shot_path))
        check_overlay(plain, image_box(page, Image.open(shot_path)))
        if target := os.environ.get("HYDRA_WEBUI_SCREENSHOT"):
            shutil.copyfile(shot_path, target)

        # the model selector (two models are served): the DINOv3 tagger gives its top 30, swaps the
        # sequence length for the max size, and has no CAM
        page.locator("#model input").click()
        page.locator(f"ul[role=listbox] li:has-text('{DINO}')").click()
        page.wait_for_function("s => document.querySelector('#status').textContent.trim().startsWith(s)",
                               arg=f"{DINO}: 30 of ")
        assert len(page.locator("#caption textarea").input_value().split(", ")) == 30
        assert page.locator("#cam-note").is_visible() and not page.locator("#cam-tag").is_visible()
        assert page.locator("#max-size").is_visible() and not page.locator("#seqlen").is_visible()

        # a corrupt upload is a message in the UI, and the server keeps serving
        page.locator("#image button[aria-label='Remove Image']").first.click()
        page.locator("#image input[type=file]").set_input_files(str(files["corrupt"]))
        page.wait_for_selector("text=Not a usable image")
        assert requests.get(url + "/api/health", timeout=10).json()["status"] == "ok"

    outside = [u for u in requests_seen if urlsplit(u).scheme not in ("data", "blob")
               and urlsplit(u).hostname not in ("127.0.0.1", "localhost")]
    assert requests_seen and not outside, outside


ERROR_TOAST = ".toast-body.error"
TOAST_SECONDS = 10  # gr.Error's own duration: a toast that goes sooner than this after it appeared was closed


def errors_gone_before_their_timeout(page, shown: float) -> None:
    """Every error toast leaves the page (its close animation included) well before it would time out by itself,
    `TOAST_SECONDS` after `shown`: so the page closed it."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    left = TOAST_SECONDS - 2 - (time.monotonic() - shown)
    assert left > 0, "the good request took too long to tell closing from the toast's own timeout"
    try:
        page.wait_for_selector(ERROR_TOAST, state="detached", timeout=left * 1000)
    except PlaywrightTimeout:
        pytest.fail(f"error messages left after a good request: {page.locator(ERROR_TOAST).all_inner_texts()}")


@pytest.mark.parametrize("width, height", [(1400, 1000), (390, 844)])
def test_browser_stale_errors_clear_when_a_good_result_arrives(server, tmp_path, width, height):
    """An error message (a corrupt upload; a bad batch caption option) is gone once the next request succeeds."""
    url, files = server
    with open_page(url, width, height) as page:
        # image tab: a corrupt upload shows an error, then a good upload replaces it with results
        page.locator("#image input[type=file]").set_input_files(str(files["corrupt"]))
        page.wait_for_selector(f"{ERROR_TOAST}:has-text('Not a usable image')")
        shown = time.monotonic()
        # the failed upload's status overlay covers the image's buttons: click the remove button directly
        page.locator("#image button[aria-label='Remove Image']").first.dispatch_event("click")
        page.locator("#image input[type=file]").set_input_files(str(files["image"]))
        page.wait_for_function("document.querySelector('#caption textarea').value.length > 0")
        errors_gone_before_their_timeout(page, shown)

        # batch tab: a bad category threshold is a message in the CLI's words; fixed, the batch runs and the
        # message goes
        page.get_by_role("tab", name="Batch").click()
        page.locator("#batch-files input[type=file]").set_input_files(str(files["image"]))
        page.locator("#batch-options").get_by_text("Caption options").click()
        field = page.locator("#category-thresholds textarea")
        field.fill("character")
        page.locator("#batch-run").click()
        page.wait_for_selector(f"{ERROR_TOAST}:has-text('expected CATEGORY=THRESHOLD such as character=0.7')")
        shown = time.monotonic()
        page.screenshot(path=str(tmp_path / f"batch-error-{width}.png"), full_page=True)
        field.fill("character=0.7")
        page.locator("#batch-run").click()
        page.wait_for_selector("#batch-status:has-text('Tagged 1 image, 0 failed.')",
                               timeout=TOAST_SECONDS * 1000)  # any longer could not tell closing from timing out
        errors_gone_before_their_timeout(page, shown)
        page.screenshot(path=str(tmp_path / f"batch-{width}.png"), full_page=True)


def check_overlay(plain: np.ndarray, shown: np.ndarray) -> None:
    """`shown` is `plain` desaturated with green/red blocks over it (the CAM), not just the plain image."""
    assert plain.shape == shown.shape, (plain.shape, shown.shape)
    gray = plain @ np.array([0.299, 0.587, 0.114])
    desat = plain * (1 - DESATURATE) + gray[..., None] * DESATURATE
    d = shown - desat  # the overlay's pull toward pure green or pure red
    green = (d[..., 1] > 12) & (d[..., 0] < -4) & (d[..., 2] < -4)
    red = (d[..., 0] > 12) & (d[..., 1] < -4) & (d[..., 2] < -4)
    assert green.mean() + red.mean() > 0.05, (green.mean(), red.mean())
    assert np.abs(shown - plain).mean() > 5


@pytest.mark.parametrize("width, height", [(1400, 1000), (390, 844)])
def test_browser_layout_tag_list_capped_image_first_on_phones(server, tmp_path, width, height):
    from hydra.web.page import GROUPS_HEIGHT, NARROW, TAG_LIST_HEIGHT

    url, files = server
    with open_page(url, width, height) as page:
        page.locator("#image input[type=file]").set_input_files(str(files["image"]))
        page.wait_for_function("document.querySelectorAll('#tag-list .confidence-set').length > 0")
        page.locator("#topk input[type=range]").fill("250")  # every tag of the fixture model in the list
        page.wait_for_function("document.querySelectorAll('#tag-list .confidence-set').length > 60")
        page.screenshot(path=str(tmp_path / f"webui-{width}.png"), full_page=True)
        box = {k: page.locator(f"#{k}").first.bounding_box() for k in ("image", "threshold", "tag-list",
                                                                         "tag-groups")}
        assert box["tag-list"]["height"] <= TAG_LIST_HEIGHT + 1 and box["tag-groups"]["height"] <= GROUPS_HEIGHT + 1
        assert page.evaluate("document.documentElement.scrollHeight") < 5000
        if width < NARROW:  # stacked: the image input first, the settings after the results
            assert box["image"]["y"] < box["tag-list"]["y"] < box["threshold"]["y"]
        else:
            assert box["threshold"]["x"] < box["image"]["x"]
        # two models, one without a CAM: the header names the one that has it
        assert "JTP-3 Hydra models only" in page.locator("#header").inner_text()


def test_groups_name_a_models_own_categories():
    """Hydra 3.5 categories beyond e621's get their own group by name (between e621's and unassigned)."""
    from types import SimpleNamespace

    from hydra.web.handlers import groups_html

    cats = {"fox": "species", "glow": "effects", "sky": "unassigned", "solo": "general", "zap": "<b>"}
    labels = list(cats)
    m = SimpleNamespace(has_categories=True, category_name=cats.get, names=labels,
                        position={t: i for i, t in enumerate(labels)})
    out = groups_html(m, [(t, 0.9) for t in labels])
    heads = [h.split(" (")[0] for h in out.split("<h4>")[1:]]
    assert heads == ["general", "species", "&lt;b&gt;", "effects", "unassigned"]

"""The review page's viewer in Chromium, on a tall synthetic DICOM in a 1400x900 window.

Fit to window on load; zoom (+/-, wheel) and pan (right-drag, the Pan tool) with the boxes staying on
the image; window/level by drag starting from the DICOM's own VOI, read back from the canvas; the keys
n/p/arrows, a, r, b acting on the selected box and carried by the feedback; the saliency map laid
over the image through zoom and pan (no button on a gateway without the route). The last test takes
the README's screenshot, saliency on (``CXR_UPDATE_DOCS_IMAGES=1`` writes docs/images/review-page.png).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image

from data_pipeline.dicom_io import window
from data_pipeline.synth import SynthConfig, generate_case
from serving.config import ServingSettings
from serving.gateway.app import create_app
from tests.fixtures.browser import CHROMIUM, CHROMIUM_ARGS, require_chromium, review_gateway
from tests.fixtures.servers import free_port
from tests.unit.serving.serving_support import LiveServer

pytestmark = [pytest.mark.browser, pytest.mark.integration]

VIEWPORT = {"width": 1400, "height": 900}
DOCS_IMAGE = Path(__file__).resolve().parents[2] / "docs" / "images" / "review-page.png"
# the untrained test model's boxes on this phantom score 0.669..0.687: 0.684 keeps the top four
CONF = 0.684
# every 97th canvas pixel: enough to compare renderings without shipping a million numbers
SAMPLE_JS = """() => { const c = document.getElementById('view');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; const out = [];
  for (let i = 0; i < c.width * c.height; i += 97) out.push(d[4 * i]); return out; }"""


@dataclass
class Viewer:
    url: str
    keys: dict[str, str]
    upload: Path
    settings: ServingSettings
    browser: Any


@pytest.fixture(scope="module")
def viewer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Viewer]:
    require_chromium()
    from playwright.sync_api import sync_playwright

    tmp = tmp_path_factory.mktemp("viewer")
    # case 8 of seed 0: 2153 x 2611 (taller than wide), MONOCHROME2, uncompressed, with findings
    config = SynthConfig(seed=0, compressed_fraction=0.0, monochrome1_fraction=0.0)
    case = generate_case(config, 8, "PAT-VIEWER", tmp)
    assert case.height > case.width > 2000 and case.findings
    settings, keys = review_gateway(tmp, conf_threshold=CONF)
    app = create_app(settings, use_store=False)
    with LiveServer(app, free_port()) as server, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield Viewer(server.url, keys, tmp / f"{case.image_id}.dicom", settings, browser)
        finally:
            browser.close()


class Page:
    """One browser page on the review page with the phantom detected; collects errors as it goes."""

    def __init__(self, browser: Any, url: str, key: str, upload: Path) -> None:
        from playwright.sync_api import expect

        self.page = browser.new_page(viewport=VIEWPORT)
        self.errors: list[str] = []
        # failed responses are caught below by URL (Chromium's own favicon.ico may 404)
        self.page.on(
            "console",
            lambda m: (
                self.errors.append(m.text)
                if m.type == "error" and not m.text.startswith("Failed to load resource")
                else None
            ),
        )
        self.page.on(
            "response",
            lambda r: (
                self.errors.append(f"{r.status} {r.url}")
                if r.status >= 400 and "favicon" not in r.url
                else None
            ),
        )
        self.page.goto(url + "/")
        self.page.fill("#api-key", key)
        self.page.set_input_files("#file", str(upload))
        self.page.click("#detect")
        expect(self.page.locator("#status")).to_contain_text("request ", timeout=60_000)
        self.request_id = (self.page.text_content("#status") or "").rsplit("request ", 1)[-1].strip()
        self.result = json.loads(self.page.evaluate("() => JSON.stringify(state.result)"))

    def rect(self, selector: str) -> dict[str, float]:
        box = self.page.locator(selector).bounding_box()
        assert box is not None, selector
        return box

    def assert_box_on_image(self, index: int) -> None:
        """The SVG box sits where the detection's original-pixel coordinates fall on the shown image.

        The box's screen rect is its geometry through every transform up to the screen (getScreenCTM):
        getBoundingClientRect would add the stroke.
        """
        img = self.rect("#view")
        shown = self.page.evaluate(
            """(i) => { const el = document.querySelector(`#overlay rect.det[data-index="${i}"]`);
                const b = el.getBBox(); const m = el.getScreenCTM();
                return [m.a * b.x + m.e, m.d * b.y + m.f, m.a * b.width, m.d * b.height]; }""",
            index,
        )
        x0, y0, x1, y1 = self.result["detections"][index]["box"]
        sx, sy = img["width"] / self.result["image"]["width"], img["height"] / self.result["image"]["height"]
        expected = [img["x"] + x0 * sx, img["y"] + y0 * sy, (x1 - x0) * sx, (y1 - y0) * sy]
        assert shown == pytest.approx(expected, abs=0.5)

    def wait_rect_change(self, selector: str, before: dict[str, float]) -> dict[str, float]:
        self.page.wait_for_function(
            """([sel, x, w]) => { const r = document.querySelector(sel).getBoundingClientRect();
                return Math.abs(r.x - x) > 0.5 || Math.abs(r.width - w) > 0.5; }""",
            arg=[selector, before["x"], before["width"]],
        )
        return self.rect(selector)

    def close(self) -> None:
        self.page.close()
        assert not self.errors, self.errors


def test_a_tall_radiograph_opens_whole_and_fitted_in_a_1400x900_window(viewer: Viewer) -> None:
    p = Page(viewer.browser, viewer.url, viewer.keys["radiologist"], viewer.upload)
    img, port = p.rect("#view"), p.rect("#viewport")
    w, h = p.result["image"]["width"], p.result["image"]["height"]
    assert h > w  # tall: at full size its lower part would be off screen
    assert img["x"] >= port["x"] - 0.5 and img["x"] + img["width"] <= port["x"] + port["width"] + 0.5
    assert img["y"] >= port["y"] - 0.5 and img["y"] + img["height"] <= port["y"] + port["height"] + 0.5
    assert img["y"] + img["height"] <= VIEWPORT["height"] and img["x"] + img["width"] <= VIEWPORT["width"]
    assert img["height"] == pytest.approx(port["height"] - 2, abs=1.5)  # fills the height (1 px border)
    assert img["width"] / img["height"] == pytest.approx(w / h, rel=0.005)  # aspect kept
    page_height = p.page.evaluate("() => document.scrollingElement.scrollHeight")
    assert page_height <= VIEWPORT["height"]  # the page itself does not scroll
    for i in range(len(p.result["detections"])):
        p.assert_box_on_image(i)
    p.close()


def test_plus_minus_and_wheel_zoom_and_drags_pan_with_boxes_kept_on_the_image(viewer: Viewer) -> None:
    p = Page(viewer.browser, viewer.url, viewer.keys["radiologist"], viewer.upload)
    page = p.page
    fitted = p.rect("#view")
    page.focus("#viewport")

    page.keyboard.press("+")
    zoomed = p.rect("#view")
    assert zoomed["width"] == pytest.approx(fitted["width"] * 1.25, abs=1.0)
    assert zoomed["x"] + zoomed["width"] / 2 == pytest.approx(fitted["x"] + fitted["width"] / 2, abs=1.0)
    p.assert_box_on_image(0)
    page.keyboard.press("-")
    assert p.rect("#view")["width"] == pytest.approx(fitted["width"], abs=1.0)

    # the wheel zooms about the pointer: the image point under it stays under it
    port = p.rect("#viewport")
    mx, my = round(port["x"] + port["width"] * 0.4), round(port["y"] + port["height"] * 0.35)
    before = p.rect("#view")
    u, v = (mx - before["x"]) / before["width"], (my - before["y"]) / before["height"]
    page.mouse.move(mx, my)
    page.mouse.wheel(0, -300)
    after = p.wait_rect_change("#view", before)
    assert after["width"] > before["width"] * 1.2
    assert (mx - after["x"]) / after["width"] == pytest.approx(u, abs=0.003)
    assert (my - after["y"]) / after["height"] == pytest.approx(v, abs=0.003)
    p.assert_box_on_image(0)

    # right-drag pans, whatever the tool
    page.mouse.down(button="right")
    page.mouse.move(mx + 80, my - 50, steps=4)
    page.mouse.up(button="right")
    panned = p.rect("#view")
    assert panned["x"] - after["x"] == pytest.approx(80, abs=1.0)
    assert panned["y"] - after["y"] == pytest.approx(-50, abs=1.0)
    assert panned["width"] == pytest.approx(after["width"], abs=0.5)
    p.assert_box_on_image(0)

    # the Pan tool pans with the left button, and changes no window
    level = page.get_attribute("#window-level", "data-center")
    page.click("#tool-pan")
    page.mouse.move(mx, my)
    page.mouse.down()
    page.mouse.move(mx - 30, my + 40, steps=3)
    page.mouse.up()
    moved = p.rect("#view")
    assert (moved["x"] - panned["x"], moved["y"] - panned["y"]) == (
        pytest.approx(-30, abs=1.0),
        pytest.approx(40, abs=1.0),
    )
    assert page.get_attribute("#window-level", "data-center") == level
    for i in range(len(p.result["detections"])):
        p.assert_box_on_image(i)
    assert page.text_content("#zoom-level") != ""

    page.keyboard.press("0")  # back to fit
    refit = p.rect("#view")
    assert (refit["x"], refit["y"], refit["width"]) == (
        pytest.approx(fitted["x"], abs=0.5),
        pytest.approx(fitted["y"], abs=0.5),
        pytest.approx(fitted["width"], abs=0.5),
    )
    p.close()


def _expected(codes: np.ndarray, slope: float, intercept: float, center: float, width: float) -> np.ndarray:
    values = (codes.astype(np.float64) * slope + intercept).astype(np.float32)
    return np.rint(window(values, center, width, "LINEAR") * 255).astype(np.int16)


def test_window_level_starts_at_the_dicoms_own_voi_and_a_drag_changes_the_rendered_pixels(
    viewer: Viewer,
) -> None:
    p = Page(viewer.browser, viewer.url, viewer.keys["radiologist"], viewer.upload)
    page = p.page
    ds = pydicom.dcmread(viewer.upload, stop_before_pixels=True)
    voi_center, voi_width = float(ds.WindowCenter), float(ds.WindowWidth)
    r = httpx.get(
        f"{viewer.url}/v1/results/{p.request_id}/pixels",
        headers={"X-API-Key": viewer.keys["radiologist"]},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    codes = np.frombuffer(r.content, "<u2")[::97]
    slope, intercept = float(r.headers["X-CXR-Value-Slope"]), float(r.headers["X-CXR-Value-Intercept"])
    assert float(r.headers["X-CXR-Window-Center"]) == voi_center
    assert float(r.headers["X-CXR-Window-Width"]) == voi_width

    # on load: the DICOM's own window, pixel for pixel (up to rounding)
    assert float(page.get_attribute("#window-level", "data-center") or "nan") == voi_center
    assert float(page.get_attribute("#window-level", "data-width") or "nan") == voi_width
    shown = np.array(page.evaluate(SAMPLE_JS), dtype=np.int16)
    assert np.abs(shown - _expected(codes, slope, intercept, voi_center, voi_width)).max() <= 1

    # a drag with the default tool: sideways widens the window, downwards raises the level
    port = p.rect("#viewport")
    x, y = round(port["x"] + port["width"] / 2), round(port["y"] + port["height"] / 2)
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + 120, y + 60, steps=6)
    page.mouse.up()
    k = slope * 65535 / 512
    page.wait_for_function(
        "(w) => Number(document.getElementById('window-level').dataset.width) > w", arg=voi_width
    )
    page.wait_for_function(
        "() => document.getElementById('view').dataset.window === "
        "`${document.getElementById('window-level').dataset.center} "
        "${document.getElementById('window-level').dataset.width}`"
    )
    center = float(page.get_attribute("#window-level", "data-center") or "nan")
    width = float(page.get_attribute("#window-level", "data-width") or "nan")
    assert width == pytest.approx(voi_width + 120 * k, rel=1e-6)
    assert center == pytest.approx(voi_center + 60 * k, rel=1e-6)
    dragged = np.array(page.evaluate(SAMPLE_JS), dtype=np.int16)
    assert np.abs(dragged - _expected(codes, slope, intercept, center, width)).max() <= 1
    assert np.abs(dragged - shown).mean() > 5  # visibly different
    assert page.text_content("#window-level") == f"W {round(width)} · L {round(center)}"

    page.keyboard.press("w")  # back to the DICOM's window
    assert float(page.get_attribute("#window-level", "data-width") or "nan") == voi_width
    assert np.array_equal(np.array(page.evaluate(SAMPLE_JS), dtype=np.int16), shown)
    p.close()


def test_keys_n_p_a_r_b_act_on_the_selected_box_and_the_feedback_carries_them(viewer: Viewer) -> None:
    from playwright.sync_api import expect

    p = Page(viewer.browser, viewer.url, viewer.keys["radiologist"], viewer.upload)
    page = p.page
    n = len(p.result["detections"])
    assert n >= 3, p.result["detections"]
    items = page.locator("#detections li.detection")

    def selected() -> int:
        return int(page.get_attribute("#detections li.selected", "data-index") or "-1")

    assert selected() == 0  # the first box is selected on load
    page.focus("#viewport")
    page.keyboard.press("r")
    page.keyboard.press("n")
    assert selected() == 1
    page.keyboard.press("r")
    page.keyboard.press("a")  # changed my mind
    page.keyboard.press("ArrowRight")
    page.keyboard.press("r")
    assert selected() == 2
    page.keyboard.press("p")
    assert selected() == 1
    assert "rejected" in (items.nth(0).get_attribute("class") or "")
    assert "rejected" not in (items.nth(1).get_attribute("class") or "")
    assert "rejected" in (items.nth(2).get_attribute("class") or "")
    assert "selected" in (page.get_attribute('#overlay rect.det[data-index="1"]', "class") or "")
    assert "rejected" in (page.get_attribute('#overlay rect.det[data-index="0"]', "class") or "")

    # b: one new box, then the tool is back to window/level
    page.select_option("#new-class", "8")
    page.focus("#viewport")
    page.keyboard.press("b")
    expect(page.locator("#tool-box")).to_have_attribute("aria-pressed", "true")
    img = p.rect("#view")
    page.mouse.move(img["x"] + img["width"] * 0.6, img["y"] + img["height"] * 0.2)
    page.mouse.down()
    page.mouse.move(img["x"] + img["width"] * 0.75, img["y"] + img["height"] * 0.3, steps=4)
    page.mouse.up()
    expect(page.locator("#new-boxes li.new-box")).to_have_count(1)
    expect(page.locator("#tool-box")).to_have_attribute("aria-pressed", "false")
    expect(page.locator("#tool-window")).to_have_attribute("aria-pressed", "true")

    # letters typed into the comment are text, not shortcuts
    page.locator("#comment").press_sequentially("a rare one")
    assert "rejected" not in (items.nth(1).get_attribute("class") or "")
    assert selected() == 1

    with page.expect_request(lambda req: req.url.endswith("/v1/feedback")) as sent:
        page.click("#submit")
    expect(page.locator("#feedback-status.ok")).to_be_visible()
    body = json.loads(sent.value.post_data or "{}")
    actions = {r["index"]: r["action"] for r in body["reviews"]}
    assert actions == {0: "reject", 1: "accept", 2: "reject", **{i: "accept" for i in range(3, n)}}
    assert body["comment"] == "a rare one" and not body["no_finding"]
    (added,) = body["new_boxes"]
    assert added["class_id"] == 8
    w, h = p.result["image"]["width"], p.result["image"]["height"]
    x0, y0, x1, y1 = added["box"]
    assert x0 == pytest.approx(0.6 * w, abs=w * 0.01) and x1 == pytest.approx(0.75 * w, abs=w * 0.01)
    assert y0 == pytest.approx(0.2 * h, abs=h * 0.01) and y1 == pytest.approx(0.3 * h, abs=h * 0.01)
    p.close()


def test_saliency_button_is_hidden_without_a_saliency_route(viewer: Viewer) -> None:
    from playwright.sync_api import expect

    # a gateway whose /openapi.json lists no saliency route (an older one): no button, `s` does nothing
    app = create_app(viewer.settings, use_store=False)
    schema = app.openapi()
    schema["paths"] = {path: v for path, v in schema["paths"].items() if "saliency" not in path}
    app.openapi_schema = schema
    with LiveServer(app, free_port()) as server:
        p = Page(viewer.browser, server.url, viewer.keys["radiologist"], viewer.upload)
        expect(p.page.locator("#saliency-toggle")).to_be_hidden()
        p.page.focus("#viewport")
        p.page.keyboard.press("s")
        expect(p.page.locator("#saliency")).to_be_hidden()
        p.close()


def test_saliency_toggle_lays_the_served_map_over_the_image_through_zoom_and_pan(viewer: Viewer) -> None:
    from playwright.sync_api import expect

    p = Page(viewer.browser, viewer.url, viewer.keys["radiologist"], viewer.upload)
    page = p.page
    asked: list[str] = []
    page.on(
        "request", lambda r: asked.append(r.url.split("/v1/results/", 1)[-1]) if "saliency" in r.url else None
    )
    toggle = page.locator("#saliency-toggle")
    expect(toggle).to_be_visible()
    toggle.click()  # the selected box's map: the first box is selected on load
    overlay = page.locator("#saliency")
    expect(overlay).to_be_visible(timeout=60_000)
    expect(toggle).to_have_attribute("aria-pressed", "true")
    page.wait_for_function("() => document.getElementById('saliency').naturalWidth > 0")
    natural = page.evaluate(
        "() => [document.getElementById('saliency').naturalWidth, "
        "document.getElementById('saliency').naturalHeight]"
    )
    w, h = p.result["image"]["width"], p.result["image"]["height"]
    assert max(natural) == 1024 and natural[0] / natural[1] == pytest.approx(w / h, rel=0.005)

    def assert_on_image() -> None:
        shown, img = p.rect("#saliency"), p.rect("#view")
        for k in ("x", "y", "width", "height"):
            assert shown[k] == pytest.approx(img[k], abs=0.5), k

    assert_on_image()
    page.focus("#viewport")
    page.keyboard.press("+")  # zoomed
    assert_on_image()
    port = p.rect("#viewport")
    mx, my = round(port["x"] + port["width"] / 2), round(port["y"] + port["height"] / 2)
    page.mouse.move(mx, my)
    page.mouse.down(button="right")  # and panned
    page.mouse.move(mx + 60, my - 40, steps=4)
    page.mouse.up(button="right")
    assert_on_image()
    assert asked == [f"{p.request_id}/saliency.png?box=0"]
    page.keyboard.press("n")  # the map follows the selection
    expect(overlay).to_have_attribute("data-box", "1", timeout=60_000)
    expect(overlay).to_be_visible()
    assert asked[-1] == f"{p.request_id}/saliency.png?box=1"
    page.keyboard.press("p")  # fetched once per box
    expect(overlay).to_have_attribute("data-box", "0")
    assert len(asked) == 2
    page.keyboard.press("s")
    expect(overlay).to_be_hidden()
    expect(toggle).to_have_attribute("aria-pressed", "false")
    p.close()


def test_readme_screenshot_of_a_review_in_progress(viewer: Viewer, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    p = Page(viewer.browser, viewer.url, viewer.keys["radiologist"], viewer.upload)
    page = p.page
    page.click("#worklist-refresh")
    expect(page.locator("#worklist li.study")).not_to_have_count(0)
    page.focus("#viewport")
    for key in ("r", "n"):  # first box rejected, second selected
        page.keyboard.press(key)
    page.select_option("#new-class", "3")
    page.focus("#viewport")
    page.keyboard.press("b")
    img = p.rect("#view")
    page.mouse.move(img["x"] + img["width"] * 0.3, img["y"] + img["height"] * 0.45)
    page.mouse.down()
    page.mouse.move(img["x"] + img["width"] * 0.7, img["y"] + img["height"] * 0.72, steps=4)
    page.mouse.up()
    port = p.rect("#viewport")  # a narrower window than the phantom's own
    x, y = round(port["x"] + port["width"] * 0.8), round(port["y"] + port["height"] * 0.9)
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x - 200, y, steps=4)
    page.mouse.up()
    page.click("#saliency-toggle")  # where the model looked for its boxes, over the image
    expect(page.locator("#saliency")).to_be_visible(timeout=60_000)
    page.wait_for_function("() => document.getElementById('saliency').naturalWidth > 0")
    page.mouse.move(5, 5)
    raw = tmp_path / "raw.png"
    page.screenshot(path=str(raw))  # the 1400x900 window, not the full page
    shot = Image.open(raw)
    assert shot.size == (VIEWPORT["width"], VIEWPORT["height"])
    small = tmp_path / "review-page.png"
    shot.convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(small, optimize=True)
    assert 20_000 < small.stat().st_size < 400_000
    if os.environ.get("CXR_UPDATE_DOCS_IMAGES") == "1":
        DOCS_IMAGE.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(small, DOCS_IMAGE)
    p.close()

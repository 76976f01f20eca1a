"""The review page's worklist in Chromium: the priority study is listed first and opens in the viewer."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from serving.gateway.app import create_app
from tests.fixtures.browser import CHROMIUM, CHROMIUM_ARGS, require_chromium, review_gateway
from tests.fixtures.servers import free_port
from tests.unit.serving.serving_support import (
    LiveServer,
    make_png,
)

pytestmark = [pytest.mark.browser, pytest.mark.integration]


def test_a_priority_study_is_listed_first_and_clicking_it_opens_its_images_in_the_viewer(
    tmp_path: Path,
) -> None:
    require_chromium()
    from playwright.sync_api import expect, sync_playwright

    settings, keys = review_gateway(tmp_path, conf_threshold=0.6, triage_threshold=0.5)
    app = create_app(settings, use_store=False)
    with LiveServer(app, free_port()) as server, sync_playwright() as pw:
        # three real results (PNGs carry no study, so only the rows made below are listed) ...
        rids = []
        for seed in (1, 2, 3):
            r = httpx.post(
                server.url + "/v1/detect",
                content=make_png(320, 256, seed=seed),
                headers={"X-API-Key": keys["pacs"], "Content-Type": "image/png"},
                timeout=60,
            )
            assert r.status_code == 200, r.text
            rids.append(r.json()["request_id"])
        # ... grouped into an older normal study and a newer priority one of two images
        worklist = app.state.cxr.worklist
        now = datetime.now(UTC)
        worklist.record(
            "default",
            "1.2.826.0.1.7001",
            [rids[2]],
            [0.2],
            "1",
            "production",
            0.5,
            now=now - timedelta(minutes=30),
        )
        worklist.record("default", "1.2.826.0.1.7002", rids[:2], [0.9, 0.4], "1", "production", 0.5, now=now)

        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        console_errors: list[str] = []
        page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
        failed: list[str] = []  # every API call the page makes must succeed (the browser's favicon may not)
        page.on(
            "response", lambda r: failed.append(r.url) if r.status >= 400 and "favicon" not in r.url else None
        )
        page.goto(server.url + "/")
        page.fill("#api-key", keys["radiologist"])
        page.click("#worklist-refresh")
        studies = page.locator("#worklist li.study")
        expect(studies).to_have_count(2)
        first = studies.nth(0)
        assert first.get_attribute("data-study-uid") == "1.2.826.0.1.7002"  # newer, but priority
        assert "priority" in (first.get_attribute("class") or "")
        assert "PRIORITY" in first.inner_text() and "0.90" in first.inner_text()
        assert "priority" not in (studies.nth(1).get_attribute("class") or "")

        first.click()
        expect(page.locator("#status")).to_contain_text(f"request {rids[0]}")
        expect(page.locator("#study-position")).to_have_text("image 1 of 2")
        expect(page.locator("#model-info")).to_contain_text("triage")
        page.click("#next-image")
        expect(page.locator("#status")).to_contain_text(f"request {rids[1]}")
        expect(page.locator("#study-position")).to_have_text("image 2 of 2")
        assert page.locator("#next-image").is_disabled()
        page.screenshot(path=str(tmp_path / "worklist.png"), full_page=True)
        browser.close()
    assert not failed, failed
    assert not [m for m in console_errors if "Content Security Policy" in m], console_errors

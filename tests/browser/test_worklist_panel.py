"""The review page's worklist in Chromium: the priority study is listed first and opens in the viewer."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

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


def _three_results(url: str, key: str) -> list[str]:
    """Three real results of PNG uploads (no study: only the worklist rows a test makes are listed)."""
    rids = []
    for seed in (1, 2, 3):
        r = httpx.post(
            url + "/v1/detect",
            content=make_png(320, 256, seed=seed),
            headers={"X-API-Key": key, "Content-Type": "image/png"},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        rids.append(r.json()["request_id"])
    return rids


def test_a_priority_study_is_listed_first_and_clicking_it_opens_its_images_in_the_viewer(
    tmp_path: Path,
) -> None:
    require_chromium()
    from playwright.sync_api import expect, sync_playwright

    settings, keys = review_gateway(tmp_path, conf_threshold=0.6, triage_threshold=0.5)
    app = create_app(settings, use_store=False)
    with LiveServer(app, free_port()) as server, sync_playwright() as pw:
        # three real results (PNGs carry no study, so only the rows made below are listed) ...
        rids = _three_results(server.url, keys["pacs"])
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


def test_a_study_whose_image_fails_or_answers_late_leaves_nothing_of_the_previous_study_shown(
    tmp_path: Path,
) -> None:
    """Study A is open; study B's source is past its retention (/pixels 404): the viewer must not keep
    A's image, boxes and result under B's name, nor post feedback to A. Then A is opened again and
    study C right after it while A's image is still on its way: A's late reply is dropped."""
    require_chromium()
    from playwright.sync_api import expect, sync_playwright

    settings, keys = review_gateway(tmp_path, conf_threshold=0.6, triage_threshold=0.5)
    app = create_app(settings, use_store=False)
    with LiveServer(app, free_port()) as server, sync_playwright() as pw:
        rids = _three_results(server.url, keys["pacs"])
        uids = {"A": "1.2.826.0.1.7101", "B": "1.2.826.0.1.7102", "C": "1.2.826.0.1.7103"}
        worklist, now = app.state.cxr.worklist, datetime.now(UTC)
        for i, name in enumerate("ABC"):
            seen = now - timedelta(minutes=i + 1)
            worklist.record("default", uids[name], [rids[i]], [0.2], "1", "production", 0.5, now=seen)
        # B's source image is past its retention: its result still answers, its /pixels a 404
        results = app.state.cxr.results
        results.get(rids[1], "default").created -= results.retention.sources + timedelta(minutes=1)
        gone = httpx.get(
            f"{server.url}/v1/results/{rids[1]}/pixels", headers={"X-API-Key": keys["radiologist"]}
        )
        assert gone.status_code == 404, gone.text

        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(server.url + "/")
        page.fill("#api-key", keys["radiologist"])
        page.click("#worklist-refresh")

        def study(name: str) -> Any:
            return page.locator(f'#worklist li.study[data-study-uid="{uids[name]}"]')

        status, submit = page.locator("#status"), page.locator("#submit")
        canvas_size = "() => [document.getElementById('view').width, document.getElementById('view').height]"
        shown_id = "() => state.result && state.result.request_id"

        study("A").click()
        expect(status).to_contain_text(f"request {rids[0]}")
        expect(submit).to_be_enabled()
        assert page.evaluate(canvas_size) != [1, 1]
        expect(page.locator("#model-info")).to_contain_text("model ")
        assert page.locator("#detections li").count() >= 1  # A's boxes, listed and drawn
        assert page.evaluate("() => document.getElementById('overlay').childElementCount") >= 1

        study("B").click()
        expect(status).to_have_class("error")
        expect(status).to_contain_text("404")
        expect(status).to_contain_text("no longer kept")
        assert rids[0] not in (status.text_content() or "")
        expect(submit).to_be_disabled()
        assert page.evaluate(shown_id) is None
        assert page.evaluate(canvas_size) == [1, 1]  # A's image is gone
        assert page.evaluate("() => document.getElementById('overlay').childElementCount") == 0
        expect(page.locator("#detections li")).to_have_count(0)
        expect(page.locator("#model-info")).to_have_text("")
        expect(study("B")).to_have_class("study open")
        expect(page.locator("#study-position")).to_have_text("image 1 of 1")

        # A again, then C while A's image is still on its way; A's reply comes in last
        held: list[Any] = []
        page.route(f"**/v1/results/{rids[0]}/pixels", lambda route: held.append(route))  # answered below
        study("A").click()
        for _ in range(100):
            if held:
                break
            page.wait_for_timeout(50)
        assert len(held) == 1
        study("C").click()
        expect(status).to_contain_text(f"request {rids[2]}")
        # A's reply reaches the page (its response event; "requestfinished" is not raised for a no-store
        # body the page no longer reads)
        with page.expect_response(lambda r: r.url.endswith(f"/{rids[0]}/pixels")) as late:
            held[0].continue_()
        assert late.value.status == 200
        page.wait_for_timeout(500)  # time for the page to read A's late reply (and drop it)
        expect(status).to_contain_text(f"request {rids[2]}")
        assert page.evaluate(shown_id) == rids[2]
        expect(study("C")).to_have_class("study open")
        expect(submit).to_be_enabled()
        browser.close()

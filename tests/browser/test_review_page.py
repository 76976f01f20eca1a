"""The review page in Debian's Chromium: upload, see boxes, reject one, draw one, submit -> feedback in S3."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from serving.gateway.app import create_app
from tests.fixtures.browser import CHROMIUM, CHROMIUM_ARGS, require_chromium, review_gateway
from tests.fixtures.servers import free_port
from tests.unit.serving.serving_support import (
    LiveServer,
    make_dicom,
)

pytestmark = [pytest.mark.browser, pytest.mark.integration]


def _wait_for(predicate: Any, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_radiologist_rejects_a_box_draws_one_and_submits_feedback_that_lands_in_s3(
    tmp_path: Path, s3_store: Any
) -> None:
    require_chromium()
    from playwright.sync_api import sync_playwright

    settings, keys = review_gateway(tmp_path, conf_threshold=0.6)
    store = s3_store.store()
    app = create_app(settings, store=store)
    upload = tmp_path / "chest.dcm"
    upload.write_bytes(make_dicom(320, 256, seed=7))

    with LiveServer(app, free_port()) as server, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        console_errors: list[str] = []  # a CSP violation is reported here ("Refused to ...")
        page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
        page.goto(server.url + "/")
        page.fill("#api-key", keys["radiologist"])
        page.set_input_files("#file", str(upload))
        page.click("#detect")
        page.wait_for_selector("#detections li.detection")
        detections = page.locator("#detections li.detection")
        n_boxes = detections.count()
        assert n_boxes >= 1
        status = page.text_content("#status") or ""
        request_id = status.rsplit("request ", 1)[-1].strip()

        detections.nth(0).locator("button.reject").click()
        assert "rejected" in (detections.nth(0).get_attribute("class") or "")

        page.select_option("#new-class", "3")
        page.click("#tool-box")  # a plain drag adjusts the window; "New box" draws one box
        box = page.locator("#view").bounding_box()
        assert box is not None
        page.mouse.move(box["x"] + box["width"] * 0.2, box["y"] + box["height"] * 0.3)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.6, steps=5)
        page.mouse.up()
        assert page.locator("#new-boxes li.new-box").count() == 1

        page.fill("#comment", "one false positive, one missed cardiomegaly")
        page.click("#submit")
        page.wait_for_selector("#feedback-status.ok")
        receipt = page.text_content("#feedback-status") or ""
        page.screenshot(path=str(tmp_path / "review.png"), full_page=True)
        browser.close()
    assert not [m for m in console_errors if "Content Security Policy" in m], console_errors

    feedback_id = receipt.split(": ", 1)[1].split(" ", 1)[0]
    assert _wait_for(lambda: store.exists(f"feedback/{feedback_id}/feedback.json"))
    meta = json.loads(store.get_bytes(f"feedback/{feedback_id}/feedback.json"))
    assert meta["feedback_id"] == feedback_id
    assert "request_id" not in meta and request_id not in json.dumps(meta)  # no link to the source
    rows = list(
        csv.DictReader(io.StringIO(store.get_bytes(f"feedback/{feedback_id}/annotations.csv").decode()))
    )
    assert len(rows) == n_boxes  # one rejected, one drawn
    drawn = [r for r in rows if r["class_name"] == "Cardiomegaly" and float(r["x_min"]) < 100]
    assert drawn, rows
    x0, y0, x1, y1 = (float(drawn[-1][k]) for k in ("x_min", "y_min", "x_max", "y_max"))
    assert 50 <= x0 < x1 <= 180 and 60 <= y0 < y1 <= 170  # 20%..50% of 320 wide, 30%..60% of 256 high
    assert (tmp_path / "review.png").stat().st_size > 10_000


@contextlib.contextmanager
def _detected(tmp_path: Path) -> Iterator[tuple[Any, Any]]:
    """A radiologist's page showing a detected DICOM, and the gateway's feedback spool (no store:
    every feedback lands there)."""
    from playwright.sync_api import expect, sync_playwright

    settings, keys = review_gateway(tmp_path, conf_threshold=0.6)
    app = create_app(settings, use_store=False)
    upload = tmp_path / "chest.dcm"
    upload.write_bytes(make_dicom(320, 256, seed=7))
    with LiveServer(app, free_port()) as server, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(server.url + "/")
        page.fill("#api-key", keys["radiologist"])
        page.set_input_files("#file", str(upload))
        page.click("#detect")
        expect(page.locator("#status")).to_contain_text("request ", timeout=60_000)
        yield page, app.state.cxr.feedback.spool
        browser.close()


def test_a_retry_after_a_lost_reply_and_a_double_click_store_the_feedback_once(tmp_path: Path) -> None:
    """The feedback id is drawn once per shown result: a retry after a reply lost on the way back
    gets "duplicate", not a second copy; Submit is disabled while a submission is in flight and after
    it was stored, until the review changes (then it is a new feedback, with a new id)."""
    require_chromium()
    from playwright.sync_api import expect

    with _detected(tmp_path) as (page, spool):
        submit, feedback_status = page.locator("#submit"), page.locator("#feedback-status")
        page.fill("#comment", "first look")

        # 1. the gateway keeps the feedback but its reply is lost on the way back (a proxy's 502)
        sent: list[dict[str, Any]] = []
        kept: list[int] = []

        def lose_reply(route: Any) -> None:
            sent.append(json.loads(route.request.post_data or "{}"))
            kept.append(route.fetch().status)
            lost = '{"error": {"message": "bad gateway"}}'
            route.fulfill(status=502, content_type="application/json", body=lost)

        page.route("**/v1/feedback", lose_reply)
        submit.click()
        expect(feedback_status).to_have_class("error")
        expect(feedback_status).to_contain_text("502")
        assert kept == [202] and len(spool.pending()) == 1
        page.unroute("**/v1/feedback")
        expect(submit).to_be_enabled()
        # the reviewer retries: the same feedback id, so the gateway does not keep it twice
        with page.expect_request(lambda r: r.url.endswith("/v1/feedback")) as retry:
            submit.click()
        expect(feedback_status).to_have_class("ok")
        assert json.loads(retry.value.post_data or "{}")["feedback_id"] == sent[0]["feedback_id"]
        expect(feedback_status).to_contain_text("already stored")
        assert len(spool.pending()) == 1
        expect(submit).to_be_disabled()  # stored: nothing to send until the review changes

        # 2. a change after that is a new feedback; a double click while it is in flight sends it once
        page.fill("#comment", "second look")
        expect(submit).to_be_enabled()
        held: list[Any] = []
        page.route("**/v1/feedback", lambda route: held.append(route))  # answered below
        submit.dblclick()
        for _ in range(100):
            if held:
                break
            page.wait_for_timeout(50)
        page.wait_for_timeout(300)  # time for a second request, if the page sends one
        expect(submit).to_be_disabled()
        assert len(held) == 1
        second = json.loads(held[0].request.post_data or "{}")
        assert second["feedback_id"] != sent[0]["feedback_id"] and second["comment"] == "second look"
        for route in held:
            route.continue_()
        expect(feedback_status).to_have_class("ok")
        expect(feedback_status).to_contain_text("feedback spooled: ")
        expect(submit).to_be_disabled()
    assert len(spool.pending()) == 2


def test_a_changed_review_after_a_lost_reply_is_kept_as_a_new_feedback_not_refused_for_ever(
    tmp_path: Path,
) -> None:
    """The gateway kept the first try (its reply lost), the reviewer then changed the review: the
    same id with another body is a 409 feedback_id_reused, so the page takes the first as stored
    and sends the changes as a new feedback instead of retrying a refused id."""
    require_chromium()
    from playwright.sync_api import expect

    with _detected(tmp_path) as (page, spool):
        submit, feedback_status = page.locator("#submit"), page.locator("#feedback-status")
        page.fill("#comment", "first look")

        def lose_reply(route: Any) -> None:
            route.fetch()  # the gateway keeps it
            route.fulfill(status=502, content_type="application/json", body='{"error": {"message": "x"}}')

        page.route("**/v1/feedback", lose_reply)
        submit.click()
        expect(feedback_status).to_have_class("error")
        page.unroute("**/v1/feedback")
        page.fill("#comment", "second look")  # changed before the retry: the same id, another body
        with page.expect_response(lambda r: r.url.endswith("/v1/feedback")) as refused:
            submit.click()
        assert refused.value.status == 409
        expect(feedback_status).to_contain_text("already stored")
        expect(submit).to_be_enabled()  # the changes are a new feedback, with a new id
        with page.expect_request(lambda r: r.url.endswith("/v1/feedback")) as again:
            submit.click()
        expect(feedback_status).to_contain_text("feedback spooled: ")
        assert json.loads(again.value.post_data or "{}")["comment"] == "second look"
        expect(submit).to_be_disabled()
    assert len(spool.pending()) == 2

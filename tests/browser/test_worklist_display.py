"""What the review page's worklist shows a radiologist, in Chromium, against a scripted gateway.

The page and its static files are the real ones, served with the gateway's security headers (so a
CSP violation shows up); ``/v1/worklist`` and the result routes answer what each test scripts. The
page's clock is Playwright's, so the periodic refresh is tested without waiting for it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest

from serving.gateway.middleware import SECURITY_HEADERS
from serving.gateway.routes.review import STATIC_DIR
from tests.fixtures.browser import CHROMIUM, CHROMIUM_ARGS, require_chromium

pytestmark = [pytest.mark.browser, pytest.mark.integration]

ORIGIN = "http://cxr.test"
KEY = "key-of-reader-a"
TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}


def study(uid: str, first_seen: datetime, score: float = 0.2, priority: bool = False) -> dict[str, Any]:
    return {
        "study_uid": uid,
        "score": score,
        "priority": priority,
        "images": 1,
        "result_ids": [f"r{uid[-4:]}"],
        "model_version": "1",
        "stage": "production",
        "first_seen": first_seen.isoformat(timespec="seconds"),
        "last_seen": first_seen.isoformat(timespec="seconds"),
    }


def result(rid: str) -> dict[str, Any]:
    return {
        "request_id": rid,
        "model": {"name": "cxr", "version": "1", "stage": "production"},
        "image": {"width": 4, "height": 3},
        "detections": [{"class_id": 3, "class_name": "Cardiomegaly", "confidence": 0.8, "box": [1, 1, 3, 2]}],
        "timings_ms": {"total": 12.0},
    }


@dataclass
class Gateway:
    """The scripted answers: ``studies`` for KEY; any other key is refused; ``hold`` keeps worklist calls."""

    studies: list[dict[str, Any]] = field(default_factory=list)
    hold: bool = False
    held: list[Any] = field(default_factory=list)
    worklist_calls: int = 0

    def handle(self, route: Any) -> None:
        request = route.request
        path = request.url[len(ORIGIN) :].split("?", 1)[0]
        if path == "/" or path.startswith("/static/"):
            name = "index.html" if path == "/" else path.rsplit("/", 1)[-1]
            body = (STATIC_DIR / name).read_bytes()
            ctype = TYPES["." + name.rsplit(".", 1)[-1]]
            route.fulfill(status=200, body=body, headers={**SECURITY_HEADERS, "Content-Type": ctype})
            return
        if path == "/openapi.json":
            route.fulfill(status=200, json={"paths": {}})
            return
        if path == "/v1/worklist":
            self.worklist_calls += 1
        if request.headers.get("authorization") != f"Bearer {KEY}":
            error = {"error": {"code": "unauthorized", "message": "unknown API key", "request_id": "x"}}
            route.fulfill(status=401, json=error)
            return
        if path == "/v1/worklist":
            if self.hold:
                self.held.append((route, json.loads(json.dumps(self.studies))))
                return
            self.answer_worklist(route, self.studies)
        elif path.endswith("/pixels"):
            codes = np.arange(12, dtype="<u2") * 1000
            headers = {
                "X-CXR-Columns": "4", "X-CXR-Rows": "3", "X-CXR-Value-Slope": "1.0",
                "X-CXR-Value-Intercept": "0.0", "X-CXR-Window-Center": "6000.0",
                "X-CXR-Window-Width": "12000.0", "X-CXR-Window-Function": "LINEAR", "X-CXR-Invert": "0",
                "Content-Type": "application/octet-stream",
            }  # fmt: skip
            route.fulfill(status=200, body=codes.tobytes(), headers=headers)
        elif path.startswith("/v1/results/"):
            route.fulfill(status=200, json=result(path.rsplit("/", 1)[-1]))
        else:
            missing = {"error": {"code": "not_found", "message": path, "request_id": "x"}}
            route.fulfill(status=404, json=missing)

    @staticmethod
    def answer_worklist(route: Any, studies: list[dict[str, Any]]) -> None:
        route.fulfill(status=200, json={"studies": studies, "threshold": 0.5, "hours": 168})


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def open_page(browser: Any) -> Iterator[Callable[[Gateway], Any]]:
    contexts: list[Any] = []
    errors: list[str] = []

    def opener(gateway: Gateway) -> Any:
        context = browser.new_context(
            viewport={"width": 1400, "height": 900}, timezone_id="Europe/Berlin", locale="en-GB"
        )
        contexts.append(context)
        context.route("**/*", gateway.handle)
        page = context.new_page()
        page.on("console", lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.clock.install()
        page.goto(ORIGIN + "/")
        return page

    yield opener
    for context in contexts:
        context.close()
    assert not errors, errors


def _enter_key(page: Any, key: str) -> None:
    page.fill("#api-key", key)
    page.locator("#api-key").blur()  # "change" fires when the field is left, as on a paste and Tab


def test_a_study_waiting_since_an_earlier_day_shows_its_date_not_only_a_time_of_day(
    open_page: Callable[[Gateway], Any],
) -> None:
    from playwright.sync_api import expect

    now = datetime.now(UTC).replace(microsecond=0)
    old = now - timedelta(days=3)  # same time of day as the new one, three days earlier
    page = open_page(Gateway([study("1.2.3.1111", old), study("1.2.3.2222", now)]))
    _enter_key(page, KEY)
    rows = page.locator("#worklist li.study")
    expect(rows).to_have_count(2)
    old_text, new_text = rows.nth(0).inner_text(), rows.nth(1).inner_text()
    day = page.evaluate(
        "(iso) => new Date(iso).toLocaleDateString([], { day: 'numeric', month: 'short' })",
        old.isoformat(),
    )
    assert day in old_text, old_text
    assert old_text.replace("…2.3.1111", "") != new_text.replace("…2.3.2222", "")  # they waited 3 days apart


def test_a_score_just_below_the_priority_threshold_is_never_shown_as_reaching_it(
    open_page: Callable[[Gateway], Any],
) -> None:
    from playwright.sync_api import expect

    page = open_page(Gateway([study("1.2.3.1111", datetime.now(UTC), score=0.4996, priority=False)]))
    _enter_key(page, KEY)
    row = page.locator("#worklist li.study")
    expect(row).to_have_count(1)
    expect(page.locator("#worklist-status")).to_contain_text("priority at score ≥ 0.5")
    assert "0.50" not in row.inner_text() and "0.49" in row.inner_text()


def test_a_new_priority_study_appears_on_an_open_page_without_a_click(
    open_page: Callable[[Gateway], Any],
) -> None:
    from playwright.sync_api import expect

    now = datetime.now(UTC)
    gateway = Gateway([study("1.2.3.1111", now - timedelta(minutes=20))])
    page = open_page(gateway)
    _enter_key(page, KEY)
    rows = page.locator("#worklist li.study")
    expect(rows).to_have_count(1)
    # the PACS sends a study the model flags: the reading room's open page must list it, first
    gateway.studies.insert(0, study("1.2.3.9999", now, score=0.93, priority=True))
    page.clock.run_for(2 * 60_000)
    expect(rows).to_have_count(2)
    assert rows.nth(0).get_attribute("data-study-uid") == "1.2.3.9999"


def test_a_later_refresh_is_never_overwritten_by_an_earlier_reply(
    open_page: Callable[[Gateway], Any],
) -> None:
    from playwright.sync_api import expect

    now = datetime.now(UTC)
    gateway = Gateway([study("1.2.3.1111", now)], hold=True)
    page = open_page(gateway)
    _enter_key(page, KEY)
    gateway.studies.append(study("1.2.3.2222", now))
    page.click("#worklist-refresh")
    for _ in range(100):
        if len(gateway.held) == 2:
            break
        page.wait_for_timeout(20)
    assert len(gateway.held) == 2
    (first, first_studies), (second, second_studies) = gateway.held
    gateway.answer_worklist(second, second_studies)
    rows = page.locator("#worklist li.study")
    expect(rows).to_have_count(2)
    gateway.answer_worklist(first, first_studies)  # the earlier listing answers last
    page.wait_for_timeout(300)
    expect(rows).to_have_count(2)


def test_clearing_or_changing_the_key_leaves_nothing_of_the_previous_readers_studies_shown(
    open_page: Callable[[Gateway], Any],
) -> None:
    """A shared reading-room workstation: reader A's worklist and open image must go with A's key."""
    from playwright.sync_api import expect

    gateway = Gateway([study("1.2.3.1111", datetime.now(UTC))])
    page = open_page(gateway)
    _enter_key(page, KEY)
    rows = page.locator("#worklist li.study")
    expect(rows).to_have_count(1)
    rows.nth(0).click()
    expect(page.locator("#status")).to_contain_text("request r1111")
    expect(rows.nth(0)).to_have_class("study open")

    _enter_key(page, "")  # A clears the key
    expect(rows).to_have_count(0)
    assert page.evaluate("() => state.result") is None
    canvas = "() => { const c = document.getElementById('view'); return [c.width, c.height]; }"
    assert page.evaluate(canvas) == [1, 1]  # A's image is gone
    expect(page.locator("#study-nav")).to_be_hidden()

    _enter_key(page, KEY)
    expect(rows).to_have_count(1)
    _enter_key(page, "key-nobody-has")  # refused: A's list is not left under B's key
    expect(page.locator("#worklist-status")).to_have_class("error")
    expect(rows).to_have_count(0)
    calls = gateway.worklist_calls  # a refused key is not retried by the timer (auth-failure limit)
    page.clock.run_for(5 * 60_000)
    page.wait_for_timeout(200)
    assert gateway.worklist_calls == calls


def test_a_refresh_keeps_the_open_study_marked(open_page: Callable[[Gateway], Any]) -> None:
    from playwright.sync_api import expect

    gateway = Gateway([study("1.2.3.1111", datetime.now(UTC))])
    page = open_page(gateway)
    _enter_key(page, KEY)
    rows = page.locator("#worklist li.study")
    rows.nth(0).click()
    expect(page.locator("#status")).to_contain_text("request r1111")
    expect(rows.nth(0)).to_have_class("study open")
    with page.expect_response("**/v1/worklist"):
        page.click("#worklist-refresh")
    page.wait_for_timeout(200)  # the page reads the reply and lists it again
    expect(rows.nth(0)).to_have_class("study open")


def test_a_worklist_that_cannot_be_fetched_says_so(open_page: Callable[[Gateway], Any]) -> None:
    from playwright.sync_api import expect

    page = open_page(Gateway([study("1.2.3.1111", datetime.now(UTC))]))
    page.context.route("**/v1/worklist", lambda route: route.abort())
    _enter_key(page, KEY)
    expect(page.locator("#worklist-status")).to_have_class("error")
    expect(page.locator("#worklist-status")).to_contain_text("worklist")

"""The API's Swagger UI page in Debian's Chromium: it renders from this gateway alone.

A hospital network reaches no CDN: FastAPI's own page loads its script and styles from jsdelivr, so
it stayed blank there and named the gateway to a host outside with each load.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import pytest

from serving.gateway.app import create_app
from tests.fixtures.browser import CHROMIUM, CHROMIUM_ARGS, require_chromium, review_gateway
from tests.fixtures.servers import free_port
from tests.unit.serving.serving_support import LiveServer

pytestmark = [pytest.mark.browser, pytest.mark.integration]


def test_swagger_ui_renders_with_every_request_to_the_gateway(tmp_path: Path) -> None:
    require_chromium()
    from playwright.sync_api import expect, sync_playwright

    settings, _ = review_gateway(tmp_path)
    app = create_app(settings, use_store=False)
    with LiveServer(app, free_port()) as server, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            requested: list[str] = []
            page.on("request", lambda r: requested.append(r.url))
            violations: list[str] = []
            page.on("console", lambda m: violations.append(m.text) if "Content Security" in m.text else None)

            page.goto(server.url + "/docs")
            # the operations come from /openapi.json: Swagger UI's script ran and fetched it
            expect(page.locator(".opblock-summary-path", has_text="/v1/detect").first).to_be_visible(
                timeout=30_000
            )
        finally:
            browser.close()
    ours = urlsplit(server.url).netloc
    web = [urlsplit(u) for u in requested if urlsplit(u).scheme in ("http", "https")]
    elsewhere = [u.geturl() for u in web if u.netloc != ours]
    assert not elsewhere, f"the docs page reached outside the gateway: {elsewhere}"
    assert not violations, violations

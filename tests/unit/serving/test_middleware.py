"""The gateway's ASGI middleware: request ids, the audit line of every outcome, the 500 of last resort."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from serving.gateway.middleware import ObserveMiddleware

pytestmark = pytest.mark.unit


def _audit_entry(client: TestClient, request_id: str) -> dict[str, Any]:
    audit = client.app.state.cxr.settings.audit_log.read_text()  # type: ignore[attr-defined]
    return next(json.loads(x) for x in audit.splitlines() if json.loads(x)["request_id"] == request_id)


def test_a_plain_client_request_id_is_kept_and_anything_else_replaced(
    onnx_client: TestClient, keys: dict[str, str]
) -> None:
    auth = {"Authorization": f"Bearer {keys['operator']}"}
    kept = onnx_client.get("/v1/models", headers={**auth, "X-Request-ID": "pacs-4711-a"})
    assert kept.status_code == 200 and kept.headers["X-Request-ID"] == "pacs-4711-a"
    assert _audit_entry(onnx_client, "pacs-4711-a")["route"] == "/v1/models"
    # "Nº-4711ª": letters to str.isalnum, and not ASCII (a name or a number sign reached every log line)
    for bad in ("x" * 65, "a b", "<script>", "Nº-4711ª"):
        replaced = onnx_client.get("/v1/models", headers={**auth, "X-Request-ID": bad.encode()})
        rid = replaced.headers["X-Request-ID"]
        assert rid != bad and len(rid) == 32 and rid.isalnum()


def test_refusals_are_audited_with_their_status_and_role(
    onnx_client: TestClient, keys: dict[str, str]
) -> None:
    unknown = onnx_client.post("/v1/detect", content=b"x", headers={"Authorization": "Bearer nope"})
    assert unknown.status_code == 401
    entry = _audit_entry(onnx_client, unknown.headers["X-Request-ID"])
    assert entry["status"] == 401 and entry["route"] == "/v1/detect" and entry["role"] is None

    too_big = onnx_client.post(
        "/v1/detect",
        content=b"\0" * 16,
        headers={"Authorization": f"Bearer {keys['pacs']}", "Content-Length": str(10**12)},
    )
    assert too_big.status_code == 413
    assert too_big.json()["error"]["request_id"] == too_big.headers["X-Request-ID"]
    assert _audit_entry(onnx_client, too_big.headers["X-Request-ID"])["status"] == 413


def test_an_unexpected_error_is_a_json_500_with_its_request_id_and_audited(onnx_client: TestClient) -> None:
    state = onnx_client.app.state.cxr  # type: ignore[attr-defined]
    app = FastAPI()

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("a bug")

    app.add_middleware(ObserveMiddleware, state=state)
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.get("/boom")
    assert r.status_code == 500
    body = r.json()["error"]
    assert body["code"] == "internal_error" and body["request_id"] == r.headers["X-Request-ID"]
    assert "a bug" not in r.text  # no internals leak to the client
    entry = _audit_entry(onnx_client, body["request_id"])
    assert entry["status"] == 500 and entry["route"] == "/boom"


def test_a_content_length_of_non_ascii_digits_is_a_400_not_a_500(
    onnx_client: TestClient, keys: dict[str, str]
) -> None:
    """``"²".isdigit()`` is True but ``int("²")`` fails: the size check made that header a 500.

    Sent straight to the ASGI app: uvicorn's HTTP parsers refuse such a header before the app
    sees it, another server or proxy in front need not.
    """
    import asyncio

    sent: list[dict[str, Any]] = []
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/feedback",
        "raw_path": b"/v1/feedback",
        "query_string": b"",
        "root_path": "",
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 80),
        "headers": [
            (b"content-length", "²".encode("latin-1")),
            (b"x-api-key", keys["radiologist"].encode()),
            (b"content-type", b"application/json"),
        ],
    }
    body = [{"type": "http.request", "body": b"{}", "more_body": False}]

    async def receive() -> dict[str, Any]:
        return body.pop(0) if body else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(onnx_client.app(scope, receive, send))  # type: ignore[arg-type]
    assert sent[0]["status"] == 400
    error = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))["error"]
    assert error["code"] == "invalid_request" and "Content-Length" in error["message"]

"""Every route x every role: 401 without/with an unknown key, 403 below the route's role, 2xx at or above."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from httpx import Response
from pydicom.uid import generate_uid

from serving.gateway.auth import Role
from tests.unit.serving.serving_support import make_dicom, stow_body

pytestmark = pytest.mark.unit

Call = Callable[[TestClient, dict[str, str], str], Response]


def _stow(c: TestClient, h: dict[str, str], rid: str) -> Response:
    body, ctype = stow_body(make_dicom(seed=5))
    return c.post("/dicomweb/studies", content=body, headers={**h, "Content-Type": ctype})


def _send_back(c: TestClient, h: dict[str, str], rid: str) -> Response:
    """A study's image analysed (STOW-RS, nothing sent back), then its results asked for, as the SCP does."""
    study = generate_uid()
    body, ctype = stow_body(make_dicom(seed=6, study_uid=study))
    c.post(
        "/dicomweb/studies", params={"send_back": "false"}, content=body, headers={**h, "Content-Type": ctype}
    )
    return c.post(f"/v1/studies/{study}/send-back", headers=h)


def _feedback(c: TestClient, h: dict[str, str], rid: str) -> Response:
    return c.post(
        "/v1/feedback",
        json={"request_id": rid, "feedback_id": uuid.uuid4().hex, "no_finding": True},
        headers=h,
    )


ROUTES: dict[str, tuple[Role, Call]] = {
    "POST /v1/detect": (
        Role.pacs,
        lambda c, h, rid: c.post(
            "/v1/detect", files={"file": ("a.dcm", make_dicom(seed=1), "application/dicom")}, headers=h
        ),
    ),
    "POST /v1/detect/batch": (
        Role.pacs,
        lambda c, h, rid: c.post(
            "/v1/detect/batch",
            files=[
                ("file", ("a.dcm", make_dicom(seed=2), "application/dicom")),
                ("file", ("b.dcm", make_dicom(seed=3), "application/dicom")),
            ],
            headers=h,
        ),
    ),
    "POST /dicomweb/studies": (Role.pacs, _stow),
    "POST /v1/studies/{uid}/send-back": (Role.pacs, _send_back),
    "GET /v1/results/{id}": (Role.pacs, lambda c, h, rid: c.get(f"/v1/results/{rid}", headers=h)),
    "GET /v1/results/{id}/sr": (Role.pacs, lambda c, h, rid: c.get(f"/v1/results/{rid}/sr", headers=h)),
    "GET /v1/results/{id}/preview.png": (
        Role.radiologist,
        lambda c, h, rid: c.get(f"/v1/results/{rid}/preview.png", headers=h),
    ),
    "GET /v1/results/{id}/pixels": (
        Role.radiologist,
        lambda c, h, rid: c.get(f"/v1/results/{rid}/pixels", headers=h),
    ),
    "GET /v1/results/{id}/saliency.png": (
        Role.radiologist,
        lambda c, h, rid: c.get(f"/v1/results/{rid}/saliency.png", headers=h),
    ),
    "POST /v1/feedback": (Role.radiologist, _feedback),
    "GET /v1/models": (Role.operator, lambda c, h, rid: c.get("/v1/models", headers=h)),
    "POST /v1/routing/reload": (Role.operator, lambda c, h, rid: c.post("/v1/routing/reload", headers=h)),
    "POST /v1/detect + X-CXR-Stage": (
        Role.operator,
        lambda c, h, rid: c.post(
            "/v1/detect",
            content=make_dicom(seed=4),
            headers={**h, "Content-Type": "application/dicom", "X-CXR-Stage": "production"},
        ),
    ),
    "GET /v1/admin/keys": (Role.admin, lambda c, h, rid: c.get("/v1/admin/keys", headers=h)),
}


@pytest.fixture(scope="module")
def request_id(onnx_client: TestClient, keys: dict[str, str]) -> str:
    r = onnx_client.post(
        "/v1/detect",
        content=make_dicom(seed=9),
        headers={"Authorization": f"Bearer {keys['pacs']}", "Content-Type": "application/dicom"},
    )
    assert r.status_code == 200, r.text
    return str(r.json()["request_id"])


def _error(r: Response) -> dict[str, Any]:
    body = r.json()
    assert set(body["error"]) == {"code", "message", "request_id"}
    return dict(body["error"])


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("role", [r.name for r in Role])
def test_role_gets_2xx_at_or_above_the_routes_role_and_403_below(
    onnx_client: TestClient, keys: dict[str, str], request_id: str, route: str, role: str
) -> None:
    needed, call = ROUTES[route]
    r = call(onnx_client, {"Authorization": f"Bearer {keys[role]}"}, request_id)
    if Role[role] >= needed:
        assert 200 <= r.status_code < 300, r.text
    else:
        assert r.status_code == 403, r.text
        assert _error(r)["code"] == "forbidden"


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer not-a-key"},
        {"X-API-Key": "wrong"},
        {"Authorization": "Basic dXNlcjpwdw=="},
    ],
    ids=["no-key", "unknown-bearer", "unknown-x-api-key", "basic-scheme"],
)
def test_missing_or_unknown_key_gets_401(
    onnx_client: TestClient, request_id: str, route: str, headers: dict[str, str]
) -> None:
    _, call = ROUTES[route]
    r = call(onnx_client, headers, request_id)
    assert r.status_code == 401, r.text
    assert _error(r)["code"] == "unauthorized"


def test_x_api_key_header_is_accepted_like_bearer(onnx_client: TestClient, keys: dict[str, str]) -> None:
    r = onnx_client.get("/v1/models", headers={"X-API-Key": keys["operator"]})
    assert r.status_code == 200
    assert r.json()["stages"]["production"]["ready"] is True


def test_public_routes_need_no_key(onnx_client: TestClient) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/", "/docs", "/openapi.json"):
        assert onnx_client.get(path).status_code == 200, path

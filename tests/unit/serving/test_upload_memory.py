"""What an upload holds while its images are analysed: the images, not the request body beside them.

``read_body`` kept the whole body on the request (``request._body``, for ``request.form()``), so
the STOW-RS route's ``del body`` after splitting freed nothing: a 64 MiB STOW-RS request held its
body and its split instances, twice its size, for as long as its instances were analysed; a
multipart ``/v1/detect`` held its body beside the file parsed out of it.
"""

from __future__ import annotations

import gc
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.unit.serving.serving_support import make_dicom, stow_body

pytestmark = pytest.mark.unit


def _spy_body(monkeypatch: pytest.MonkeyPatch, module: Any) -> list[bytes]:
    """Every body ``read_body`` returns in ``module``, kept here (one reference of its own)."""
    bodies: list[bytes] = []
    real = module.read_body

    async def spy(*args: Any, **kwargs: Any) -> bytes:
        body: bytes = await real(*args, **kwargs)
        bodies.append(body)
        return body

    monkeypatch.setattr(module, "read_body", spy)
    return bodies


def _holders(held: list[bytes]) -> int:
    """Requests holding ``held[-1]`` as their body (``request._body``): what kept it alive.

    Not a reference count: the test's own copy of what it sent may be that very object (a body
    sent in one piece is not copied on its way in), which made a count depend on the transport.
    """
    body = held[-1]

    def holds(referrer: object) -> bool:  # the Request itself: 3.11 keeps attributes inline
        owner = referrer.get("_body") if isinstance(referrer, dict) else getattr(referrer, "_body", None)
        return owner is body

    return sum(1 for referrer in gc.get_referrers(body) if holds(referrer))


def _holders_when_called(
    monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, bodies: list[bytes]
) -> list[int]:
    """:func:`_holders` of the last body, each time the coroutine method ``owner.name`` is called
    (the step that analyses the images)."""
    real = getattr(owner, name)
    held: list[int] = []

    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        held.append(_holders(bodies))
        return await real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return held


def test_a_stow_request_does_not_hold_its_body_while_its_instances_are_analysed(
    onnx_client: TestClient, keys: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from serving.gateway.routes import dicomweb

    bodies = _spy_body(monkeypatch, dicomweb)
    held = _holders_when_called(monkeypatch, onnx_client.app.state.cxr.stow, "store", bodies)  # type: ignore[attr-defined]
    body, ctype = stow_body(make_dicom(seed=81), make_dicom(seed=82))
    r = onnx_client.post(
        "/dicomweb/studies",
        content=body,
        headers={"Authorization": f"Bearer {keys['pacs']}", "Content-Type": ctype},
    )
    assert r.status_code == 200, r.text
    assert held == [0]


def test_a_multipart_detect_does_not_hold_its_body_beside_the_parsed_file(
    onnx_client: TestClient, keys: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from serving.gateway import uploads

    bodies = _spy_body(monkeypatch, uploads)
    held = _holders_when_called(monkeypatch, onnx_client.app.state.cxr.detector, "detect", bodies)  # type: ignore[attr-defined]
    r = onnx_client.post(
        "/v1/detect",
        files={"file": ("x.dcm", make_dicom(seed=83), "application/dicom")},
        headers={"Authorization": f"Bearer {keys['pacs']}"},
    )
    assert r.status_code == 200, r.text
    assert held == [0]

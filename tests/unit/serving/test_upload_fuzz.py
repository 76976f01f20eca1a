"""Hypothesis fuzzing of the upload path: any bytes, any content type -> a JSON answer below 500."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.serving.serving_support import make_dicom, make_png

pytestmark = pytest.mark.unit

_DICOM = make_dicom(48, 40)
_PNG = make_png(48, 40)


def _mutations() -> st.SearchStrategy[bytes]:
    """Random bytes, and valid files with random corruption (cut, flipped bytes, garbage appended)."""
    base = st.sampled_from([_DICOM, _PNG, b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"\0" * 128 + b"DICM"])

    def corrupt(data: bytes, cut: int, pos: int, byte: int, tail: bytes) -> bytes:
        data = data[: max(1, cut % (len(data) + 1))]
        if data:
            i = pos % len(data)
            data = data[:i] + bytes([byte]) + data[i + 1 :]
        return data + tail

    return st.one_of(
        st.binary(max_size=512),
        st.builds(
            corrupt,
            base,
            st.integers(0, 10**6),
            st.integers(0, 10**6),
            st.integers(0, 255),
            st.binary(max_size=64),
        ),
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=_mutations(),
    ctype=st.sampled_from(
        ["application/dicom", "image/png", "image/jpeg", "application/octet-stream", "text/plain", ""]
    ),
)
def test_any_upload_gets_json_and_never_a_5xx(
    onnx_client: TestClient, keys: dict[str, str], body: bytes, ctype: str
) -> None:
    headers = {"Authorization": f"Bearer {keys['pacs']}"}
    if ctype:
        headers["Content-Type"] = ctype
    r = onnx_client.post("/v1/detect", content=body, headers=headers)
    assert r.status_code < 500, r.text
    payload = r.json()
    if r.status_code == 200:
        assert "detections" in payload
    else:
        assert payload["error"]["code"]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=400), boundary=st.text("abcXYZ019-", min_size=1, max_size=20))
def test_any_multipart_body_gets_a_4xx_or_200(
    onnx_client: TestClient, keys: dict[str, str], body: bytes, boundary: str
) -> None:
    headers = {"Authorization": f"Bearer {keys['pacs']}"}
    for path, ctype in (
        ("/v1/detect", f"multipart/form-data; boundary={boundary}"),
        ("/dicomweb/studies", f'multipart/related; type="application/dicom"; boundary={boundary}'),
    ):
        r = onnx_client.post(path, content=body, headers={**headers, "Content-Type": ctype})
        assert r.status_code < 500, (path, r.text)
        assert r.headers["content-type"].startswith("application/")

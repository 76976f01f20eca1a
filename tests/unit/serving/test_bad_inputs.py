"""Bad uploads get a 4xx JSON error a person can act on: never a 500, never a dead worker."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.unit.serving.serving_support import make_dicom, make_png

pytestmark = pytest.mark.unit


def _header_only_dicom(rows: int, cols: int) -> bytes:
    """A DICOM whose header claims rows x cols but carries only a few pixel bytes."""
    data = bytearray(make_dicom(16, 16))
    ds_bytes = bytes(data)
    # rewrite Rows (0028,0010) and Columns (0028,0011), explicit VR US, little endian
    for tag, value in ((b"\x28\x00\x10\x00US\x02\x00", rows), (b"\x28\x00\x11\x00US\x02\x00", cols)):
        pos = ds_bytes.index(tag)
        data[pos + 8 : pos + 10] = struct.pack("<H", min(value, 65535))
        ds_bytes = bytes(data)
    return bytes(data)


def _png_header(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((1, 1), np.uint8)).save(buf, format="PNG")
    raw = bytearray(buf.getvalue())
    raw[16:24] = struct.pack(">II", width, height)  # IHDR width/height (CRC now wrong, as in a forged file)
    return bytes(raw)


CASES: dict[str, tuple[bytes, str, set[int]]] = {
    "not an image": (b"%PDF-1.4 this is a report", "application/dicom", {415}),
    "empty body": (b"", "application/dicom", {422}),
    "truncated dicom": (make_dicom(64, 64)[:700], "application/dicom", {422}),
    "dicom without pixel data": (make_dicom(with_pixels=False), "application/dicom", {422}),
    "multi-frame dicom": (make_dicom(32, 32, frames=3), "application/dicom", {422}),
    "unsupported photometric": (make_dicom(32, 32, photometric="CMYK"), "application/dicom", {422}),
    "1x1 dicom header": (_header_only_dicom(1, 1), "application/dicom", {422}),
    "30000x30000 dicom header": (_header_only_dicom(30000, 30000), "application/dicom", {422}),
    "30000x30000 png header": (_png_header(30000, 30000), "image/png", {422}),
    "1x1 png": (_png_header(1, 1), "image/png", {422}),
    "truncated png": (make_png()[:60], "image/png", {422}),
    "wrong content-type json": (make_dicom(), "application/json", {415}),
    "wrong content-type text": (make_png(), "text/plain", {415}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_upload_gets_clear_4xx_json(onnx_client: TestClient, keys: dict[str, str], case: str) -> None:
    body, ctype, statuses = CASES[case]
    r = onnx_client.post(
        "/v1/detect", content=body, headers={"Authorization": f"Bearer {keys['pacs']}", "Content-Type": ctype}
    )
    assert r.status_code in statuses, f"{case}: {r.status_code} {r.text}"
    error = r.json()["error"]
    assert error["code"] and error["request_id"] == r.headers["X-Request-ID"]
    assert len(error["message"]) > 10


def test_png_sent_as_dicom_is_sniffed_by_content_and_served(
    onnx_client: TestClient, keys: dict[str, str]
) -> None:
    r = onnx_client.post(
        "/v1/detect",
        content=make_png(),
        headers={"Authorization": f"Bearer {keys['pacs']}", "Content-Type": "application/dicom"},
    )
    assert r.status_code == 200
    assert r.json()["image"] == {"width": 96, "height": 80}


def test_huge_body_is_refused_with_413_before_reading(onnx_client: TestClient, keys: dict[str, str]) -> None:
    limit = onnx_client.app.state.cxr.settings.max_body_bytes  # type: ignore[attr-defined]
    r = onnx_client.post(
        "/v1/detect",
        content=b"\0" * (limit + 1),
        headers={"Authorization": f"Bearer {keys['pacs']}", "Content-Type": "application/dicom"},
    )
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "payload_too_large"


@pytest.mark.parametrize(
    ("body", "ctype"),
    [
        (
            b'--xyz\r\nContent-Disposition: form-data; name="file"\r\n\r\nabc',
            "multipart/form-data; boundary=xyz",
        ),
        (b"garbage without boundary", "multipart/form-data"),
        (
            b'--b\r\nContent-Disposition: form-data; name="other"\r\n\r\nv\r\n--b--\r\n',
            "multipart/form-data; boundary=b",
        ),
    ],
    ids=["unterminated", "no-boundary", "no-file-field"],
)
def test_malformed_multipart_gets_400(
    onnx_client: TestClient, keys: dict[str, str], body: bytes, ctype: str
) -> None:
    r = onnx_client.post(
        "/v1/detect", content=body, headers={"Authorization": f"Bearer {keys['pacs']}", "Content-Type": ctype}
    )
    assert r.status_code in (400, 422), r.text
    assert "error" in r.json()


@pytest.mark.parametrize(
    ("body", "ctype", "status"),
    [
        (
            b"--b\r\nContent-Type: application/dicom\r\n\r\nnot dicom\r\n--b--\r\n",
            'multipart/related; type="application/dicom"; boundary=b',
            409,
        ),
        (b"no parts here", 'multipart/related; type="application/dicom"; boundary=b', 400),
        (b"--b\r\n", 'multipart/related; type="application/dicom"', 400),
        (make_dicom(), "application/dicom", 415),
        (
            b"--b\r\nContent-Type: image/png\r\n\r\n" + make_png() + b"\r\n--b--\r\n",
            'multipart/related; type="application/dicom"; boundary=b',
            415,
        ),
        (
            b"--b\r\nContent-Type: application/dicom\r\n\r\nxx",
            'multipart/related; type="application/dicom+xml"; boundary=b',
            415,
        ),
    ],
    ids=["part-not-dicom", "no-parts", "no-boundary", "not-multipart", "png-part", "xml-type"],
)
def test_malformed_stow_gets_4xx(
    onnx_client: TestClient, keys: dict[str, str], body: bytes, ctype: str, status: int
) -> None:
    r = onnx_client.post(
        "/dicomweb/studies",
        content=body,
        headers={"Authorization": f"Bearer {keys['pacs']}", "Content-Type": ctype},
    )
    assert r.status_code == status, r.text


def test_stow_into_a_study_checks_its_uid_and_refuses_instances_without_one(
    onnx_client: TestClient, keys: dict[str, str]
) -> None:
    """The path's UID becomes the study's worklist key: a bad one is a 400, and an instance naming
    no study is not taken as one of it (C122), while one of the study is stored."""
    import pydicom
    from pydicom.uid import generate_uid

    from tests.unit.serving.serving_support import stow_body

    headers = {"Authorization": f"Bearer {keys['pacs']}"}
    body, ctype = stow_body(make_dicom(seed=12))
    r = onnx_client.post(
        "/dicomweb/studies/" + "9" * 200, content=body, headers={**headers, "Content-Type": ctype}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request", r.text
    study = generate_uid()
    ds = pydicom.dcmread(io.BytesIO(make_dicom(seed=13, study_uid=study)))
    del ds.StudyInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    body, ctype = stow_body(buf.getvalue(), make_dicom(seed=14, study_uid=study))
    headers["Content-Type"] = ctype
    r = onnx_client.post(f"/dicomweb/studies/{study}", content=body, headers=headers)
    assert r.status_code == 202, r.text
    [failed] = r.json()["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [0xC122]
    assert len(r.json()["00081199"]["Value"]) == 1


def test_a_stow_part_holding_a_png_fails_alone_and_stores_no_result(
    onnx_client: TestClient, keys: dict[str, str]
) -> None:
    """The detector reads PNG (for /v1/detect); a STOW-RS instance must be DICOM (C000, nothing stored)."""
    from tests.unit.serving.serving_support import stow_body

    body, ctype = stow_body(make_png(), make_dicom(seed=15))
    headers = {"Authorization": f"Bearer {keys['pacs']}", "Content-Type": ctype}
    r = onnx_client.post("/dicomweb/studies", content=body, headers=headers)
    assert r.status_code == 202, r.text
    [failed] = r.json()["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [0xC000]
    [stored] = r.json()["00081199"]["Value"]
    assert stored["00081190"]["Value"][0].endswith("/sr")


def test_a_compressed_body_is_refused_naming_its_encoding(
    onnx_client: TestClient, keys: dict[str, str]
) -> None:
    """It was read as the image and refused as unrecognised content, which said nothing of gzip."""
    import gzip

    r = onnx_client.post(
        "/v1/detect",
        content=gzip.compress(make_dicom()),
        headers={
            "Authorization": f"Bearer {keys['pacs']}",
            "Content-Type": "application/dicom",
            "Content-Encoding": "gzip",
        },
    )
    assert r.status_code == 415, r.text
    assert "Content-Encoding 'gzip'" in r.json()["error"]["message"]


def test_bad_query_parameters_get_422_json(onnx_client: TestClient, keys: dict[str, str]) -> None:
    r = onnx_client.post(
        "/v1/detect?conf=7",
        content=make_dicom(),
        headers={"Authorization": f"Bearer {keys['pacs']}", "Content-Type": "application/dicom"},
    )
    assert r.status_code == 422
    assert "conf" in r.json()["error"]["message"]


def test_sr_of_a_png_result_is_409(onnx_client: TestClient, keys: dict[str, str]) -> None:
    h = {"Authorization": f"Bearer {keys['pacs']}"}
    r = onnx_client.post("/v1/detect", content=make_png(), headers={**h, "Content-Type": "image/png"})
    assert r.status_code == 200
    sr = onnx_client.get(f"/v1/results/{r.json()['request_id']}/sr", headers=h)
    assert sr.status_code == 409
    assert onnx_client.get("/v1/results/does-not-exist", headers=h).status_code == 404


def test_gateway_still_serves_after_all_bad_inputs(onnx_client: TestClient, keys: dict[str, str]) -> None:
    r = onnx_client.post(
        "/v1/detect",
        content=make_dicom(seed=11),
        headers={"Authorization": f"Bearer {keys['pacs']}", "Content-Type": "application/dicom"},
    )
    assert r.status_code == 200

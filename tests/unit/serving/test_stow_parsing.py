"""STOW-RS multipart/related parsing and the Store Instances response dataset."""

from __future__ import annotations

import pydicom
import pytest
from fastapi.testclient import TestClient

from serving.dicom.stow import StowOutcome, split_related, stow_response, stow_status
from serving.errors import InvalidRequest, UnsupportedMediaType

pytestmark = pytest.mark.unit

CT = 'multipart/related; type="application/dicom"; boundary=XyZ'


def _body(*parts: bytes, ctype: str = "application/dicom") -> bytes:
    out = b""
    for p in parts:
        out += b"--XyZ\r\nContent-Type: " + ctype.encode() + b"\r\n\r\n" + p + b"\r\n"
    return out + b"--XyZ--\r\n"


def test_binary_parts_come_back_byte_for_byte() -> None:
    parts = [bytes(range(256)) * 10 + b"\r\n--X", b"\r\n\r\nsecond"]
    assert split_related(CT, _body(*parts)) == parts


@pytest.mark.parametrize(
    ("ctype", "body", "error"),
    [
        ("application/dicom", _body(b"x"), UnsupportedMediaType),
        ('multipart/related; type="application/dicom"', _body(b"x"), InvalidRequest),
        (CT, b"no boundary in here", InvalidRequest),
        (CT, _body(b"x", ctype="text/plain"), UnsupportedMediaType),
        ('multipart/related; type="application/dicom+json"; boundary=XyZ', _body(b"x"), UnsupportedMediaType),
    ],
)
def test_malformed_requests_raise_typed_errors(ctype: str, body: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        split_related(ctype, body)


def test_response_lists_stored_and_failed_instances_with_status() -> None:
    ok = StowOutcome("1.2.840.10008.5.1.4.1.1.1.1", "1.2.3", retrieve_url="http://gw/v1/results/a/sr")
    bad = StowOutcome("1.2.840.10008.5.1.4.1.1.1.1", "1.2.4", failure_reason=0xC000)
    ds = pydicom.Dataset.from_json(stow_response([ok, bad], "http://gw/dicomweb/studies/9"))
    assert ds.ReferencedSOPSequence[0].RetrieveURL == "http://gw/v1/results/a/sr"
    assert ds.FailedSOPSequence[0].FailureReason == 0xC000
    assert (stow_status([ok]), stow_status([ok, bad]), stow_status([bad])) == (200, 202, 409)


@pytest.mark.parametrize(
    ("ctype", "body", "match"),
    [
        (
            f'multipart/related; type="application/dicom"; boundary={"B" * 300}',
            b"--" + b"B" * 300,
            "Boundary",
        ),
        (CT, _body(b"x")[: -len(b"--XyZ--\r\n")], "closing boundary"),
        (CT, _body(b"x")[:-12], "closing boundary"),
    ],
    ids=["boundary-over-256-bytes", "no-closing-boundary", "cut-inside-the-part"],
)
def test_a_body_the_multipart_parser_cannot_finish_is_a_400(ctype: str, body: bytes, match: str) -> None:
    """A long boundary raised python-multipart's FormParserError (a 500); a body cut short came back as
    its parts less the bytes held back for a boundary, each failed as a DICOM the server cannot understand."""
    with pytest.raises(InvalidRequest, match=match):
        split_related(ctype, body)


def test_a_closing_boundary_without_its_final_crlf_ends_the_body() -> None:
    assert split_related(CT, _body(b"x")[:-2]) == [b"x"]


def test_the_gateway_answers_an_over_long_boundary_with_a_400_problem(
    onnx_client: TestClient, keys: dict[str, str]
) -> None:
    ctype = f'multipart/related; type="application/dicom"; boundary={"B" * 300}'
    r = onnx_client.post(
        "/dicomweb/studies",
        content=b"--" + b"B" * 300 + b"\r\n\r\nx\r\n--" + b"B" * 300 + b"--\r\n",
        headers={"Authorization": f"Bearer {keys['pacs']}", "Content-Type": ctype},
    )
    assert r.status_code == 400, r.text
    assert "Boundary" in r.json()["error"]["message"]


def test_a_503_answers_only_once_every_instance_of_the_request_has_finished() -> None:
    """A stage refusing one instance (503) must not answer before the request's other instances end:
    one stored after the answer was on no audit line (``on_stored`` came after the line was written)."""
    import asyncio
    from types import SimpleNamespace

    from serving.dicom.stow import StowService
    from serving.errors import Overloaded
    from serving.inference.cpu_pool import CpuPool
    from tests.unit.serving.serving_support import make_dicom

    first, second = make_dicom(seed=1), make_dicom(seed=2)

    class Detector:
        async def detect(self, payloads: list[bytes], **_: object) -> list[object]:
            if payloads[0] == first:
                raise Overloaded("stage busy", retry_after_s=1)
            await asyncio.sleep(0.2)  # still analysing when its sibling is refused
            return [SimpleNamespace(record=SimpleNamespace(request_id="r2"), outcome=None)]

    stored: list[str] = []
    cpu = CpuPool(2)
    service = StowService(Detector(), cpu)  # type: ignore[arg-type]

    async def run() -> None:
        with pytest.raises(Overloaded):
            await service.store(
                [first, second],
                study=None,
                tenant="t",
                base_url="http://x",
                on_stored=lambda reply: stored.append(reply.record.request_id),
            )
        assert stored == ["r2"], "the answer went before the other instance was stored"

    try:
        asyncio.run(run())
    finally:
        cpu.close()

"""The DICOMweb pull against a PACS that misbehaves: a real HTTP server on 127.0.0.1 plays it.

QIDO-RS went through dicomweb-client's requests session: it followed a redirect to any host with
the PACS's auth headers, read an answer of any size, and timed out per read only; and one page
(limit 4 x CXR_PACS_MAX_STUDY_INSTANCES) was taken for the whole study, so a study that also holds
our own SRs and presentation states from earlier analyses was analysed without some of its images.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from serving.config import ServingSettings
from serving.errors import PacsUnavailable, PayloadTooLarge
from serving.pacs.pull import PacsPull, RemoteInstance

pytestmark = pytest.mark.unit

CR = "1.2.840.10008.5.1.4.1.1.1"
GSPS = "1.2.840.10008.5.1.4.1.1.11.1"
STUDY = "1.2.3"
ONE = RemoteInstance("1.2.3.4", "1.2.3.4.5", CR)
Handler = Callable[[BaseHTTPRequestHandler], None]


@contextmanager
def _server(handle: Handler) -> Iterator[tuple[str, list[str]]]:
    """An HTTP server answering every GET with ``handle``; yields its URL and the paths it was asked."""
    asked: list[str] = []

    class _Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            asked.append(self.path)
            with suppress(OSError):  # the client hung up, as it should on a refused answer
                handle(self)

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", asked
    finally:
        server.shutdown()
        server.server_close()


def _answer(h: BaseHTTPRequestHandler, body: bytes, ctype: str = "application/dicom+json") -> None:
    h.send_response(200)
    h.send_header("Content-Type", ctype)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


def _entry(sop: str, sop_class: str = CR, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "0020000E": {"vr": "UI", "Value": ["1.2.3.4"]},
        "00080018": {"vr": "UI", "Value": [sop]},
        "00080016": {"vr": "UI", "Value": [sop_class]},
        **(extra or {}),
    }


def _pull(url: str, **settings: Any) -> PacsPull:
    return PacsPull(ServingSettings(pacs_dicomweb_url=url, **{"request_timeout_s": 2.0, **settings}))


def test_a_redirect_is_not_followed_off_the_configured_pacs_with_its_credentials() -> None:
    with _server(lambda h: _answer(h, json.dumps([_entry("1.2.3.4.5")]).encode())) as (elsewhere, reached):

        def redirect(h: BaseHTTPRequestHandler) -> None:
            h.send_response(307)
            h.send_header("Location", elsewhere + h.path)
            h.send_header("Content-Length", "0")
            h.end_headers()

        with _server(redirect) as (pacs, _):
            pull = _pull(pacs, pacs_dicomweb_headers={"X-Pacs-Token": "s3cret"})
            with pytest.raises(PacsUnavailable, match="redirect"):
                pull.instances(STUDY)
            with pytest.raises(PacsUnavailable, match="redirect"):
                pull.retrieve(STUDY, ONE)
    assert reached == []


@pytest.mark.parametrize("what", ["qido", "wado"])
def test_a_pacs_trickling_its_answer_is_cut_off_at_the_timeout_in_all(what: str) -> None:
    def trickle(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", 'multipart/related; type="application/dicom"; boundary=b')
        h.send_header("Content-Length", "100000")
        h.end_headers()
        for _ in range(60):  # a byte every 0.1 s: each read well inside the 0.5 s timeout, 6 s in all
            h.wfile.write(b"[")
            h.wfile.flush()
            time.sleep(0.1)

    with _server(trickle) as (pacs, _):
        pull = _pull(pacs, request_timeout_s=0.5)
        started = time.monotonic()
        with pytest.raises(PacsUnavailable) as raised:
            pull.instances(STUDY) if what == "qido" else pull.retrieve(STUDY, ONE)
        assert time.monotonic() - started < 2.0  # it took the whole 6 s: the timeout was per read
        assert "within 0.5 s" in raised.value.message


def test_every_qido_page_is_read_so_no_radiograph_of_the_study_is_left_out() -> None:
    # 4 x 4 = 16 per page; our own objects from earlier analyses listed first, as a PACS may
    listed = [_entry(f"1.2.9.{i}", GSPS) for i in range(14)] + [_entry(f"1.2.8.{i}") for i in range(3)]

    def paged(h: BaseHTTPRequestHandler) -> None:
        query = parse_qs(urlsplit(h.path).query)
        offset, limit = int(query.get("offset", ["0"])[0]), int(query["limit"][0])
        _answer(h, json.dumps(listed[offset : offset + limit]).encode())

    with _server(paged) as (pacs, _):
        found = _pull(pacs, pacs_max_study_instances=4).instances(STUDY)
    assert sorted(i.sop_uid for i in found) == ["1.2.8.0", "1.2.8.1", "1.2.8.2"]


def test_a_pacs_that_ignores_the_offset_is_refused_rather_than_half_a_study_analysed() -> None:
    page = [_entry(f"1.2.9.{i}", GSPS) for i in range(14)] + [_entry(f"1.2.8.{i}") for i in range(2)]
    with (
        _server(lambda h: _answer(h, json.dumps(page).encode())) as (pacs, _),
        pytest.raises(PacsUnavailable, match="whatever the offset"),
    ):
        _pull(pacs, pacs_max_study_instances=4).instances(STUDY)


def test_an_instance_listed_twice_is_fetched_once() -> None:
    twice = [_entry("1.2.8.1"), _entry("1.2.8.1")]
    with _server(lambda h: _answer(h, json.dumps(twice).encode())) as (pacs, _):
        assert [i.sop_uid for i in _pull(pacs).instances(STUDY)] == ["1.2.8.1"]


def test_an_oversized_qido_answer_is_refused_without_reading_it_whole() -> None:
    padding = {"00081030": {"vr": "LO", "Value": ["x" * (8 << 20)]}}  # 8 MiB: no instance's entry is
    answer = json.dumps([_entry("1.2.8.1", CR, padding)]).encode()
    with (
        _server(lambda h: _answer(h, answer)) as (pacs, _),
        pytest.raises(PayloadTooLarge, match="study query"),
    ):
        _pull(pacs, pacs_max_study_instances=4).instances(STUDY)


@pytest.mark.parametrize(
    ("ctype", "body"),
    [
        (
            'multipart/related; type="application/dicom"; boundary=told',
            b"--other\r\n\r\nDICM\r\n--other--\r\n",
        ),
        ("application/dicom", b"DICM"),
        (
            'multipart/related; type="application/dicom"; boundary=b',
            b"--b\r\n\r\n1\r\n--b\r\n\r\n2\r\n--b--\r\n",
        ),
    ],
    ids=["lying-boundary", "not-multipart", "two-parts"],
)
def test_a_broken_wado_answer_is_the_pacs_fault_not_the_callers(ctype: str, body: bytes) -> None:
    """A 502 naming the PACS: it was a 400/415 telling the caller its "STOW-RS request" was wrong."""
    with (
        _server(lambda h: _answer(h, body, ctype)) as (pacs, _),
        pytest.raises(PacsUnavailable, match="answered an instance"),
    ):
        _pull(pacs).retrieve(STUDY, ONE)


def test_credentials_in_the_pacs_url_never_reach_an_error_message() -> None:
    with _server(lambda h: None) as (pacs, _):
        port = urlsplit(pacs).port
    pull = _pull(f"http://cxr:hunter2@127.0.0.1:{port}/dicom-web")  # the server is gone: refused
    for call in (lambda: pull.instances(STUDY), lambda: pull.retrieve(STUDY, ONE)):
        with pytest.raises(PacsUnavailable) as raised:
            call()
        assert "hunter2" not in raised.value.message
        assert f"127.0.0.1:{port}/dicom-web" in raised.value.message


def test_a_pulled_instance_of_another_study_or_patient_is_never_analysed_into_the_study(
    onnx_model: Path, api_keys: tuple[Path, dict[str, str]], gitops_dir: Path, tmp_path: Path
) -> None:
    """The PACS's answers are checked, not trusted: the instance's own header names its study and patient."""
    import pydicom
    from fastapi.testclient import TestClient
    from pydicom.uid import generate_uid

    from serving.gateway.app import create_app
    from tests.unit.serving.serving_support import make_dicom, onnx_settings, stow_body

    study = generate_uid()
    own = make_dicom(seed=1, study_uid=study, patient_id="MRN-1")
    held = {
        "own": own,
        "other-study": make_dicom(seed=2, study_uid=generate_uid(), patient_id="MRN-1"),
        "other-patient": make_dicom(seed=3, study_uid=study, patient_id="MRN-2"),
    }
    uids = {name: str(pydicom.dcmread(BytesIO(data)).SOPInstanceUID) for name, data in held.items()}
    by_uid = {uids[name]: data for name, data in held.items()}
    dx = str(pydicom.dcmread(BytesIO(own)).SOPClassUID)

    def pacs(h: BaseHTTPRequestHandler) -> None:
        path = urlsplit(h.path).path
        if path.endswith("/instances"):
            _answer(h, json.dumps([_entry(uid, dx) for uid in uids.values()]).encode())
        else:
            body, ctype = stow_body(by_uid[path.rsplit("/", 1)[1]])
            _answer(h, body, ctype)

    with _server(pacs) as (url, _):
        settings = onnx_settings(
            onnx_model, api_keys[0], tmp_path, gitops_dir=gitops_dir, pacs_dicomweb_url=url
        )
        with TestClient(create_app(settings, use_store=False), raise_server_exceptions=False) as client:
            r = client.post(f"/v1/studies/{study}/analyze", headers={"X-API-Key": api_keys[1]["pacs"]})
    assert r.status_code == 200, r.text
    analysed = [res["image"].get("sop_instance_uid") for res in r.json()["results"]]
    assert uids["other-study"] not in analysed
    assert len(analysed) == 1 and r.json()["failed"] == 2  # one patient's image: whichever came first


def test_a_study_over_its_bytes_in_all_is_refused_before_it_is_held_whole() -> None:
    """Before, a pull held every instance (up to CXR_PACS_MAX_STUDY_INSTANCES x the body limit,
    4 GiB by default) before analysing any; now at most STUDY_BODIES x CXR_MAX_BODY_BYTES."""
    from serving.pacs.pull import STUDY_BODIES

    part = b"x" * 3500  # five of them pass 4 x 4096 bytes, each is within 4096
    body = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n--b--\r\n"
    listed = [_entry(f"1.2.8.{i}") for i in range(STUDY_BODIES + 2)]
    fetched: list[str] = []

    def pacs_answer(h: BaseHTTPRequestHandler) -> None:
        if "/instances/" in h.path:
            fetched.append(h.path)
            _answer(h, body, 'multipart/related; type="application/dicom"; boundary=b')
        else:
            _answer(h, json.dumps(listed).encode())

    with _server(pacs_answer) as (pacs, _):
        pull = _pull(pacs, max_body_bytes=4096)
        with pytest.raises(PayloadTooLarge, match="in all"):
            pull.fetch_study(STUDY)
    assert len(fetched) == STUDY_BODIES + 1  # stopped at the first instance past the bound

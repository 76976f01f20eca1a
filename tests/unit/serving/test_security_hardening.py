"""Issue 15, items 7 and 8: the audit log by default, no element values in logs, and the small holes.

Each test here failed before its fix: an audit file only with CXR_AUDIT_LOG and
never rotated, pydicom's warnings quoting UIDs and dates into the gateway log,
a feedback 413 naming CXR_MAX_BODY_BYTES, a STOW RetrieveURL built from the
Host header, no CSP/X-Frame-Options/nosniff, HTML built with innerHTML, a
32-image batch costing one token, and unlimited guesses at API keys.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import re
import uuid
import warnings
from pathlib import Path
from typing import Any

import pydicom
import pytest
from fastapi.testclient import TestClient
from httpx import Response
from pydicom.uid import generate_uid

from serving.config import ServingSettings
from serving.gateway.audit import AuditEntry, AuditLog, now_iso, uid_hash
from serving.gateway.routes.review import STATIC_DIR
from serving.limits import RateLimiter
from tests.unit.serving.serving_support import make_dicom, onnx_settings, stow_body, write_stage_files

pytestmark = pytest.mark.unit


def _settings(
    onnx_model: Path, api_keys: tuple[Path, dict[str, str]], tmp_path: Path, **extra: Any
) -> ServingSettings:
    write_stage_files(tmp_path / "gitops", production="1")
    settings: ServingSettings = onnx_settings(onnx_model, api_keys[0], tmp_path, **extra)
    return settings


def _audit(client: TestClient) -> list[dict[str, Any]]:
    path = client.app.state.cxr.audit.path  # type: ignore[attr-defined]
    return [json.loads(line) for line in path.read_text().splitlines()]


def _audited(client: TestClient, response: Response) -> dict[str, Any]:
    rid = response.headers["X-Request-ID"]
    return next(e for e in _audit(client) if e["request_id"] == rid)


# ------------------------------------------------------------------------------- audit log


def test_audit_log_is_on_by_default_under_the_stack_dir(
    onnx_model: Path, api_keys: tuple[Path, dict[str, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from serving.gateway.app import create_app

    monkeypatch.delenv("CXR_AUDIT_LOG", raising=False)
    settings = _settings(onnx_model, api_keys, tmp_path)
    assert settings.resolved_audit_log == tmp_path / "state" / "serving" / "audit.jsonl"
    assert (
        ServingSettings(audit_log=tmp_path / "elsewhere.jsonl").resolved_audit_log
        == tmp_path / "elsewhere.jsonl"
    )
    with TestClient(create_app(settings, use_store=False)) as client:
        r = client.get("/v1/models", headers={"X-API-Key": api_keys[1]["operator"]})
        assert r.status_code == 200
    lines = (tmp_path / "state" / "serving" / "audit.jsonl").read_text().splitlines()
    entry = json.loads(lines[-1])
    assert entry["route"] == "/v1/models" and entry["key_id"] == "operator-1" and entry["status"] == 200
    assert "result_id" in entry and "tenant" in entry


def test_audit_log_rotates_by_size_and_keeps_the_configured_backups(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "audit.jsonl"
    audit = AuditLog(path, max_bytes=2048, backups=2)
    for i in range(200):
        audit.write(AuditEntry(now_iso(), f"r{i}", "pacs-1", "pacs", "/v1/detect", "POST", 200))
    audit.close()
    files = sorted(p.name for p in path.parent.iterdir())
    assert files == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    for name in files:
        text = (path.parent / name).read_text()
        assert 0 < len(text.encode()) <= 2048 + 400
        assert all(json.loads(line)["route"] == "/v1/detect" for line in text.splitlines())
    assert json.loads(path.read_text().splitlines()[-1])["request_id"] == "r199"


class _FullDisk(io.StringIO):
    """A stream whose flush fails as a full disk's does (ENOSPC) until ``full`` is unset."""

    full = True

    def flush(self) -> None:
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")


def test_an_audit_line_the_disk_cannot_take_is_never_lost_silently(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """A full disk failed every audit write inside ``logging``'s handler, which printed a traceback
    (and the line) to stderr and returned: the gateway went on serving results with nothing audited,
    and no caller could know. The log now says it is failing (``available``, ``failed_writes``, one
    ``audit_write_failed`` line in the gateway's log, never the audit line itself), and says when it
    writes again."""
    audit = AuditLog(tmp_path / "audit.jsonl")
    audit.write(AuditEntry(now_iso(), "before", None, None, "/x", "GET", 200))
    assert audit.available and audit.failed_writes == 0
    handler = audit._handler
    assert isinstance(handler, logging.StreamHandler)
    disk = _FullDisk()
    working = handler.setStream(disk)  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, logger="cxr.audit"):
        for i in range(3):
            audit.write(AuditEntry(now_iso(), f"lost-{i}", "pacs-1", "pacs", "/v1/results/{x}", "GET", 200))
        assert not audit.available and audit.failed_writes == 3
        assert [r.getMessage() for r in caplog.records] == ["audit_write_failed error_type=OSError errno=28"]
        disk.full = False  # space freed
        handler.setStream(working)
        audit.write(AuditEntry(now_iso(), "after", None, None, "/x", "GET", 200))
    assert audit.available
    assert caplog.records[-1].getMessage() == "audit_write_recovered failed_writes=3"
    assert "lost-" not in capsys.readouterr().err
    audit.close()
    assert [json.loads(line)["request_id"] for line in audit.path.read_text().splitlines()][-1] == "after"


def test_the_gateway_counts_audit_lines_lost_for_its_alert(
    onnx_client: TestClient, keys: dict[str, str]
) -> None:
    """``cxr_gateway_audit_lines_lost_total`` (CxrAuditLinesLost) counts each access the file missed."""
    audit = onnx_client.app.state.cxr.audit  # type: ignore[attr-defined]
    handler = audit._handler
    lost = "cxr_gateway_audit_lines_lost_total "

    def count() -> float:
        text = onnx_client.get("/metrics").text
        return float(next(line for line in text.splitlines() if line.startswith(lost))[len(lost) :])

    before = count()
    disk = _FullDisk()
    working = handler.setStream(disk)
    try:
        onnx_client.get("/v1/models", headers={"Authorization": f"Bearer {keys['operator']}"})
        assert count() == before + 1  # the line of /v1/models
    finally:
        disk.full = False  # space freed (setStream flushes the stream it replaces)
        handler.setStream(working)
    onnx_client.get("/v1/models", headers={"Authorization": f"Bearer {keys['operator']}"})
    assert audit.available


def test_two_audit_logs_do_not_write_into_each_other_or_the_root_logger(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = AuditLog(tmp_path / "a.jsonl"), AuditLog(tmp_path / "b.jsonl")
    with caplog.at_level(logging.INFO):
        a.write(AuditEntry(now_iso(), "only-a", None, None, "/x", "GET", 200))
        b.write(AuditEntry(now_iso(), "only-b", None, None, "/x", "GET", 200))
    a.close()
    b.close()
    assert "only-b" not in (tmp_path / "a.jsonl").read_text()
    assert "only-a" not in (tmp_path / "b.jsonl").read_text()
    assert "only-a" not in caplog.text  # audit lines stay out of gateway.log


def test_every_access_to_a_result_is_audited_with_its_result_id(
    onnx_client: TestClient, keys: dict[str, str]
) -> None:
    pacs = {"Authorization": f"Bearer {keys['pacs']}"}
    radiologist = {"Authorization": f"Bearer {keys['radiologist']}"}
    made = onnx_client.post(
        "/v1/detect", content=make_dicom(seed=31), headers={**pacs, "Content-Type": "application/dicom"}
    )
    assert made.status_code == 200, made.text
    result_id = made.json()["request_id"]
    reads = [
        onnx_client.get(f"/v1/results/{result_id}", headers=pacs),
        onnx_client.get(f"/v1/results/{result_id}/sr", headers=pacs),
        onnx_client.get(f"/v1/results/{result_id}/preview.png", headers=radiologist),
        onnx_client.get(f"/v1/results/{result_id}/pixels", headers=radiologist),
        onnx_client.get("/v1/results/no-such-result", headers=pacs),
        onnx_client.post(
            "/v1/feedback",
            json={"request_id": result_id, "feedback_id": uuid.uuid4().hex, "no_finding": True},
            headers=radiologist,
        ),
    ]
    assert [r.status_code for r in reads][:4] == [200] * 4 and reads[4].status_code == 404
    assert reads[5].status_code in (200, 202), reads[5].text
    entries = [_audited(onnx_client, r) for r in reads]
    salt = onnx_client.app.state.cxr.secret  # type: ignore[attr-defined]
    probe = f"hashed:{uid_hash('no-such-result', salt)}"  # no server-made id: never in clear
    assert [e["result_id"] for e in entries] == [result_id] * 4 + [probe, result_id]
    assert entries[2]["key_id"] == "radiologist-1" and entries[5]["route"] == "/v1/feedback"
    assert entries[3]["route"] == "/v1/results/{request_id}/pixels"
    assert entries[3]["key_id"] == "radiologist-1"
    principal_tenant = getattr(onnx_client.app.state.cxr.keys.authenticate(keys["pacs"]), "tenant", None)  # type: ignore[attr-defined]
    assert all(e["tenant"] == principal_tenant for e in entries)


def test_an_id_from_outside_that_cannot_name_a_result_reaches_the_audit_line_only_as_a_keyed_hash(
    onnx_client: TestClient, keys: dict[str, str]
) -> None:
    """A client that puts a StudyInstanceUID, a patient's name or 5,000 characters where a result id
    goes (the path, a feedback body) gets its 404, audited, but the value never reaches the line in clear.

    Before: the audit line held ``result_id: "1.2.840..."`` (the UID in clear), ``"DOE^JOHN"``,
    and the whole 5,000-character path segment, on every refused attempt, also without a key.
    """
    pacs = {"X-API-Key": keys["pacs"]}
    uid, name, long = generate_uid(), "DOE^JOHN 1980", "a" * 5000
    refused = [
        onnx_client.get(f"/v1/results/{uid}", headers=pacs),
        onnx_client.get(f"/v1/results/{uid}/sr"),  # 401: audited with what it asked for
        onnx_client.get(f"/v1/results/{name}/pixels", headers={"X-API-Key": keys["radiologist"]}),
        onnx_client.get(f"/v1/results/{long}", headers=pacs),
        onnx_client.post(
            "/v1/feedback",
            json={"request_id": uid, "no_finding": True},
            headers={"X-API-Key": keys["radiologist"]},
        ),
    ]
    assert [r.status_code for r in refused] == [404, 401, 404, 404, 404]
    entries = [_audited(onnx_client, r) for r in refused]
    salt = onnx_client.app.state.cxr.secret  # type: ignore[attr-defined]
    expected = [f"hashed:{uid_hash(v, salt)}" for v in (uid, uid, name, long, uid)]
    assert [e["result_id"] for e in entries] == expected
    assert [e["status"] for e in entries] == [404, 401, 404, 404, 404]
    audit = onnx_client.app.state.cxr.audit.path.read_text()  # type: ignore[attr-defined]
    assert uid not in audit and "DOE^JOHN" not in audit and long not in audit


def test_a_patient_id_or_accession_number_put_where_a_result_id_goes_is_never_audited_in_clear(
    onnx_client: TestClient, keys: dict[str, str]
) -> None:
    """PatientIDs and accession numbers are mostly letters and digits: ``PAT0012345`` passed the
    "could name a result" test (1-64 of ``[A-Za-z0-9_-]``) and was written in clear on the refused
    attempt of an integration that put it where a result id goes. Only the server's own form (32
    lowercase hex, ``uuid4().hex``) can name a result; anything else is written as its keyed hash."""
    pacs = {"X-API-Key": keys["pacs"]}
    refused = [onnx_client.get(f"/v1/results/{value}", headers=pacs) for value in ("PAT0012345", "19800203")]
    assert [r.status_code for r in refused] == [404, 404]
    salt = onnx_client.app.state.cxr.secret  # type: ignore[attr-defined]
    entries = [_audited(onnx_client, r) for r in refused]
    assert [e["result_id"] for e in entries] == [
        f"hashed:{uid_hash(v, salt)}" for v in ("PAT0012345", "19800203")
    ]
    audit = onnx_client.app.state.cxr.audit.path.read_text()  # type: ignore[attr-defined]
    assert "PAT0012345" not in audit and "19800203" not in audit


def _study_hash(client: TestClient, uid: str) -> str | None:
    return uid_hash(uid, client.app.state.cxr.secret)  # type: ignore[attr-defined]


def test_a_batch_is_audited_naming_every_result_and_study_it_created(
    onnx_client: TestClient, keys: dict[str, str]
) -> None:
    studies = [generate_uid(), generate_uid()]
    files = [
        ("file", (f"{i}.dcm", make_dicom(seed=70 + i, study_uid=uid), "application/dicom"))
        for i, uid in enumerate(studies)
    ]
    r = onnx_client.post("/v1/detect/batch", files=files, headers={"X-API-Key": keys["pacs"]})
    assert r.status_code == 200, r.text
    made = [x["request_id"] for x in r.json()["results"]]
    entry = _audited(onnx_client, r)
    assert entry["route"] == "/v1/detect/batch" and len(made) == 2
    assert entry["result_ids"] == made and entry["result_id"] is None  # one id only when there is one
    assert entry["study_hashes"] == [_study_hash(onnx_client, uid) for uid in studies]
    assert r.headers["Cache-Control"] == "no-store"
    audit = onnx_client.app.state.cxr.audit.path.read_text()  # type: ignore[attr-defined]
    assert not any(uid in audit for uid in studies)


def test_a_stow_is_audited_naming_the_result_of_every_instance(
    onnx_client: TestClient, keys: dict[str, str]
) -> None:
    study = generate_uid()
    body, ctype = stow_body(make_dicom(seed=74, study_uid=study), make_dicom(seed=75, study_uid=study))
    r = onnx_client.post(
        "/dicomweb/studies?send_back=false",
        content=body,
        headers={"X-API-Key": keys["pacs"], "Content-Type": ctype},
    )
    assert r.status_code == 200, r.text
    made = re.findall(r"/v1/results/([0-9a-f]{32})/sr", r.text)  # each instance's RetrieveURL
    entry = _audited(onnx_client, r)
    assert len(made) == 2 and sorted(entry["result_ids"]) == sorted(made)
    assert entry["result_id"] is None
    assert entry["study_hashes"] == [_study_hash(onnx_client, study)] == [entry["study_hash"]]
    assert study not in onnx_client.app.state.cxr.audit.path.read_text()  # type: ignore[attr-defined]


def test_a_worklist_listing_is_audited_naming_its_results_and_study_hashes_never_a_uid(
    onnx_client: TestClient, keys: dict[str, str]
) -> None:
    study = generate_uid()
    made = onnx_client.post(
        "/v1/detect",
        content=make_dicom(seed=76, study_uid=study),
        headers={"X-API-Key": keys["pacs"], "Content-Type": "application/dicom"},
    )
    assert made.status_code == 200, made.text
    r = onnx_client.get("/v1/worklist?limit=500", headers={"X-API-Key": keys["radiologist"]})
    assert r.status_code == 200, r.text
    listed = r.json()["studies"]
    assert study in [s["study_uid"] for s in listed]
    entry = _audited(onnx_client, r)
    assert entry["route"] == "/v1/worklist"
    assert entry["result_ids"] == [rid for s in listed for rid in s["result_ids"]]
    assert made.json()["request_id"] in entry["result_ids"]
    assert entry["study_hashes"] == [_study_hash(onnx_client, s["study_uid"]) for s in listed]
    audit = onnx_client.app.state.cxr.audit.path.read_text()  # type: ignore[attr-defined]
    assert not any(s["study_uid"] in audit for s in listed)
    assert r.headers["Cache-Control"] == "no-store"


def test_identified_results_and_pixels_are_never_cached(
    onnx_client: TestClient, keys: dict[str, str]
) -> None:
    """A browser must keep no identified pixels on disk, nor serve them to the next key (no Vary on auth)."""
    pacs = {"X-API-Key": keys["pacs"]}
    radiologist = {"X-API-Key": keys["radiologist"]}
    made = onnx_client.post(
        "/v1/detect", content=make_dicom(seed=77), headers={**pacs, "Content-Type": "application/dicom"}
    )
    assert made.status_code == 200, made.text
    rid = made.json()["request_id"]
    answers = {
        "detect": made,
        "result": onnx_client.get(f"/v1/results/{rid}", headers=pacs),
        "sr": onnx_client.get(f"/v1/results/{rid}/sr", headers=pacs),
        "preview": onnx_client.get(f"/v1/results/{rid}/preview.png", headers=radiologist),
        "pixels": onnx_client.get(f"/v1/results/{rid}/pixels", headers=radiologist),
        "missing": onnx_client.get("/v1/results/no-such-result", headers=pacs),
    }
    assert [a.status_code for a in answers.values()] == [200] * 5 + [404]
    assert {name: a.headers.get("Cache-Control") for name, a in answers.items()} == dict.fromkeys(
        answers, "no-store"
    )
    assert "no-store" not in onnx_client.get("/").headers.get("Cache-Control", "")  # the page itself may be


def test_stack_status_names_the_audit_log_its_size_and_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stack.cli import audit_summary
    from stack.config import StackSettings

    monkeypatch.delenv("CXR_AUDIT_LOG", raising=False)
    settings = StackSettings(stack_dir=tmp_path)
    assert "not written yet" in audit_summary(settings)
    path = tmp_path.resolve() / "serving" / "audit.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text('{"a":1}\n' * 3)
    (path.parent / "audit.jsonl.1").write_text("{}\n")
    line = audit_summary(settings)
    assert str(path) in line and "3 lines" in line and "MB" in line and "+1 rotated" in line


# ------------------------------------------------------------------------------- no PHI in logs

SECRETS = ("SECRETNAME", "DEADBEEF", "SECRETUID", "20231399")


def _hostile_values_dicom() -> bytes:
    ds = pydicom.dcmread(io.BytesIO(make_dicom(seed=77)))
    with pydicom.config.disable_value_validation():
        ds.PatientName = "Doe^SECRETNAME"
        ds.StudyDate = "PHI-0xDEADBEEF"
        ds.SeriesDate = "20231399"
        ds.StudyInstanceUID = "1.2.SECRETUID"  # not a UID: pydicom says so, quoting it
        buf = io.BytesIO()
        ds.save_as(buf)
    return buf.getvalue()


def test_pydicom_never_writes_element_values_into_the_gateway_log(
    onnx_client: TestClient, keys: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    data = _hostile_values_dicom()
    pacs = {"Authorization": f"Bearer {keys['pacs']}"}
    with caplog.at_level(logging.DEBUG):
        onnx_client.post("/v1/detect", content=data, headers={**pacs, "Content-Type": "application/dicom"})
        onnx_client.post(
            "/v1/detect?format=sr", content=data, headers={**pacs, "Content-Type": "application/dicom"}
        )
        body, ctype = stow_body(data)
        onnx_client.post("/dicomweb/studies", content=body, headers={**pacs, "Content-Type": ctype})
    logged = caplog.text + "".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    for value in SECRETS:
        assert value not in logged, [r.getMessage() for r in caplog.records if value in r.getMessage()]


def test_the_filter_keeps_origin_and_category_and_drops_text_and_traceback(
    onnx_client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    """What an operator still sees: that pydicom warned, where, of what kind (the app installs the filter)."""
    text = warnings.formatwarning(
        "Invalid value for VR DA: 'PHI-0xDEADBEEF'", UserWarning, "/x/pydicom/valuerep.py", 440
    )
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("py.warnings").warning("%s", text)
        try:
            raise ValueError("Unable to convert 'SECRETNAME' to 'PN'")
        except ValueError:
            logging.getLogger("pydicom.pixels.utils").exception("failed on %s", "SECRETUID")
        logging.getLogger("pydicom").warning("Invalid value for VR UI: %r", "1.2.SECRETUID")
    messages = [r.getMessage() for r in caplog.records if r.name.startswith(("py.warnings", "pydicom"))]
    assert messages[0].startswith("pydicom warning suppressed (UserWarning at pydicom/valuerep.py:440;")
    assert messages[1].startswith("pydicom.pixels.utils error suppressed (ValueError")
    assert messages[2].startswith("pydicom warning suppressed (message")
    for value in SECRETS:
        assert value not in caplog.text


# ------------------------------------------------------------------------------- item 8


def test_feedback_413_names_the_feedback_limit(onnx_client: TestClient, keys: dict[str, str]) -> None:
    r = onnx_client.post(
        "/v1/feedback",
        content=b"{" + b" " * (1024 * 1024 + 1) + b"}",
        headers={"Authorization": f"Bearer {keys['radiologist']}", "Content-Type": "application/json"},
    )
    assert r.status_code == 413
    message = r.json()["error"]["message"]
    assert "CXR_MAX_FEEDBACK_BYTES" in message and "CXR_MAX_BODY_BYTES" not in message


def test_stow_retrieve_urls_never_echo_the_host_header(onnx_client: TestClient, keys: dict[str, str]) -> None:
    body, ctype = stow_body(make_dicom(seed=55))
    r = onnx_client.post(
        "/dicomweb/studies",
        content=body,
        headers={"Authorization": f"Bearer {keys['pacs']}", "Content-Type": ctype, "Host": "evil.example"},
    )
    assert r.status_code == 200, r.text
    urls = [item["00081190"]["Value"][0] for item in r.json()["00081199"]["Value"]]
    assert urls and all(u.startswith("http://testserver/v1/results/") for u in urls), urls
    assert "evil" not in r.text


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/dicomweb/studies/"), ("GET", "/v1/models/"), ("GET", "/healthz/"), ("POST", "/v1/detect/")],
)
def test_a_trailing_slash_is_a_json_404_not_a_redirect_to_the_host_header(
    onnx_client: TestClient, keys: dict[str, str], method: str, path: str
) -> None:
    """Starlette answered these with a 307 to the same path on the Host header's host, before any
    key was checked; a client that follows it goes elsewhere, and an empty study UID looked routed."""
    r = onnx_client.request(
        method,
        path,
        headers={"Authorization": f"Bearer {keys['pacs']}", "Host": "evil.example"},
        follow_redirects=False,
    )
    assert r.status_code == 404 and "location" not in r.headers
    assert r.json()["error"]["code"] == "not_found" and "evil" not in r.text


def test_page_static_files_and_api_answers_carry_the_security_headers(onnx_client: TestClient) -> None:
    for path in ("/", "/static/review.js", "/static/review.css", "/v1/models", "/healthz", "/nope"):
        headers = onnx_client.get(path).headers
        assert headers["X-Content-Type-Options"] == "nosniff", path
        assert headers["X-Frame-Options"] == "DENY", path
        csp = headers["Content-Security-Policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "object-src 'none'" in csp
    # Swagger UI runs FastAPI's inline start-up script, and still loads nothing from elsewhere
    docs = onnx_client.get("/docs")
    assert "'unsafe-inline'" in docs.headers["Content-Security-Policy"]
    assert "default-src 'self'" in docs.headers["Content-Security-Policy"]
    assert "'unsafe-inline'" not in onnx_client.get("/").headers["Content-Security-Policy"]
    assert not re.search(r"(src|href)=['\"]https?:", docs.text), "the docs page names an outside asset"
    assert onnx_client.get("/static-offline-docs/swagger-ui-bundle.js").status_code == 200
    # pages and their files may be kept but are revalidated (an upgrade's review.js is the next load's)
    for path in ("/", "/static/review.js", "/docs"):
        assert onnx_client.get(path).headers["Cache-Control"] == "no-cache", path
    assert onnx_client.get("/v1/models").headers["Cache-Control"] == "no-store"


def test_the_review_page_needs_no_inline_code_and_builds_no_html_from_data() -> None:
    html = (STATIC_DIR / "index.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)", html), "inline <script> is blocked by the CSP"
    assert "<style" not in html and not re.search(r"\sstyle=", html)
    assert not re.search(r"\son[a-z]+=", html), "inline event handlers are blocked by the CSP"
    js = (STATIC_DIR / "review.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write"):
        assert sink not in js, sink


def test_a_batch_costs_one_rate_limit_token_per_image(onnx_client: TestClient, keys: dict[str, str]) -> None:
    limiter = onnx_client.app.state.cxr.limiter  # type: ignore[attr-defined]
    saved = (limiter.rate, limiter.burst)
    h = {"Authorization": f"Bearer {keys['pacs']}"}

    def batch(n: int) -> Response:
        files = [("file", (f"{i}.dcm", make_dicom(seed=60 + i), "application/dicom")) for i in range(n)]
        return onnx_client.post("/v1/detect/batch", files=files, headers=h)

    limiter.rate, limiter.burst = 0.001, 3
    limiter._buckets.clear()
    try:
        assert batch(3).status_code == 200  # exactly the burst
        limiter._buckets.clear()
        refused = batch(4)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limited"
        assert int(refused.headers["Retry-After"]) >= 1
    finally:
        limiter.rate, limiter.burst = saved
        limiter._buckets.clear()


def test_bad_keys_past_the_auth_failure_burst_get_429_but_valid_keys_from_that_address_still_pass(
    onnx_model: Path, api_keys: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    """Behind the ingress every client shares one address: a stale key must not lock the valid ones out."""
    from serving.gateway.app import create_app

    # the default burst of 20; a slow refill so no token comes back while the test runs
    settings = _settings(onnx_model, api_keys, tmp_path, auth_fail_rate_per_s=0.01)
    with TestClient(create_app(settings, use_store=False), raise_server_exceptions=False) as client:
        answers = [client.get("/v1/models", headers={"X-API-Key": f"guess-{i}"}) for i in range(25)]
        statuses = [r.status_code for r in answers]
        assert statuses == [401] * 20 + [429] * 5, statuses
        limited = answers[-1]
        assert int(limited.headers["Retry-After"]) >= 1 and limited.json()["error"]["code"] == "rate_limited"
        assert "API key" in limited.json()["error"]["message"]

        operator = api_keys[1]["operator"]
        assert client.get("/v1/models", headers={"X-API-Key": operator}).status_code == 200
        bearer = client.get("/v1/models", headers={"Authorization": f"Bearer {operator}"})
        assert bearer.status_code == 200
        # a valid key is looked up and judged on its role, not refused by the failure bucket
        assert client.get("/v1/models", headers={"X-API-Key": api_keys[1]["pacs"]}).status_code == 403

        # the successes refilled nothing: bad and missing keys from that address are still refused
        again = client.get("/v1/models", headers={"X-API-Key": "guess-again"})
        assert again.status_code == 429 and int(again.headers["Retry-After"]) >= 1
        assert client.get("/v1/models").status_code == 429


def test_a_keys_file_naming_one_key_id_twice_is_refused_at_load(tmp_path: Path) -> None:
    """The key id is what the rate limit, the audit line and feedback's ``rad_id`` know a caller by.

    Before: a file with ``pacs-1`` in two tenants (each site's stack names its keys ``<role>-1``)
    loaded, and the two sites shared one rate-limit bucket: hospital-a's three requests left
    hospital-b's first one a 429 naming ``pacs-1``; their audit lines named one key for two keys.
    """
    from serving.gateway.auth import KeyStore, hash_key

    entries = [
        {"id": "pacs-1", "role": "pacs", "sha256": hash_key(f"key-{t}"), "tenant": f"hospital-{t}"}
        for t in "ab"
    ]
    path = tmp_path / "api_keys.json"
    path.write_text(json.dumps({"keys": entries}))
    with pytest.raises(ValueError, match="'pacs-1'"):
        KeyStore.from_file(path)
    entries[1]["id"] = "pacs-2"
    path.write_text(json.dumps({"keys": entries}))
    store = KeyStore.from_file(path)
    assert [store.authenticate(f"key-{t}").tenant for t in "ab"] == ["hospital-a", "hospital-b"]


def test_rate_limiter_forgets_refilled_buckets_past_its_size_bound() -> None:
    limiter = RateLimiter(rate=1000.0, burst=2, max_keys=10)
    for i in range(50):
        limiter.check(f"10.0.0.{i}")
    assert len(limiter._buckets) <= 10
    slow = RateLimiter(rate=0.0001, burst=2, max_keys=10)
    for i in range(50):
        slow.check(f"10.0.0.{i}")
    assert len(slow._buckets) <= 10  # none refills: the oldest go


def test_fastapis_own_telemetry_exports_nothing_whatever_the_environment_says(
    onnx_model: Path,
    api_keys: tuple[Path, dict[str, str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """FASTAPI_OTEL_AUTO_CONFIGURE=true with an OTLP endpoint off the machine: the gateway ignores it.

    Without the gateway's explicit setting, FastAPI's startup sets up OTLP exporters for that
    endpoint. Here the exporter package is absent, so FastAPI logs that the set-up failed and
    goes on (the assertion that fails without the setting); with the package installed, request
    spans and exception messages would leave the hospital's network.
    """
    from serving.gateway.app import create_app

    monkeypatch.setenv("FASTAPI_OTEL_AUTO_CONFIGURE", "true")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://203.0.113.9:4318")
    app = create_app(_settings(onnx_model, api_keys, tmp_path), use_store=False)
    with caplog.at_level(logging.WARNING), TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
    assert not [r for r in caplog.records if "telemetry" in r.getMessage().lower()]

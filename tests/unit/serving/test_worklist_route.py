"""Triage through the gateway: every response carries its image's score, studies reach GET /v1/worklist."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydicom.uid import generate_uid

from core.triage import shown_score
from serving.gateway.auth import hash_key
from tests.unit.serving.serving_support import make_dicom, make_png, onnx_settings, stow_body

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def gateway(
    onnx_model: Path, gitops_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[TestClient, dict[str, str]]]:
    """A gateway of its own (its worklist starts empty) with keys of two tenants."""
    from serving.gateway.app import create_app

    root = tmp_path_factory.mktemp("worklist")
    plain = {name: f"cxr_{name}_{uuid.uuid4().hex}" for name in ("a-pacs", "a-rad", "b-rad")}
    entries = [
        {"id": name, "role": name.split("-")[1].replace("rad", "radiologist"), "sha256": hash_key(key)}
        | {"tenant": f"hospital-{name[0]}"}
        for name, key in plain.items()
    ]
    (root / "keys.json").write_text(json.dumps({"keys": entries}))
    settings = onnx_settings(
        onnx_model, root / "keys.json", root, gitops_dir=gitops_dir, triage_threshold=0.5, worklist_hours=2
    )
    with TestClient(create_app(settings, use_store=False), raise_server_exceptions=False) as client:
        yield client, plain


def _detect(
    client: TestClient, key: str, data: bytes, query: str = "", kind: str = "dicom"
) -> dict[str, Any]:
    r = client.post(
        f"/v1/detect{query}",
        content=data,
        headers={"X-API-Key": key, "Content-Type": f"application/{kind}" if kind == "dicom" else "image/png"},
    )
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def _worklist(client: TestClient, key: str, query: str = "") -> Any:
    return client.get(f"/v1/worklist{query}", headers={"X-API-Key": key})


def test_every_response_carries_its_images_triage_and_keeps_the_contract_keys(
    gateway: tuple[TestClient, dict[str, str]],
) -> None:
    client, keys = gateway
    body = _detect(client, keys["a-pacs"], make_dicom(seed=3))
    assert {"request_id", "model", "image", "detections", "timings_ms"} <= set(body)
    triage = body["triage"]
    assert set(triage) == {"score", "priority"} and 0.0 <= triage["score"] <= 1.0
    assert triage["priority"] == (triage["score"] >= 0.5)
    best = max((d["confidence"] for d in body["detections"]), default=0.0)
    assert triage["score"] >= shown_score(best)  # cut to 4 decimals, as every shown score
    png = _detect(client, keys["a-pacs"], make_png(seed=3), kind="png")  # no study, still an image score
    assert set(png["triage"]) == {"score", "priority"}


def test_the_score_counts_boxes_the_threshold_drops(gateway: tuple[TestClient, dict[str, str]]) -> None:
    client, keys = gateway
    data = make_dicom(seed=4)
    low = _detect(client, keys["a-pacs"], data, "?conf=0.01")
    strict = _detect(client, keys["a-pacs"], data, "?conf=1.0")
    assert strict["detections"] == [] and low["detections"]
    assert strict["triage"]["score"] == low["triage"]["score"] > 0.0  # the threshold changes no score


def test_a_studys_images_merge_into_one_worklist_entry_with_the_max_score(
    gateway: tuple[TestClient, dict[str, str]],
) -> None:
    client, keys = gateway
    study = generate_uid()
    body, content_type = stow_body(make_dicom(seed=5, study_uid=study), make_dicom(seed=6, study_uid=study))
    r = client.post(
        f"/dicomweb/studies/{study}",
        content=body,
        headers={"X-API-Key": keys["a-pacs"], "Content-Type": content_type},
    )
    assert r.status_code == 200, r.text
    third = _detect(client, keys["a-pacs"], make_dicom(seed=7, study_uid=study))
    r = _worklist(client, keys["a-rad"])
    assert r.status_code == 200, r.text
    listing = r.json()
    assert listing["threshold"] == 0.5 and listing["hours"] == 2
    [entry] = [s for s in listing["studies"] if s["study_uid"] == study]
    assert entry["images"] == 3 and third["request_id"] in entry["result_ids"]
    assert set(entry) == {
        "study_uid",
        "score",
        "priority",
        "images",
        "result_ids",
        "model_version",
        "stage",
        "first_seen",
        "last_seen",
    }
    scores = [
        client.get(f"/v1/results/{rid}", headers={"X-API-Key": keys["a-rad"]}).json()
        for rid in entry["result_ids"]
    ]
    assert entry["score"] == pytest.approx(max(s["triage"]["score"] for s in scores), abs=1e-4)
    assert entry["priority"] == (entry["score"] >= 0.5)
    assert entry["stage"] == "production"


def test_worklist_orders_priority_first_then_oldest_and_is_scoped_to_the_tenant(
    gateway: tuple[TestClient, dict[str, str]],
) -> None:
    client, keys = gateway
    worklist = client.app.state.cxr.worklist  # type: ignore[attr-defined]
    now = datetime.now(UTC)
    worklist.record(
        "hospital-b", "b-normal", ["r1"], [0.2], "1", "production", 0.5, now=now - timedelta(hours=1)
    )
    worklist.record("hospital-b", "b-urgent", ["r2"], [0.7], "1", "production", 0.5, now=now)
    worklist.record(
        "hospital-b", "b-stale", ["r3"], [0.9], "1", "production", 0.5, now=now - timedelta(hours=3)
    )
    listing = _worklist(client, keys["b-rad"]).json()
    assert [s["study_uid"] for s in listing["studies"]] == ["b-urgent", "b-normal"]  # b-stale: outside 2 h
    wide = _worklist(client, keys["b-rad"], "?hours=4&limit=2").json()
    assert [s["study_uid"] for s in wide["studies"]] == ["b-stale", "b-urgent"] and wide["hours"] == 4
    assert not {s["study_uid"] for s in _worklist(client, keys["a-rad"]).json()["studies"]} & {
        "b-normal",
        "b-urgent",
    }


def test_worklist_needs_a_radiologist_and_bounds_its_window(
    gateway: tuple[TestClient, dict[str, str]],
) -> None:
    client, keys = gateway
    assert _worklist(client, keys["a-pacs"]).status_code == 403
    assert client.get("/v1/worklist").status_code == 401
    for query in ("?hours=0", "?hours=100000", "?limit=0", "?limit=100000"):
        r = _worklist(client, keys["a-rad"], query)
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", query


def test_an_image_of_another_patient_under_a_known_study_uid_is_refused_not_merged(
    gateway: tuple[TestClient, dict[str, str]],
) -> None:
    """A reused StudyInstanceUID (a modality bug, a forged instance) must not cross patients.

    Merged, Bob's findings would join Alice's worklist row, raise her triage score and go into
    the one SR the PACS send-back builds from that row's results.
    """
    client, keys = gateway
    study = generate_uid()
    alice = _detect(client, keys["a-pacs"], make_dicom(seed=8, study_uid=study, patient_id="ALICE-1"))
    headers = {"X-API-Key": keys["a-pacs"], "Content-Type": "application/dicom"}
    bob = make_dicom(seed=9, study_uid=study, patient_id="BOB-2")
    r = client.post("/v1/detect", content=bob, headers=headers)
    assert r.status_code == 409, r.text
    error = r.json()["error"]
    assert error["code"] == "study_patient_mismatch"
    assert "BOB" not in r.text and "ALICE" not in r.text and study not in r.text
    # by STOW-RS too: the instance fails alone, the PACS is told
    body, content_type = stow_body(bob)
    r = client.post(
        f"/dicomweb/studies/{study}", content=body, headers={**headers, "Content-Type": content_type}
    )
    assert r.status_code == 409, r.text
    [entry] = [s for s in _worklist(client, keys["a-rad"]).json()["studies"] if s["study_uid"] == study]
    assert entry["result_ids"] == [alice["request_id"]]
    # the same patient's next image still merges
    again = _detect(client, keys["a-pacs"], make_dicom(seed=10, study_uid=study, patient_id="ALICE-1"))
    [entry] = [s for s in _worklist(client, keys["a-rad"]).json()["studies"] if s["study_uid"] == study]
    assert entry["result_ids"] == [alice["request_id"], again["request_id"]]


def test_one_patient_id_of_two_issuers_under_one_study_uid_is_two_patients(
    gateway: tuple[TestClient, dict[str, str]],
) -> None:
    """PatientID 1234 of hospital A and of hospital B are two patients: before, the key was the
    PatientID alone, and B's image under A's reused study UID joined A's row and SR."""
    import io

    import pydicom

    def issued(seed: int, study: str, issuer: str) -> bytes:
        ds = pydicom.dcmread(io.BytesIO(make_dicom(seed=seed, study_uid=study, patient_id="1234")))
        if issuer:
            ds.IssuerOfPatientID = issuer
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        return out.getvalue()

    client, keys = gateway
    study = generate_uid()
    first = _detect(client, keys["a-pacs"], issued(13, study, "HOSPITAL-A"))
    headers = {"X-API-Key": keys["a-pacs"], "Content-Type": "application/dicom"}
    r = client.post("/v1/detect", content=issued(14, study, "HOSPITAL-B"), headers=headers)
    assert r.status_code == 409 and r.json()["error"]["code"] == "study_patient_mismatch", r.text
    again = _detect(client, keys["a-pacs"], issued(15, study, "HOSPITAL-A"))  # the same patient merges
    [entry] = [s for s in _worklist(client, keys["a-rad"]).json()["studies"] if s["study_uid"] == study]
    assert entry["result_ids"] == [first["request_id"], again["request_id"]]


def test_two_patients_under_one_new_study_uid_in_one_request_are_refused(
    gateway: tuple[TestClient, dict[str, str]],
) -> None:
    client, keys = gateway
    study = generate_uid()
    dcm = "application/dicom"
    alice = make_dicom(seed=11, study_uid=study, patient_id="ALICE")
    bob = make_dicom(seed=12, study_uid=study, patient_id="BOB")
    r = client.post(
        "/v1/detect/batch",
        files=[("file", ("a.dcm", alice, dcm)), ("file", ("b.dcm", bob, dcm))],
        headers={"X-API-Key": keys["a-pacs"]},
    )
    assert r.status_code == 409, r.text
    assert r.json()["error"]["code"] == "study_patient_mismatch"
    assert all(s["study_uid"] != study for s in _worklist(client, keys["a-rad"]).json()["studies"])


def test_a_worklist_database_that_is_down_fails_the_listing_with_503_not_the_detection(
    onnx_model: Path, gitops_dir: Path, tmp_path: Path
) -> None:
    """The cluster's worklist is PostgreSQL (CXR_WORKLIST_URL): down, a detection still answers (its
    results are stored) and the listing says what is wrong, in bounded time, naming no password."""
    import time

    from serving.gateway.app import create_app

    keys = {"pacs": f"cxr_p_{uuid.uuid4().hex}", "rad": f"cxr_r_{uuid.uuid4().hex}"}
    (tmp_path / "keys.json").write_text(
        json.dumps(
            {
                "keys": [
                    {"id": "p", "role": "pacs", "sha256": hash_key(keys["pacs"])},
                    {"id": "r", "role": "radiologist", "sha256": hash_key(keys["rad"])},
                ]
            }
        )
    )
    settings = onnx_settings(
        onnx_model,
        tmp_path / "keys.json",
        tmp_path,
        gitops_dir=gitops_dir,
        worklist_url="postgresql://cxr:s3cret-pw@127.0.0.1:1/worklist",
        worklist_timeout_s=1,
    )
    with TestClient(create_app(settings, use_store=False), raise_server_exceptions=False) as client:
        started = time.monotonic()
        body = _detect(client, keys["pacs"], make_dicom(seed=8, study_uid=generate_uid()))
        assert body["detections"] is not None and "triage" in body
        r = _worklist(client, keys["rad"])
        took = time.monotonic() - started
    assert r.status_code == 503 and r.json()["error"]["code"] == "worklist_unavailable", r.text
    assert "s3cret-pw" not in r.text
    assert took < 5  # one wait of 1 s for the database, then failing fast: not one wait per call

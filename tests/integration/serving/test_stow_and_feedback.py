"""STOW-RS through dicomweb-client against a live gateway; feedback survives the store going down."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from fastapi.testclient import TestClient

from serving.gateway.app import create_app
from tests.fixtures.servers import free_port
from tests.unit.serving.serving_support import LiveServer, make_dicom

pytestmark = pytest.mark.integration


def _wait_for(predicate: Any, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_stow_rs_via_dicomweb_client_detects_each_instance_and_links_its_sr(
    gateway_settings: Any, serving_keys: tuple[Path, dict[str, str]]
) -> None:
    from dicomweb_client.api import DICOMwebClient

    app = create_app(gateway_settings, use_store=False)
    study = pydicom.uid.generate_uid()
    datasets = [pydicom.dcmread(io.BytesIO(make_dicom(100, 90, seed=i, study_uid=study))) for i in range(2)]
    with LiveServer(app, free_port()) as server:
        client = DICOMwebClient(
            url=f"{server.url}/dicomweb", headers={"Authorization": f"Bearer {serving_keys[1]['pacs']}"}
        )
        response = client.store_instances(datasets)
        refs = response.ReferencedSOPSequence
        assert {r.ReferencedSOPInstanceUID for r in refs} == {ds.SOPInstanceUID for ds in datasets}
        assert "FailedSOPSequence" not in response
        import httpx

        for ref in refs:
            assert ref.RetrieveURL.startswith(f"{server.url}/v1/results/"), ref.RetrieveURL
            sr = httpx.get(ref.RetrieveURL, headers={"Authorization": f"Bearer {serving_keys[1]['pacs']}"})
            assert sr.status_code == 200
            report = pydicom.dcmread(io.BytesIO(sr.content))
            evidence = report.CurrentRequestedProcedureEvidenceSequence[0]
            sops = {
                s.ReferencedSOPInstanceUID for s in evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence
            }
            assert ref.ReferencedSOPInstanceUID in sops


def test_feedback_is_spooled_while_the_store_is_down_and_delivered_when_it_returns(
    gateway_settings: Any, s3_store_factory: Any, serving_keys: tuple[Path, dict[str, str]]
) -> None:
    server = s3_store_factory()
    store = server.store()
    app = create_app(gateway_settings, store=store)
    keys = serving_keys[1]
    source = make_dicom(120, 100, seed=21)
    with TestClient(app) as client:
        r = client.post(
            "/v1/detect",
            content=source,
            headers={"Authorization": f"Bearer {keys['pacs']}", "Content-Type": "application/dicom"},
        )
        assert r.status_code == 200
        result = r.json()
        assert len(result["detections"]) >= 2
        server.stop()
        feedback = {
            "request_id": result["request_id"],
            "feedback_id": "fb-spool-test",
            "reviews": [
                {"index": 0, "action": "reject"},
                {"index": 1, "action": "adjust", "box": [10, 10, 40, 50]},
            ],
            "new_boxes": [{"class_id": 3, "box": [20, 30, 90, 80]}],
            "comment": "moved one box",
        }
        h = {"Authorization": f"Bearer {keys['radiologist']}"}
        spooled = client.post("/v1/feedback", json=feedback, headers=h)
        assert spooled.status_code == 202, spooled.text
        assert spooled.json()["status"] == "spooled"
        item = f"feedback/{spooled.json()['feedback_id']}"  # made by the server, not the client's id
        again = client.post("/v1/feedback", json=feedback, headers=h)
        assert again.json()["status"] == "duplicate"
        assert "cxr_feedback_spool_depth 1.0" in client.get("/metrics").text

        server.start()
        assert _wait_for(lambda: store.exists(f"{item}/feedback.json"))
        assert _wait_for(lambda: "cxr_feedback_spool_depth 0.0" in client.get("/metrics").text)

    names = store.list_prefix(f"{item}/")
    csv_rows = list(csv.DictReader(io.StringIO(store.get_bytes(f"{item}/annotations.csv").decode())))
    expected = len(result["detections"]) - 1 + 1  # one rejected, one adjusted (kept), one new
    assert len(csv_rows) == expected
    assert {row["rad_id"] for row in csv_rows} == {"radiologist-1"}
    assert ["10.0", "10.0", "40.0", "50.0"] in [
        [r["x_min"], r["y_min"], r["x_max"], r["y_max"]] for r in csv_rows
    ]
    image_name = next(n for n in names if n.endswith(".dcm"))
    deid = pydicom.dcmread(io.BytesIO(store.get_bytes(image_name)))
    original = pydicom.dcmread(io.BytesIO(source))
    assert deid.PatientIdentityRemoved == "YES"
    assert str(deid.PatientName) != str(original.PatientName)
    assert deid.PatientID != original.PatientID
    assert deid.StudyInstanceUID != original.StudyInstanceUID
    assert deid.SOPInstanceUID != original.SOPInstanceUID
    meta = json.loads(store.get_bytes(f"{item}/feedback.json"))
    assert "request_id" not in meta and meta["rad_id"] == "radiologist-1"  # no link to the identified source
    assert all(row["image_id"] == meta["image_id"] for row in csv_rows)

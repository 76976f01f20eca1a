"""The gateway in front of a real tritonserver and a real S3 store."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
from fastapi.testclient import TestClient

from serving.gateway.app import create_app
from serving.inference.triton_repo import TritonAdmin
from tests.unit.serving.serving_support import make_dicom, make_png

pytestmark = pytest.mark.integration


def _wait_for(predicate: Any, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_detect_through_triton_returns_boxes_in_original_pixels_and_stores_the_result(
    gateway_settings: Any, s3_store: Any, serving_keys: tuple[Path, dict[str, str]]
) -> None:
    store = s3_store.store()
    app = create_app(gateway_settings, store=store)
    h = {"Authorization": f"Bearer {serving_keys[1]['pacs']}"}
    source = make_dicom(300, 200, seed=3)
    with TestClient(app) as client:
        assert client.get("/readyz").status_code == 200
        r = client.post("/v1/detect", files={"file": ("x.dcm", source, "application/dicom")}, headers=h)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == {
            "name": "cxr-detector",
            "version": "7",
            "stage": "production",
            "variant": "fp32",
        }
        assert body["image"]["width"] == 300 and body["image"]["height"] == 200
        assert body["detections"], "the test model yields boxes at this threshold"
        for det in body["detections"]:
            x0, y0, x1, y1 = det["box"]
            assert 0 <= x0 < x1 <= 300 and 0 <= y0 < y1 <= 200
        assert set(body["timings_ms"]) >= {"decode", "preprocess", "infer", "postprocess", "total"}
        rid = body["request_id"]
        assert _wait_for(lambda: store.exists(f"results/{rid}/result.json"))

        sr_resp = client.get(f"/v1/results/{rid}/sr", headers=h)
        assert sr_resp.status_code == 200
        sr = hd.sr.srread(io.BytesIO(sr_resp.content))
        src = pydicom.dcmread(io.BytesIO(source))
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
        assert evidence.StudyInstanceUID == src.StudyInstanceUID
        ref = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        assert ref.ReferencedSOPInstanceUID == src.SOPInstanceUID
        assert sr.StudyInstanceUID == src.StudyInstanceUID
        groups = sr.content.get_planar_roi_measurement_groups()
        assert len(groups) == len(body["detections"])
        metrics = client.get("/metrics").text
        assert 'cxr_images_processed_total{model_version="7",stage="production"}' in metrics


def test_batch_larger_than_max_batch_size_is_chunked_to_triton(
    gateway_settings: Any, serving_keys: tuple[Path, dict[str, str]]
) -> None:
    app = create_app(gateway_settings, use_store=False)
    h = {"Authorization": f"Bearer {serving_keys[1]['pacs']}"}
    files = [("file", (f"{i}.png", make_png(120, 100, seed=i), "image/png")) for i in range(11)]
    with TestClient(app) as client:
        r = client.post("/v1/detect/batch", files=files, headers=h)
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert len(results) == 11  # more than the model's max_batch_size of 8: sent in chunks
        assert len({res["request_id"] for res in results}) == 11


def test_unloaded_model_gives_503_then_reload_serves_again_without_restart(
    gateway_settings: Any, production_triton: Any, serving_keys: tuple[Path, dict[str, str]]
) -> None:
    app = create_app(gateway_settings, use_store=False)
    h = {"Authorization": f"Bearer {serving_keys[1]['pacs']}"}
    admin = TritonAdmin(production_triton.http_url)
    with TestClient(app) as client:
        admin.unload("cxr-detector")
        try:
            assert _wait_for(lambda: not admin.is_ready("cxr-detector"))
            assert client.get("/readyz").status_code == 503
            r = client.post(
                "/v1/detect", content=make_dicom(), headers={**h, "Content-Type": "application/dicom"}
            )
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "model_not_ready"
            assert "Retry-After" in r.headers
        finally:
            admin.load("cxr-detector")
        assert admin.wait_ready("cxr-detector")
        assert client.get("/readyz").status_code == 200
        r = client.post(
            "/v1/detect", content=make_dicom(), headers={**h, "Content-Type": "application/dicom"}
        )
        assert r.status_code == 200, r.text
    admin.close()


def test_results_and_sources_past_their_retention_are_purged_from_the_store(s3_store: Any) -> None:
    from datetime import UTC, datetime, timedelta

    from serving.results import ResultRecord, ResultStore, Retention, purge_expired

    store = s3_store.store()
    results = ResultStore(store, retention=Retention(results=timedelta(days=30), sources=timedelta(hours=24)))
    now = datetime.now(UTC)
    old = ResultRecord("old-result", {"request_id": "old-result"}, "png", b"png", now - timedelta(days=31))
    day = ResultRecord("day-result", {"request_id": "day-result"}, "png", b"png", now - timedelta(hours=25))
    new = ResultRecord("new-result", {"request_id": "new-result"}, "png", b"png")
    for record in (old, day, new):
        results.persist(record)
    report = purge_expired(store, results.retention)
    assert (report.results, report.sources) == (1, 1)
    assert not store.exists("results/old-result/result.json")
    assert store.exists("results/day-result/result.json") and not store.exists(
        "results/day-result/source.png"
    )
    assert store.exists("results/new-result/source.png")


def test_dead_triton_gives_503_json_quickly_instead_of_hanging(
    gateway_settings: Any, serving_keys: tuple[Path, dict[str, str]]
) -> None:
    from tests.fixtures.servers import free_port

    settings = gateway_settings.model_copy(update={"triton_production_url": f"127.0.0.1:{free_port()}"})
    app = create_app(settings, use_store=False)
    h = {"Authorization": f"Bearer {serving_keys[1]['pacs']}", "Content-Type": "application/dicom"}
    with TestClient(app) as client:
        assert client.get("/readyz").status_code == 503
        start = time.monotonic()
        r = client.post("/v1/detect", content=make_dicom(), headers=h)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "model_not_ready"
        assert time.monotonic() - start < settings.request_timeout_s


def test_studies_routed_to_a_dead_canary_are_served_by_production(
    gateway_settings: Any, serving_keys: tuple[Path, dict[str, str]]
) -> None:
    from tests.fixtures.servers import free_port
    from tests.unit.serving.serving_support import write_stage_files

    write_stage_files(gateway_settings.gitops_dir, production="7", canary="8", weight=100)
    settings = gateway_settings.model_copy(update={"triton_canary_url": f"127.0.0.1:{free_port()}"})
    app = create_app(settings, use_store=False)
    h = {"Authorization": f"Bearer {serving_keys[1]['pacs']}", "Content-Type": "application/dicom"}
    with TestClient(app) as client:
        r = client.post("/v1/detect", content=make_dicom(seed=2), headers=h)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == {
            "name": "cxr-detector",
            "version": "7",
            "stage": "production",
            "variant": "fp32",
        }
        assert (
            'cxr_gateway_rejected_total{reason="stage_unavailable",stage="canary"} 1.0'
            in client.get("/metrics").text
        )

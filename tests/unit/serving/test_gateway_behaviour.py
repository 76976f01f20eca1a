"""App-level behaviour with the in-process backend: canary routing, shadow, drift, audit, SR, metrics."""

from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
from fastapi.testclient import TestClient

from core.stages import Stage
from data_pipeline.drift import build_reference
from serving.config import ServingSettings
from serving.errors import BackendError
from serving.gateway.app import create_app
from tests.unit.serving.serving_support import make_dicom, onnx_settings, write_stage_files

pytestmark = pytest.mark.unit


def _settings(
    onnx_model: Path, api_keys: tuple[Path, dict[str, str]], tmp_path: Path, **extra: object
) -> ServingSettings:
    settings: ServingSettings = onnx_settings(onnx_model, api_keys[0], tmp_path, routing_poll_s=0.0, **extra)
    return settings


def test_full_canary_weight_routes_every_study_to_canary_and_metrics_say_so(
    onnx_model: Path, api_keys: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    write_stage_files(tmp_path / "gitops", production="3", canary="4", weight=100)
    app = create_app(_settings(onnx_model, api_keys, tmp_path), use_store=False)
    h = {"Authorization": f"Bearer {api_keys[1]['pacs']}", "Content-Type": "application/dicom"}
    with TestClient(app) as client:
        r = client.post("/v1/detect", content=make_dicom(), headers=h)
        assert r.status_code == 200
        assert r.json()["model"]["stage"] == "canary" and r.headers["X-CXR-Stage"] == "canary"
        metrics = client.get("/metrics").text
        assert "cxr_routing_canary_weight 100.0" in metrics
        assert 'cxr_gateway_requests_total{route="/v1/detect",stage="canary",status="200"} 1.0' in metrics


def test_shadow_requests_record_agreement_without_changing_the_answer(
    onnx_model: Path, api_keys: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    write_stage_files(tmp_path / "gitops", production="3", staging="5")
    app = create_app(_settings(onnx_model, api_keys, tmp_path, shadow_fraction=1.0), use_store=False)
    h = {"Authorization": f"Bearer {api_keys[1]['pacs']}", "Content-Type": "application/dicom"}
    with TestClient(app) as client:
        for seed in range(3):
            r = client.post("/v1/detect", content=make_dicom(seed=seed), headers=h)
            assert r.status_code == 200 and r.json()["model"]["stage"] == "production"
        # same model in both stages: the shadow agrees perfectly once its tasks have run
        for _ in range(50):
            metrics = client.get("/metrics").text
            if 'cxr_shadow_agreement_count{stage="staging"} 3.0' in metrics:
                break
        assert 'cxr_shadow_agreement_count{stage="staging"} 3.0' in metrics
        assert 'cxr_shadow_agreement_sum{stage="staging"} 3.0' in metrics


def _metric(metrics: str, prefix: str) -> float | None:
    """The value of the one sample whose line starts with ``prefix`` (None: no such sample)."""
    values = [float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(prefix)]
    assert len(values) <= 1, values
    return values[0] if values else None


def _drained(client: TestClient) -> None:
    """Wait until the detector's background work (shadows, mirrors, drift) has run."""
    detector = client.app.state.cxr.detector  # type: ignore[attr-defined]
    for _ in range(200):
        if not detector._background:
            return
        time.sleep(0.02)
    raise AssertionError(f"{len(detector._background)} background tasks still running")


def test_canary_served_requests_are_mirrored_to_production_and_judged_as_the_canary_agreement(
    onnx_model: Path, api_keys: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    """The canary analysis reads cxr_shadow_agreement{stage="canary"}: it was never observed, so
    its agreement check said "no data" for every canary and could not fail one."""
    gitops = tmp_path / "gitops"
    write_stage_files(gitops, production="3", canary="4", weight=0)
    app = create_app(_settings(onnx_model, api_keys, tmp_path, shadow_fraction=1.0), use_store=False)
    h = {"Authorization": f"Bearer {api_keys[1]['pacs']}", "Content-Type": "application/dicom"}
    with TestClient(app) as client:
        for seed in range(3):  # production serves: nothing to judge the canary by
            r = client.post("/v1/detect", content=make_dicom(seed=seed), headers=h)
            assert r.status_code == 200 and r.json()["model"]["stage"] == "production"
        _drained(client)
        assert 'cxr_shadow_agreement_count{stage="canary"}' not in client.get("/metrics").text

        write_stage_files(gitops, production="3", canary="4", weight=100)
        for seed in range(3):
            r = client.post("/v1/detect", content=make_dicom(seed=seed), headers=h)
            assert r.status_code == 200 and r.json()["model"]["stage"] == "canary"
        _drained(client)
        metrics = client.get("/metrics").text
    # the same model behind both stages: the canary agrees with production perfectly
    assert _metric(metrics, 'cxr_shadow_agreement_count{stage="canary"}') == 3.0
    assert _metric(metrics, 'cxr_shadow_agreement_sum{stage="canary"}') == 3.0
    assert 'cxr_shadow_agreement_count{stage="staging"}' not in metrics  # no staging version: no shadow
    # the mirror served no one: production's images are the three it answered
    served = [
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("cxr_images_processed_total{") and 'stage="production"' in line
    ]
    assert sum(served) == 3.0


def test_a_failing_production_mirror_does_not_touch_the_canary_reply(
    onnx_model: Path,
    api_keys: tuple[Path, dict[str, str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    write_stage_files(tmp_path / "gitops", production="3", canary="4", weight=100)
    app = create_app(_settings(onnx_model, api_keys, tmp_path, shadow_fraction=1.0), use_store=False)
    h = {"Authorization": f"Bearer {api_keys[1]['pacs']}", "Content-Type": "application/dicom"}
    source = make_dicom(seed=4)
    with TestClient(app) as client:
        healthy = client.post("/v1/detect", content=source, headers=h)
        assert healthy.status_code == 200
        _drained(client)
        backend = client.app.state.cxr.backend  # type: ignore[attr-defined]
        infer = backend.infer
        calls: list[str] = []

        async def production_down(stage: Stage, batch: Any, model: Any = None) -> Any:
            calls.append(stage)
            if stage == "production":
                raise BackendError("production Triton answered 500")
            return await infer(stage, batch, model)

        monkeypatch.setattr(backend, "infer", production_down)
        with caplog.at_level(logging.INFO, logger="serving.inference.detector"):
            r = client.post("/v1/detect", content=source, headers=h)
            _drained(client)
        metrics = client.get("/metrics").text
    assert r.status_code == 200 and r.json()["model"]["stage"] == "canary"
    assert r.json()["detections"] == healthy.json()["detections"]
    assert calls == ["canary", "production"], "the canary answers, then production runs in the background"
    assert any("shadow_failed stage=canary run_on=production" in rec.getMessage() for rec in caplog.records)
    assert _metric(metrics, 'cxr_shadow_agreement_count{stage="canary"}') == 1.0  # the healthy one only
    # the mirror's failure is nobody's error: no production rejection, no fallback
    assert not [x for x in metrics.splitlines() if x.startswith("cxr_gateway_rejected_total{")]
    canary_ok = 'cxr_gateway_requests_total{route="/v1/detect",stage="canary",status="200"}'
    assert _metric(metrics, canary_ok) == 2.0


def test_the_production_mirror_is_dropped_not_queued_once_production_is_half_full(
    onnx_model: Path, api_keys: tuple[Path, dict[str, str]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Mirrored work never takes the in-flight slots production's own requests need near its limit."""
    write_stage_files(tmp_path / "gitops", production="3", canary="4", weight=100)
    app = create_app(_settings(onnx_model, api_keys, tmp_path, shadow_fraction=1.0), use_store=False)
    h = {"Authorization": f"Bearer {api_keys[1]['pacs']}", "Content-Type": "application/dicom"}
    with TestClient(app) as client:
        detector = client.app.state.cxr.detector  # type: ignore[attr-defined]
        busy = -(-detector.gate.limit // 2)  # production's patients take half its slots
        detector.gate.current["production"] = busy
        with caplog.at_level(logging.INFO, logger="serving.inference.detector"):
            r = client.post("/v1/detect", content=make_dicom(seed=5), headers=h)
            _drained(client)
        assert detector.gate.current["production"] == busy
        metrics = client.get("/metrics").text
    assert r.status_code == 200 and r.json()["model"]["stage"] == "canary"
    assert any("shadow_failed stage=canary run_on=production" in rec.getMessage() for rec in caplog.records)
    assert 'cxr_shadow_agreement_count{stage="canary"}' not in metrics
    assert not [x for x in metrics.splitlines() if x.startswith("cxr_gateway_rejected_total{")]


def test_drift_score_is_exported_once_the_window_is_full(
    onnx_model: Path, api_keys: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    write_stage_files(tmp_path / "gitops", production="3")
    reference = build_reference(
        intensity_means=[0.8 + 0.001 * i for i in range(50)],  # bright training images: uploads are darker
        intensity_stds=[0.2] * 50,
        widths=[96] * 50,
        heights=[80] * 50,
        class_ids=[],
        boxes_norm=__import__("numpy").zeros((0, 4)),
        pixel_histogram=[1] * 64,
        n_images=50,
    )
    ref_file = tmp_path / "reference_stats.json"
    ref_file.write_text(json.dumps(reference))
    settings = _settings(
        onnx_model, api_keys, tmp_path, reference_stats=ref_file, drift_min_samples=4, drift_window=8
    )
    app = create_app(settings, use_store=False)
    h = {"Authorization": f"Bearer {api_keys[1]['pacs']}", "Content-Type": "application/dicom"}
    with TestClient(app) as client:
        for seed in range(8):
            assert client.post("/v1/detect", content=make_dicom(seed=seed), headers=h).status_code == 200
        for _ in range(50):
            metrics = client.get("/metrics").text
            if 'cxr_drift_score{stage="production"}' in metrics:
                break
    line = next(x for x in metrics.splitlines() if x.startswith('cxr_drift_score{stage="production"}'))
    assert float(line.split()[-1]) > 0.1


def test_input_drift_of_images_like_the_training_data_stays_below_the_alert_level() -> None:
    """The window holds intensities only: the dataset's class frequencies must not be scored against it."""
    import numpy as np

    from serving.inference.drift import DriftMonitor

    rng = np.random.default_rng(0)
    n = 400
    reference = build_reference(
        intensity_means=rng.normal(0.5, 0.05, n).clip(0, 1).tolist(),
        intensity_stds=rng.normal(0.2, 0.02, n).clip(0, 0.5).tolist(),
        widths=[1024] * n,
        heights=[1024] * n,
        class_ids=rng.integers(0, 14, 300).tolist(),  # a dataset with findings, as every real one has
        boxes_norm=np.tile([[0.1, 0.1, 0.3, 0.3]], (300, 1)),
        pixel_histogram=[1] * 64,
        n_images=n,
    )

    def scores(mean: float) -> list[float]:
        seen: list[float] = []
        monitor = DriftMonitor(
            window=200,
            min_samples=50,
            on_score=lambda _stage, score: seen.append(score),
            reference_loader=lambda _version: reference,
        )
        for m, s in zip(rng.normal(mean, 0.05, 200), rng.normal(0.2, 0.02, 200), strict=True):
            monitor.observe(
                "production", mean=float(m), std=float(s), width=1024, height=1024, dataset_version="d"
            )
        return seen

    assert scores(0.5) and max(scores(0.5)) < 0.25  # the same distribution: was 5.8 on every window
    assert min(scores(0.8)) > 0.25  # darker images still drift


def test_a_reference_that_failed_to_load_is_tried_again_not_given_up_for_good() -> None:
    """One store outage while the reference loaded left drift unscored until the gateway restarted."""
    from serving.inference.drift import DriftMonitor

    reference = build_reference(
        intensity_means=[0.5] * 100,
        intensity_stds=[0.2] * 100,
        widths=[1024] * 100,
        heights=[1024] * 100,
        class_ids=[],
        boxes_norm=[],
        pixel_histogram=[1] * 64,
        n_images=100,
    )
    calls: list[str] = []

    def loader(version: str) -> dict[str, Any]:
        calls.append(version)
        if len(calls) == 1:
            raise OSError("store unreachable")
        return reference

    seen: list[float] = []
    monitor = DriftMonitor(
        window=20,
        min_samples=10,
        on_score=lambda _stage, score: seen.append(score),
        reference_loader=loader,
        reference_retry_s=0.0,
    )
    for _ in range(20):
        monitor.observe("production", mean=0.5, std=0.2, width=1024, height=1024, dataset_version="d")
    assert calls == ["d", "d"] and len(seen) == 1, "the first window unscored, the second scored"


def test_audit_log_has_one_line_per_request_and_no_phi(onnx_client: TestClient, keys: dict[str, str]) -> None:
    source = make_dicom(seed=42)
    ds = pydicom.dcmread(io.BytesIO(source))
    r = onnx_client.post(
        "/v1/detect",
        content=source,
        headers={"Authorization": f"Bearer {keys['pacs']}", "Content-Type": "application/dicom"},
    )
    assert r.status_code == 200
    audit = onnx_client.app.state.cxr.settings.audit_log.read_text()  # type: ignore[attr-defined]
    entry = next(
        json.loads(x) for x in audit.splitlines() if json.loads(x)["request_id"] == r.headers["X-Request-ID"]
    )
    assert (
        entry["result_id"] == r.json()["request_id"]
    )  # the server-made result id, beside the correlation id
    assert entry["key_id"] == "pacs-1" and entry["role"] == "pacs" and entry["status"] == 200
    assert entry["detections"] == len(r.json()["detections"]) and entry["study_hash"]
    for phi in (str(ds.PatientName), ds.PatientID, ds.StudyInstanceUID, ds.SOPInstanceUID, keys["pacs"]):
        assert phi not in audit


def test_detect_with_format_sr_returns_a_tid1500_report_of_the_boxes(
    onnx_client: TestClient, keys: dict[str, str]
) -> None:
    source = make_dicom(seed=8)
    r = onnx_client.post(
        "/v1/detect?format=sr",
        content=source,
        headers={"Authorization": f"Bearer {keys['pacs']}", "Content-Type": "application/dicom"},
    )
    assert r.status_code == 200 and r.headers["content-type"] == "application/dicom"
    sr = hd.sr.srread(io.BytesIO(r.content))
    groups = sr.content.get_planar_roi_measurement_groups()
    assert groups, "the test model yields boxes"
    region = groups[0].roi
    assert region is not None
    selected_from = region.ContentSequence[0]  # the IMAGE item the SCOORD was drawn on
    source_uid = pydicom.dcmread(io.BytesIO(source)).SOPInstanceUID
    assert selected_from.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source_uid


def test_detect_with_format_sr_names_the_result_it_stored_so_the_caller_can_address_it(
    onnx_client: TestClient, keys: dict[str, str]
) -> None:
    """The SR holds no request_id and X-Request-ID is the correlation id: the result had no name."""
    headers = {"Authorization": f"Bearer {keys['pacs']}", "Content-Type": "application/dicom"}
    r = onnx_client.post(
        "/v1/detect?format=sr", content=make_dicom(seed=81), headers={**headers, "X-Request-ID": "corr-81"}
    )
    assert r.status_code == 200, r.text
    rid = r.headers["X-CXR-Result-ID"]
    assert rid != r.headers["X-Request-ID"] == "corr-81"
    assert r.headers["Content-Location"] == f"/v1/results/{rid}/sr"
    stored = onnx_client.get(f"/v1/results/{rid}", headers=headers)
    assert stored.status_code == 200 and stored.json()["request_id"] == rid
    again = onnx_client.get(r.headers["Content-Location"], headers=headers)
    assert again.status_code == 200  # the same SR instance (its UIDs derive from the source and model)
    uid = pydicom.dcmread(io.BytesIO(again.content)).SOPInstanceUID
    assert uid == pydicom.dcmread(io.BytesIO(r.content)).SOPInstanceUID
    as_json = onnx_client.post("/v1/detect", content=make_dicom(seed=82), headers=headers)
    assert as_json.headers["X-CXR-Result-ID"] == as_json.json()["request_id"]


def _sr_of(client: TestClient, keys: dict[str, str], ds: pydicom.Dataset) -> Any:
    """The SR the gateway builds for ``ds``: detected, then fetched from ``/v1/results/{id}/sr``."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    headers = {"Authorization": f"Bearer {keys['pacs']}", "Content-Type": "application/dicom"}
    r = client.post("/v1/detect", content=buf.getvalue(), headers=headers)
    assert r.status_code == 200, r.text
    sr_reply = client.get(f"/v1/results/{r.json()['request_id']}/sr", headers=headers)
    assert sr_reply.status_code == 200, sr_reply.text
    return hd.sr.srread(io.BytesIO(sr_reply.content))


def test_sr_of_a_deidentified_dicom_without_type2_patient_attributes(
    onnx_client: TestClient, keys: dict[str, str]
) -> None:
    """VinDr-style exports drop PatientBirthDate, PatientSex, ...: the SR carries them empty."""
    ds = pydicom.dcmread(io.BytesIO(make_dicom(seed=9)))
    dropped = ("PatientBirthDate", "PatientSex", "ReferringPhysicianName", "AccessionNumber", "StudyTime")
    for keyword in dropped:
        delattr(ds, keyword)
    sr = _sr_of(onnx_client, keys, ds)
    assert sr.StudyInstanceUID == ds.StudyInstanceUID and sr.PatientBirthDate == ""


def test_an_sr_of_a_source_with_values_invalid_for_their_vr_carries_them_empty(
    onnx_client: TestClient, keys: dict[str, str]
) -> None:
    """Such values made highdicom refuse every object of the study: the PACS got no result at all."""
    ds = pydicom.dcmread(io.BytesIO(make_dicom(seed=10)))
    ds.PatientBirthDate, ds.PatientSex, ds.StudyTime = "1980-02-03", "Male", "10:10"
    sr = _sr_of(onnx_client, keys, ds)
    assert (sr.PatientBirthDate, sr.PatientSex, sr.StudyTime) == ("", "", "")
    assert sr.PatientID == ds.PatientID and sr.StudyDate == ds.StudyDate


def test_an_sr_build_error_quotes_no_library_text(monkeypatch: pytest.MonkeyPatch) -> None:
    """highdicom's messages quote the offending value ("Unable to convert '1980-02-03' to 'DA'")."""
    from serving.dicom import sr
    from serving.errors import Conflict

    def refuse(*_: object) -> None:
        raise ValueError("Unable to convert '1980-02-03' to 'DA' object")

    monkeypatch.setattr(sr, "build_sr", refuse)
    with pytest.raises(Conflict) as caught:
        sr.sr_bytes(make_dicom(seed=11), {"detections": []})
    assert "1980" not in caught.value.message and "ValueError" in caught.value.message

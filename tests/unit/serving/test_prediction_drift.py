"""Prediction drift: the window of answers scored per class against the version's validation split.

The monitor is fed synthetic answer streams drawn from known distributions (same as the
reference, shifted, no reference at all); then the real gateway on the tiny test model is fed
images and its ``/metrics`` must carry the scores, low against a reference of its own answers
and high against a shifted one.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client import generate_latest

from core.operating_points import OPERATING_POINTS_FILE, OperatingPoints
from core.prediction_reference import PredictionReference, build_prediction_reference
from data_pipeline.classes import CLASS_NAMES
from serving.inference.prediction_drift import (
    PredictionDriftMonitor,
    PredictionDriftReport,
    score_window,
    smoothed_psi,
)
from serving.metrics import GatewayMetrics
from tests.unit.serving.serving_support import make_dicom, onnx_settings, write_stage_files

pytestmark = pytest.mark.unit

NAMES = ("Aortic enlargement", "Cardiomegaly", "Nodule/Mass")
Answer = list[tuple[int, float]]


def _stream(
    n: int, seed: int, rates: tuple[float, ...] = (1.0, 0.3, 0.05), conf_ab: tuple[float, float] = (5.0, 2.0)
) -> list[Answer]:
    """``n`` images' answers: class c detected Poisson(rates[c]) times, confidences Beta(*conf_ab)."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        dets = [
            (c, float(rng.beta(*conf_ab))) for c, rate in enumerate(rates) for _ in range(rng.poisson(rate))
        ]
        images.append(dets)
    return images


@pytest.fixture(scope="module")
def reference() -> PredictionReference:
    ref = build_prediction_reference(_stream(2000, seed=0), NAMES)
    assert ref is not None
    return ref


def _monitor(
    reports: list[PredictionDriftReport], resets: list[str] | None = None, **kw: Any
) -> PredictionDriftMonitor:
    settings = {"window": 500, "min_samples": 50, "min_detections": 50} | kw
    return PredictionDriftMonitor(
        on_report=reports.append, on_reset=(resets.append if resets is not None else None), **settings
    )


def _feed(monitor: PredictionDriftMonitor, stream: list[Answer], ref: PredictionReference | None) -> None:
    for dets in stream:
        monitor.observe("production", model_version="7", reference=ref, detections=dets)


def _by_name(report: PredictionDriftReport) -> dict[str, Any]:
    return {c.class_name: c for c in report.classes}


def test_a_stream_like_the_validation_split_scores_below_the_stable_level(
    reference: PredictionReference,
) -> None:
    reports: list[PredictionDriftReport] = []
    _feed(_monitor(reports), _stream(500, seed=1), reference)
    assert len(reports) == 10  # scored every 50 images
    last = reports[-1]
    assert last.images == 500 and last.stage == "production" and last.model_version == "7"
    assert last.score < 0.1, last
    aortic = _by_name(last)["Aortic enlargement"]
    assert aortic.confidence_psi is not None
    assert aortic.reference_rate == pytest.approx(1.0, abs=0.1)
    assert aortic.detection_rate == pytest.approx(aortic.reference_rate, abs=0.15)


def test_a_shifted_stream_scores_above_the_alert_level_for_the_classes_that_moved(
    reference: PredictionReference,
) -> None:
    reports: list[PredictionDriftReport] = []
    # the model stops finding aortic enlargement and Cardiomegaly's confidences slide down
    shifted = _stream(500, seed=2, rates=(0.1, 0.3, 0.05), conf_ab=(5.0, 2.0))
    rng = np.random.default_rng(3)
    shifted = [[(c, float(rng.beta(2.0, 5.0)) if c == 1 else s) for c, s in dets] for dets in shifted]
    _feed(_monitor(reports), shifted, reference)
    by_name = _by_name(reports[-1])
    assert by_name["Aortic enlargement"].count_psi > 0.25
    assert by_name["Aortic enlargement"].detection_rate < 0.2 < by_name["Aortic enlargement"].reference_rate
    cardio = by_name["Cardiomegaly"]
    assert cardio.count_psi < 0.1  # as often as before ...
    assert cardio.confidence_psi is not None and cardio.confidence_psi > 0.25  # ... but less sure
    # a class with few detections in the window gets no confidence score rather than a noisy one
    assert by_name["Nodule/Mass"].confidence_psi is None
    assert by_name["Nodule/Mass"].count_psi < 0.1


def test_a_version_without_a_reference_has_no_score_and_never_an_error(
    reference: PredictionReference,
) -> None:
    reports: list[PredictionDriftReport] = []
    resets: list[str] = []
    monitor = _monitor(reports, resets, min_samples=5, window=10)
    for dets in _stream(20, seed=4):
        assert monitor.observe("canary", model_version="3", reference=None, detections=dets) is None
    assert reports == [] and resets == ["canary"]  # the stage's old series are dropped once
    # a malformed answer (class id beyond the reference, nonsense confidence) is ignored, not raised
    for _ in range(5):
        monitor.observe("canary", model_version="4", reference=reference, detections=[(99, 7.0), (-1, -3.0)])
    assert resets == ["canary", "canary"] and len(reports) == 1
    assert all(c.detections == 0 for c in reports[0].classes)


def test_a_failing_publisher_does_not_reach_the_caller(reference: PredictionReference) -> None:
    def broken(report: PredictionDriftReport) -> None:
        raise RuntimeError("registry gone")

    monitor = PredictionDriftMonitor(window=4, min_samples=2, min_detections=1, on_report=broken)
    for dets in _stream(4, seed=5):
        assert monitor.observe("production", model_version="1", reference=reference, detections=dets) is None


def test_a_new_version_starts_a_new_window(reference: PredictionReference) -> None:
    reports: list[PredictionDriftReport] = []
    resets: list[str] = []
    monitor = _monitor(reports, resets, min_samples=10, window=40)
    _feed(monitor, _stream(30, seed=6), reference)
    assert reports[-1].images == 30
    for dets in _stream(10, seed=7):
        monitor.observe("production", model_version="8", reference=reference, detections=dets)
    assert resets == ["production", "production"]
    assert reports[-1].model_version == "8" and reports[-1].images == 10


def test_smoothing_keeps_a_bin_empty_on_one_side_finite_and_ignores_bins_empty_on_both() -> None:
    assert smoothed_psi([100, 0, 0, 0], [100, 0, 0, 0]) == 0.0
    one_side = smoothed_psi([100, 0], [50, 50])
    assert np.isfinite(one_side) and one_side > 0.25
    # many bins empty on both sides change nothing
    assert smoothed_psi([60, 40] + [0] * 20, [40, 60] + [0] * 20) == pytest.approx(
        smoothed_psi([60, 40], [40, 60])
    )


def test_scores_use_the_bins_stored_in_the_reference(reference: PredictionReference) -> None:
    """The window is binned with the reference's own edges (so a later change of defaults is harmless)."""
    coarse = reference.model_copy(
        update={
            "confidence_edges": [0.0, 0.5, 1.0],
            "classes": [
                c.model_copy(
                    update={"confidence_hist": [sum(c.confidence_hist[:5]), sum(c.confidence_hist[5:])]}
                )
                for c in reference.classes
            ],
        }
    )
    images = [
        (np.asarray([c for c, _ in d], dtype=np.int64), np.asarray([s for _, s in d]))
        for d in _stream(300, 8)
    ]
    report = score_window(coarse, images, min_detections=50)
    assert report.images == 300 and report.score < 0.1


def test_metrics_publish_the_report_and_drop_a_stage_on_reset(reference: PredictionReference) -> None:
    metrics = GatewayMetrics()
    reports: list[PredictionDriftReport] = []
    monitor = PredictionDriftMonitor(
        window=100,
        min_samples=100,
        min_detections=50,
        on_report=lambda r: (reports.append(r), metrics.set_prediction_drift(r))[-1],
        on_reset=metrics.clear_prediction_drift,
    )
    _feed(monitor, _stream(100, seed=9), reference)
    text = generate_latest(metrics.registry).decode()
    last = _by_name(reports[-1])
    assert 'cxr_prediction_drift_window_images{stage="production"} 100.0' in text
    line = 'cxr_prediction_drift_psi{class_name="Aortic enlargement",kind="count",stage="production"} '
    assert line + repr(last["Aortic enlargement"].count_psi) in text
    assert (
        'cxr_prediction_drift_psi{class_name="Aortic enlargement",kind="confidence",stage="production"}'
        in text
    )
    assert 'cxr_prediction_drift_psi{class_name="Nodule/Mass",kind="confidence"' not in text  # too few
    assert 'cxr_prediction_reference_detection_rate{class_name="Cardiomegaly",stage="production"}' in text
    assert 'cxr_prediction_detection_rate{class_name="Cardiomegaly",stage="production"}' in text
    # the next version has no reference: its stage's series disappear
    monitor.observe("production", model_version="9", reference=None, detections=[])
    assert 'stage="production"' not in generate_latest(metrics.registry).decode()


# ---------------------------------------------------------------------------- through the gateway

IMAGES = 8


def _served(onnx_model: Path, root: Path, reference: PredictionReference | None) -> Path:
    """The test model with operating points (one low threshold for every class) and ``reference``."""
    model = root / "model" / "model.onnx"
    model.parent.mkdir(parents=True)
    shutil.copyfile(onnx_model, model)
    ops = OperatingPoints(fallback_threshold=0.05, prediction_reference=reference)
    (model.parent / OPERATING_POINTS_FILE).write_text(ops.to_json())
    return model


@pytest.fixture
def gateway(
    onnx_model: Path, api_keys: tuple[Path, dict[str, str]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    started: list[TestClient] = []

    def make(reference: PredictionReference | None) -> TestClient:
        from serving.gateway.app import create_app

        root = tmp_path_factory.mktemp("prediction-drift")
        write_stage_files(root / "gitops", production="7")
        settings = onnx_settings(
            _served(onnx_model, root, reference),
            api_keys[0],
            root,
            routing_poll_s=0.0,
            prediction_drift_window=IMAGES,
            prediction_drift_min_samples=IMAGES,
            prediction_drift_min_detections=1,
        )
        client = TestClient(create_app(settings, use_store=False))
        client.__enter__()
        started.append(client)
        return client

    yield make
    for client in started:
        client.__exit__(None, None, None)


def _post(client: TestClient, keys: dict[str, str], seed: int, query: str = "") -> Answer:
    headers = {"Authorization": f"Bearer {keys['pacs']}", "Content-Type": "application/dicom"}
    r = client.post(f"/v1/detect{query}", content=make_dicom(seed=seed), headers=headers)
    assert r.status_code == 200, r.text
    return [(d["class_id"], d["confidence"]) for d in r.json()["detections"]]


def _psi(client: TestClient) -> dict[tuple[str, str], float]:
    """The gateway's prediction drift series, once its background scoring has published them."""
    for _ in range(100):
        lines = [
            x for x in client.get("/metrics").text.splitlines() if x.startswith("cxr_prediction_drift_psi{")
        ]
        if lines:
            break
        time.sleep(0.05)
    out = {}
    for line in lines:
        labels = dict(part.split("=", 1) for part in line[line.index("{") + 1 : line.index("}")].split(","))
        out[(labels["class_name"].strip('"'), labels["kind"].strip('"'))] = float(line.split()[-1])
    return out


def test_the_gateway_scores_its_answers_against_the_versions_reference(
    gateway: Any, keys: dict[str, str]
) -> None:
    # a version without a reference answers as usual and exports no prediction drift
    bare = gateway(None)
    answers = [_post(bare, keys, seed) for seed in range(IMAGES)]
    assert sum(map(len, answers)) >= IMAGES, "the test needs detections"
    assert "cxr_prediction_drift_psi{" not in bare.get("/metrics").text

    # its own answers as the reference: the same images score 0; requests with their own
    # threshold are not part of the window (they would be 2 more images, and differ by design)
    own = build_prediction_reference(answers, CLASS_NAMES)
    assert own is not None
    same = gateway(own)
    for seed in range(2):
        _post(same, keys, seed, query="?conf=0.9")
    for seed in range(IMAGES):
        _post(same, keys, seed)
    scores = _psi(same)
    assert scores and max(scores.values()) == 0.0, scores
    assert (
        f'cxr_prediction_drift_window_images{{stage="production"}} {float(IMAGES)}'
        in same.get("/metrics").text
    )

    # a reference in which the model never detected anything: every class it now finds has drifted
    silent = build_prediction_reference([[] for _ in range(100)], CLASS_NAMES)
    shifted = gateway(silent)
    for seed in range(IMAGES):
        _post(shifted, keys, seed)
    scores = _psi(shifted)
    found = {CLASS_NAMES[c] for a in answers for c, _ in a}
    assert {name for (name, kind), v in scores.items() if kind == "count" and v > 0.25} == found

"""The proof that every dashboard panel means something: real gateway, real Tritons, real Prometheus.

One module-scoped stack: three Tritons (production, canary at 50 %, staging as
shadow) serving a tiny real YOLO11n export, the FastAPI gateway in front of
them, the MLflow exporter reading a real MLflow server, and Debian's
Prometheus scraping all of them with the project's rule files loaded. Mixed
traffic (PNG and DICOM, batches, bad input, missing keys, feedback, an
overload burst) is driven through the gateway; then every panel query of every
dashboard must return at least one series, and every rule must evaluate
without error. A second test feeds inverted images and watches the drift score
cross the alert threshold; a third watches prediction drift tell a stage that
answers like its registered validation split from one that does not.
"""

from __future__ import annotations

import io
import json
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from serving.observability.cli import cluster_only_panels
from serving.observability.dashboards import DASHBOARDS, dashboard_json
from serving.observability.panel_check import extract_queries, failures, run_queries
from serving.observability.prometheus_api import PrometheusClient
from serving.observability.rules import load_rule_file, rule_files
from stack.components import Component, gateway_component
from tests.fixtures.servers import HOST, RunningProcess, free_port
from tests.unit.serving.serving_support import chest_like, export_test_model, make_dicom, write_keys

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[3]
RULES_DIR = REPO / "k8s" / "monitoring" / "rules"
STAGES = ("production", "canary", "staging")
DRIFT_WINDOW = 12
MAX_INFLIGHT = 3  # one batch of 3 fits; two concurrent ones do not
# names of our own so other tests sharing the session MLflow server are not disturbed
EXPERIMENT, MODEL_NAME = "obs-test-training", "obs-test-detector"
DRIFT_MIN_SAMPLES = 6
PREDICTION_WINDOW, PREDICTION_MIN_SAMPLES, PREDICTION_MIN_DETECTIONS = 12, 4, 20


@dataclass
class ObservedStack:
    gateway: str
    prometheus: PrometheusClient
    keys: dict[str, str]

    def post_image(self, data: bytes, *, role: str = "pacs", stage: str | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.keys[role]}", "Content-Type": _content_type(data)}
        if stage:
            headers["X-CXR-Stage"] = stage
        return httpx.post(
            f"{self.gateway}/v1/detect", content=data, headers=headers, timeout=60, trust_env=False
        )

    def post_batch(self, images: list[bytes]) -> httpx.Response:
        return httpx.post(
            f"{self.gateway}/v1/detect/batch",
            files=[("file", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)],
            headers={"Authorization": f"Bearer {self.keys['pacs']}"},
            timeout=60,
            trust_env=False,
        )


def _content_type(data: bytes) -> str:
    if data[128:132] == b"DICM":
        return "application/dicom"
    return "image/png" if data.startswith(b"\x89PNG") else "application/octet-stream"


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def normal_image(seed: int) -> np.ndarray:
    return (chest_like(112, 96, seed) // 16).astype(np.uint8)


def inverted_image(seed: int) -> np.ndarray:
    return (255 - normal_image(seed)).astype(np.uint8)


def _reference_stats(path: Path) -> Path:
    """The dataset reference the served model 'was trained on': normal images, as data_pipeline builds it."""
    import json

    from data_pipeline.drift import build_reference, intensity_mean_std, level_histogram

    images = [normal_image(seed) for seed in range(100, 160)]
    ref = build_reference(
        intensity_means=[intensity_mean_std(level_histogram(img))[0] for img in images],
        widths=[img.shape[1] for img in images],
        heights=[img.shape[0] for img in images],
        class_ids=[],
        boxes_norm=np.zeros((0, 4)),
        pixel_histogram=[0] * 64,
        n_images=len(images),
    )
    path.write_text(json.dumps(ref))
    return path


def _answers(onnx: Path, images: list[np.ndarray], ops: Any) -> list[list[tuple[int, float]]]:
    """What the gateway returns for each image at ``ops``' operating points: (class id, confidence).

    The same decode, letterbox, ONNX Runtime and NMS the gateway runs, in this process: how a
    registration measures the model's answers on its validation split.
    """
    from serving.config import ServingSettings
    from serving.contract import contract_from_metadata
    from serving.inference.backend_onnx import ort_session
    from serving.inference.pipeline import decode_upload
    from serving.inference.postprocess import to_detections
    from serving.inference.preprocess import prepare, stack

    settings = ServingSettings()
    session = ort_session(onnx, threads=1, spin=False)
    contract = contract_from_metadata(dict(session.get_modelmeta().custom_metadata_map))
    out = []
    for pixels in images:
        image, _ = decode_upload(_png(pixels))
        prepared = prepare(image.to_uint8(), contract, settings.max_side)
        [pred] = session.run([contract.output_name], {contract.input_name: stack([prepared])})[0]
        dets = to_detections(
            pred,
            prepared.params,
            contract.class_names,
            conf_threshold=None,
            iou_threshold=settings.iou_threshold,
            max_det=settings.max_detections,
            source_size=prepared.source_size,
            operating_points=ops,
        )
        out.append([(d.class_id, d.confidence) for d in dets])
    return out


def _registered(onnx: Path, root: Path, *, shifted: bool) -> Path:
    """A copy of the model with operating points (one low threshold) and a prediction reference.

    The reference is the model's own answers on normal images (a validation split), or, with
    ``shifted``, answers of a split on which it found a fifth of the boxes at lower confidence:
    what the model answers now is then a stream shifted from what was registered.
    """
    import shutil

    from core.hashing import file_sha256
    from core.operating_points import OPERATING_POINTS_FILE, OperatingPoints
    from core.prediction_reference import build_prediction_reference
    from data_pipeline.classes import CLASS_NAMES

    target = root / "model.onnx"
    root.mkdir(parents=True)
    shutil.copyfile(onnx, target)
    ops = OperatingPoints(onnx_sha256=file_sha256(target), fallback_threshold=0.01)
    answers = _answers(target, [normal_image(seed) for seed in range(100, 130)], ops)
    if shifted:
        answers = [[(c, s * 0.6) for c, s in dets[::5]] for dets in answers]
    reference = build_prediction_reference(answers, CLASS_NAMES)
    ops = ops.model_copy(update={"prediction_reference": reference})
    (root / OPERATING_POINTS_FILE).write_text(ops.to_json())
    return target


def _start_triton(triton_factory: Any, onnx: Path, stage: str, version: str, root: Path) -> Any:
    from serving.inference.triton_repo import TritonAdmin, build_repository

    repo = root / f"repo-{stage}"
    build_repository(onnx, repo, variant="python", model_version=version)
    triton = triton_factory(stage, repo)
    admin = TritonAdmin(triton.http_url)
    try:
        admin.load()
        assert admin.wait_ready(timeout_s=90), f"{stage} Triton did not load the model"
    finally:
        admin.close()
    return triton


def _seed_mlflow(uri: str, experiment: str, model_name: str) -> None:
    """Two finished runs and a failed one, and a registered version with a production alias."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    finished = None
    for i, status in enumerate(("FINISHED", "FAILED", "FINISHED")):
        run = client.create_run(exp_id, run_name=f"obs-{i}")
        client.log_metric(run.info.run_id, "epoch_seconds", 2.5 + i)
        client.log_metric(run.info.run_id, "val/mAP50", 0.1 * (i + 1))
        if status == "FINISHED":
            client.log_metric(run.info.run_id, "test/map50", 0.3 + 0.01 * i)
            client.log_metric(run.info.run_id, "test/map40", 0.32 + 0.01 * i)
            finished = run
        client.set_terminated(run.info.run_id, status)
    assert finished is not None
    client.create_registered_model(model_name)
    version = client.create_model_version(
        model_name, source=f"runs:/{finished.info.run_id}/onnx", run_id=finished.info.run_id
    )
    client.set_registered_model_alias(model_name, "production", version.version)


def _mlflow_exporter(uri: str, port: int, experiment: str, model_name: str, env: dict[str, str]) -> Component:
    command = [
        sys.executable, "-m", "serving.observability", "mlflow-exporter",
        "--host", HOST, "--port", str(port), "--mlflow-uri", uri,
        "--experiment", experiment, "--model-name", model_name,
    ]  # fmt: skip
    return Component("mlflow-exporter", command, f"http://{HOST}:{port}/metrics", env=env, cwd=REPO)


@pytest.fixture(scope="module")
def observed_stack(
    tmp_path_factory: pytest.TempPathFactory,
    triton_factory: Any,
    prometheus_factory: Any,
    s3_store: Any,
    mlflow_server: Any,
) -> Iterator[ObservedStack]:
    from core.stage_file import StageFile, write_stage_file

    root = tmp_path_factory.mktemp("observed")
    onnx = export_test_model(root / "model")
    # canary's version was registered with a reference its answers do not match (prediction drift)
    served = {
        stage: _registered(onnx, root / f"model-{stage}", shifted=stage == "canary") for stage in STAGES
    }
    tritons = {
        stage: _start_triton(triton_factory, served[stage], stage, str(i + 1), root)
        for i, stage in enumerate(STAGES)
    }

    gitops = root / "gitops"
    write_stage_file(gitops, StageFile(stage="production", model_version="1"))
    write_stage_file(gitops, StageFile(stage="canary", model_version="2", canary_weight=50))
    write_stage_file(gitops, StageFile(stage="staging", model_version="3"))
    keys = write_keys(root / "api_keys.json")

    env = {
        **s3_store.env,
        "CXR_STACK_DIR": str(root / "stack"),
        "CXR_BACKEND": "triton",
        "CXR_GITOPS_DIR": str(gitops),
        "CXR_API_KEYS_FILE": str(root / "api_keys.json"),
        "CXR_SERVING_STAGES": '["production", "canary", "staging"]',
        "CXR_SHADOW_FRACTION": "1.0",
        "CXR_CONF_THRESHOLD": "0.01",
        "CXR_MAX_INFLIGHT_PER_STAGE": str(MAX_INFLIGHT),
        "CXR_REFERENCE_STATS": str(_reference_stats(root / "reference_stats.json")),
        "CXR_DRIFT_WINDOW": str(DRIFT_WINDOW),
        "CXR_DRIFT_MIN_SAMPLES": str(DRIFT_MIN_SAMPLES),
        "CXR_PREDICTION_DRIFT_WINDOW": str(PREDICTION_WINDOW),
        "CXR_PREDICTION_DRIFT_MIN_SAMPLES": str(PREDICTION_MIN_SAMPLES),
        "CXR_PREDICTION_DRIFT_MIN_DETECTIONS": str(PREDICTION_MIN_DETECTIONS),
        "CXR_ROUTING_POLL_S": "0.5",
        "CXR_SPOOL_DIR": str(root / "spool"),
        # a PACS that is never asked (no request says send_back=true): its outbox depth series exists, at 0
        "CXR_PACS_DESTINATIONS": json.dumps(
            [
                {
                    "name": "pacs",
                    "kind": "stow",
                    "url": "http://127.0.0.1:9/dicom-web",
                    "callers": ["*"],
                    "auto": False,
                }
            ]
        ),
        **{f"CXR_TRITON_{s.upper()}_URL": t.http_url for s, t in tritons.items()},
    }
    port = free_port()
    gateway = RunningProcess(gateway_component(HOST, port, Path(sys.executable), env), root / "gateway.log")
    gateway.start(timeout=120)

    experiment, model_name = EXPERIMENT, MODEL_NAME
    _seed_mlflow(mlflow_server.uri, experiment, model_name)
    exporter_port = free_port()
    exporter = RunningProcess(
        _mlflow_exporter(mlflow_server.uri, exporter_port, experiment, model_name, env), root / "exporter.log"
    )
    exporter.start(timeout=60)

    # the job names the stack gives them (stack/manager.py): panels and alerts select by them
    targets = {
        "gateway": [f"{HOST}:{port}"],
        "mlflow-exporter": [f"{HOST}:{exporter_port}"],
        "triton": [t.metrics_url for t in tritons.values()],
    }
    prometheus = prometheus_factory(targets, rule_files(RULES_DIR))
    client = PrometheusClient(prometheus.url)
    try:
        yield ObservedStack(f"http://{HOST}:{port}", client, keys)
    finally:
        client.close()
        exporter.stop()
        gateway.stop()


def drive_mixed_traffic(stack: ObservedStack) -> None:
    """What a day at a hospital looks like, compressed: most calls good, some bad, some too many at once."""
    replies = [stack.post_image(_png(normal_image(seed))) for seed in range(12)]
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies if r.status_code != 200]
    assert {r.headers["X-CXR-Stage"] for r in replies} == {"production", "canary"}, (
        "canary weight 50 % not honoured"
    )
    for seed in range(3):
        assert stack.post_image(make_dicom(seed=seed)).status_code == 200
    assert stack.post_batch([_png(normal_image(50 + i)) for i in range(MAX_INFLIGHT)]).status_code == 200
    # bad input and a missing key: 4xx, never 5xx
    assert 400 <= stack.post_image(b"this is not an image").status_code < 500
    anonymous = httpx.post(f"{stack.gateway}/v1/detect", content=b"x", timeout=10, trust_env=False)
    assert anonymous.status_code == 401
    # radiologist feedback on a real result
    request_id = replies[0].json()["request_id"]
    fb = httpx.post(
        f"{stack.gateway}/v1/feedback",
        json={"request_id": request_id, "reviews": [], "no_finding": True, "comment": "no finding"},
        headers={"Authorization": f"Bearer {stack.keys['radiologist']}"},
        timeout=30,
        trust_env=False,
    )
    assert fb.status_code in (200, 202), fb.text
    # readiness probes publish cxr_stage_ready
    assert httpx.get(f"{stack.gateway}/readyz", timeout=30, trust_env=False).status_code == 200
    # an overload burst: 8 concurrent full batches against 3 images in flight per stage
    images = [_png(normal_image(200 + i)) for i in range(MAX_INFLIGHT)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        burst = list(pool.map(lambda _: stack.post_batch(images).status_code, range(8)))
    assert 503 in burst, f"no call was shed in the burst: {burst}"


def test_every_dashboard_panel_returns_data_from_the_real_stack(observed_stack: ObservedStack) -> None:
    drive_mixed_traffic(observed_stack)
    prom = observed_stack.prometheus
    expected_targets = 6  # gateway, exporter, 3 Tritons, Prometheus is not scraped
    prom.wait_for(f"count(up == 1) >= {expected_targets - 1}", timeout=60)

    skip = cluster_only_panels()
    queries = [q for spec in DASHBOARDS for q in extract_queries(dashboard_json(spec)) if q.key not in skip]
    assert len(queries) > 40
    # recording rules run every 30 s: poll until every panel has data or the deadline passes
    deadline = time.monotonic() + 150
    while True:
        results = run_queries(prom, queries)
        bad = failures(results)
        if not bad or time.monotonic() > deadline:
            break
        time.sleep(5)
    assert not bad, "panels without data:\n" + "\n".join(bad)

    # label values the alert rules rely on exist in the real exporters
    assert prom.query('nv_inference_request_failure{reason="REJECTED"}'), "Triton: no reason=REJECTED series"
    stages = {s.labels["stage"] for s in prom.query("stage:cxr_gateway_requests:rate5m")}
    assert stages >= {"production", "canary"}, stages
    slo_bucket = 'cxr_gateway_request_duration_seconds_bucket{le=~"1(\\\\.0)?"}'
    assert prom.query(slo_bucket), "the latency histogram has no 1 s bucket for the SLO"

    # every rule evaluates without error against real series
    groups = prom.rule_groups()
    loaded = {r["name"] for g in groups for r in g["rules"]}
    defined = {r.name for p in rule_files(RULES_DIR) for grp in load_rule_file(p).groups for r in grp.rules}
    assert defined <= loaded
    broken = [
        f"{r['name']}: {r.get('lastError')}" for g in groups for r in g["rules"] if r.get("health") == "err"
    ]
    assert not broken, broken


def _wait_for_score(prom: PrometheusClient, ok: Any, message: str, timeout: float = 30) -> float:
    """The production drift score once Prometheus has scraped one that passes ``ok`` (it lags a scrape)."""
    deadline = time.monotonic() + timeout
    seen: list[float] = []
    while True:
        series = prom.query('cxr_drift_score{stage="production"}')
        if series:
            seen.append(series[0].value)
            if ok(seen[-1]):
                return seen[-1]
        if time.monotonic() > deadline:
            raise AssertionError(f"{message}; scores seen: {sorted(set(seen))}")
        time.sleep(1)


def test_inverted_images_raise_the_drift_score_past_the_alert_threshold(
    observed_stack: ObservedStack,
) -> None:
    prom = observed_stack.prometheus
    alert_expr = next(
        rule.expr
        for p in rule_files(RULES_DIR)
        for rule in load_rule_file(p).alerts
        if rule.alert == "CxrInputDriftHigh"
    )
    # The production window still holds the first test's traffic (DICOMs, batches), and the
    # gateway rescoring every DRIFT_MIN_SAMPLES images: only after WINDOW + MIN_SAMPLES new
    # images is the latest score surely one of a window holding nothing but them.
    fill = DRIFT_WINDOW + DRIFT_MIN_SAMPLES
    for seed in range(fill):
        reply = observed_stack.post_image(_png(normal_image(300 + seed)), role="operator", stage="production")
        assert reply.status_code == 200, reply.text
    normal = _wait_for_score(prom, lambda v: v < 0.25, "normal images never scored below 0.25")
    assert not [s for s in prom.query(alert_expr) if s.labels.get("stage") == "production"]

    for seed in range(fill):
        reply = observed_stack.post_image(
            _png(inverted_image(400 + seed)), role="operator", stage="production"
        )
        assert reply.status_code == 200, reply.text
    # Prometheus sees the new score at its next scrape (5 s): poll the alert expression itself
    deadline = time.monotonic() + 30
    while not (firing := [s for s in prom.query(alert_expr) if s.labels.get("stage") == "production"]):
        assert time.monotonic() < deadline, "CxrInputDriftHigh's expression never became true for production"
        time.sleep(1)
    drifted = firing[0].value
    assert drifted > 0.25 and drifted > normal, (normal, drifted)


def test_answers_unlike_the_registered_reference_make_the_prediction_drift_alert_expression_true(
    observed_stack: ObservedStack,
) -> None:
    """Production answers like its validation split; canary's answers are shifted from its own.

    The tiny test model answers every image alike (measured: normal, inverted, black and noise
    images get the same boxes), so the shift is between what canary's version registered and what
    it answers; tests/unit/serving/test_prediction_drift.py feeds shifted streams to the monitor.
    """
    prom = observed_stack.prometheus
    alert_expr = next(
        rule.expr
        for p in rule_files(RULES_DIR)
        for rule in load_rule_file(p).alerts
        if rule.alert == "CxrPredictionDriftHigh"
    )
    for stage in ("production", "canary"):
        for seed in range(PREDICTION_WINDOW + PREDICTION_MIN_SAMPLES):
            reply = observed_stack.post_image(_png(normal_image(500 + seed)), role="operator", stage=stage)
            assert reply.status_code == 200, reply.text
            assert reply.headers["X-CXR-Stage"] == stage
    deadline = time.monotonic() + 30
    while not (firing := [s for s in prom.query(alert_expr) if s.labels.get("stage") == "canary"]):
        assert time.monotonic() < deadline, "CxrPredictionDriftHigh's expression never became true for canary"
        time.sleep(1)
    assert all(s.value > 0.25 for s in firing)
    production = prom.query('cxr_prediction_drift_psi{stage="production"}')
    assert production, "production's prediction drift was never scored"
    assert max(s.value for s in production) < 0.1, [(s.labels, s.value) for s in production]
    assert not [s for s in prom.query(alert_expr) if s.labels.get("stage") == "production"]
    # a drifted class finds about five times as many boxes per image as its reference says
    for s in firing:
        name = s.labels["class_name"]
        now = prom.query(f'cxr_prediction_detection_rate{{stage="canary", class_name="{name}"}}')[0].value
        then = prom.query(f'cxr_prediction_reference_detection_rate{{stage="canary", class_name="{name}"}}')
        assert now > 3 * then[0].value > 0, (name, now, then[0].value)


def test_a_training_run_failing_after_start_makes_the_training_alert_expression_true(
    observed_stack: ObservedStack, mlflow_server: Any
) -> None:
    """The MLflow exporter turns a new FAILED run into CxrTrainingRunFailed's condition."""
    from mlflow.tracking import MlflowClient

    prom = observed_stack.prometheus
    alert_expr = next(
        rule.expr
        for p in rule_files(RULES_DIR)
        for rule in load_rule_file(p).alerts
        if rule.alert == "CxrTrainingRunFailed"
    )
    before = prom.wait_for(f'cxr_training_runs{{experiment="{EXPERIMENT}", status="FAILED"}}', timeout=30)[
        0
    ].value
    assert (
        prom.query(f'cxr_registry_alias_version{{model_name="{MODEL_NAME}", alias="production"}}')[0].value
        == 1
    )

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    run = client.create_run(client.get_experiment_by_name(EXPERIMENT).experiment_id, run_name="obs-broken")
    client.set_terminated(run.info.run_id, "FAILED")

    deadline = time.monotonic() + 60
    while not (firing := [s for s in prom.query(alert_expr) if s.labels.get("experiment") == EXPERIMENT]):
        assert time.monotonic() < deadline, "CxrTrainingRunFailed's expression never became true"
        time.sleep(1)
    after = prom.query(f'cxr_training_runs{{experiment="{EXPERIMENT}", status="FAILED"}}')[0].value
    assert after == before + 1 and firing[0].value > 0


def test_the_png_report_plots_every_key_series_from_prometheus(
    observed_stack: ObservedStack, tmp_path: Path
) -> None:
    from serving.observability.report import REPORT_PANELS, render_report

    drive_mixed_traffic(observed_stack)
    observed_stack.prometheus.wait_for("stage:cxr_gateway_requests:rate5m", timeout=90)
    summary = render_report(observed_stack.prometheus, tmp_path / "report.png", minutes=10)
    assert summary.path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(summary.series_per_panel) == {p.title for p in REPORT_PANELS}
    empty = [title for title, n in summary.series_per_panel.items() if n == 0]
    assert not empty, f"report panels without data: {empty}"

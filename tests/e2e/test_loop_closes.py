"""The loop closes on one machine: data → training → GitOps promotion → canary → production
→ radiologist feedback (API and review page) → retrain fine-tuned from production → the new
version in staging.

Everything runs through the `cxr` command against a real stack (`cxr stack up` on free
loopback ports: SeaweedFS, MLflow, three tritonservers, the gateway, Prometheus, the
reconcile watcher), and every hop is asserted where a person would look: commit messages
in the stack's GitOps checkout, MLflow aliases and tags, the model block of each response,
the feedback rows in the new dataset version's manifest.

A fresh stack has no production model, so the first version goes to production by forced
promotions (as `make up`'s bootstrap does); the retrained version then takes the gated path
staging → canary (weight) → `cxr canary step` … → production.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
import yaml
from git import Repo
from mlflow import MlflowClient
from pydicom.uid import generate_uid

from tests.fixtures.browser import draw_box_and_submit
from tests.fixtures.stack import StackRun, api_keys, client_env, stack_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODEL = "cxr-detector"

# The stack's delivery policy for this test: a 30 s window and few requests, because the
# test drives tens of requests, not hours of hospital traffic; the shift limits are wide
# because two 2-epoch models on 24 phantoms disagree by chance, and this test proves the
# loop, not model quality (tests/integration/delivery proves a bad canary is rolled back).
TEST_POLICY = {
    "canary": {
        "window": "30s",
        "min_requests": 5,
        "max_error_rate": 0.02,
        "max_p95_ratio": 20.0,
        "max_detection_shift": 1000.0,
        "max_confidence_shift": 1.0,
        "min_agreement": 0.0,
        "weights": [10, 50, 100],
    },
    # the golden-set comparison runs on every canary and production promotion and its table goes
    # into the commit; two 2-epoch models differ by chance, so the margin lets any pair through
    # (tests/integration/delivery/test_golden_gate.py proves a worse model is refused)
    "golden": {"required": True, "margin": 1.0, "resamples": 200},
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackRun]:
    root = tmp_path_factory.mktemp("e2e")
    run = StackRun(
        stack_env(root / "state", root / "net-audit.jsonl"), root / "state", root / "net-audit.jsonl"
    )
    try:
        run.cxr("stack", "up", "--no-bootstrap", timeout=240)
        yield run
    finally:
        run.cxr("stack", "down", check=False, timeout=120)


def _training_config(path: Path, **changes: object) -> Path:
    recipe = yaml.safe_load(Path("training/configs/bootstrap.yaml").read_text())
    recipe.update({"name": "cxr-e2e", "imgsz": 128, "epochs": 2, "batch_per_worker": 4, **changes})
    recipe["augment"]["close_mosaic"] = 1
    recipe["eval"]["parity_images"] = 4
    path.write_text(yaml.safe_dump(recipe))
    return path


def _commit_policy(checkout: Path) -> None:
    policy_file = checkout / "k8s" / "delivery-policy.yaml"
    policy = yaml.safe_load(policy_file.read_text())
    policy["canary"].update(TEST_POLICY["canary"])
    policy["golden"].update(TEST_POLICY["golden"])
    policy_file.write_text(yaml.safe_dump(policy, sort_keys=False))
    repo = Repo(checkout)
    repo.index.add([str(policy_file)])
    repo.index.commit("e2e: short canary window for test traffic")


def _subjects(checkout: Path) -> list[str]:
    return [c.summary for c in Repo(checkout).iter_commits(max_count=30)]


def _with_new_study(dicom: bytes) -> bytes:
    """The same image as a new study, so sticky routing draws a fresh stage for it."""
    ds = pydicom.dcmread(io.BytesIO(dicom))
    ds.StudyInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _detect(client: httpx.Client, data: bytes) -> dict:
    resp = client.post("/v1/detect", content=data, headers={"Content-Type": "application/dicom"})
    assert resp.status_code == 200, resp.text
    return resp.json()


def _poll(what: str, check, timeout: float = 120.0, every: float = 1.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _canary_requests(prometheus: str) -> float:
    query = 'sum(increase(cxr_gateway_requests_total{stage="canary"}[30s]))'
    result = httpx.get(f"{prometheus}/api/v1/query", params={"query": query}, timeout=10).json()
    values = result["data"]["result"]
    return float(values[0]["value"][1]) if values else 0.0


def test_data_to_production_to_feedback_to_retrained_staging(stack: StackRun, tmp_path: Path) -> None:
    env = client_env(stack.state)
    checkout = Path(env["CXR_GITOPS_DIR"])
    mlflow = MlflowClient(tracking_uri=env["CXR_MLFLOW_URI"], registry_uri=env["CXR_MLFLOW_URI"])
    keys = api_keys(stack.state)
    _commit_policy(checkout)
    config = _training_config(tmp_path / "e2e.yaml")

    # [0] a golden set (other patients), pinned by a commit in the checkout before any dataset
    golden = tmp_path / "golden"
    stack.cxr("data", "synth", "--out", str(golden), "--n-images", "12", "--seed", "5", "--size", "512")
    stack.env["CXR_GOLDEN_MIN_IMAGES"] = "12"
    built = stack.cxr(
        "data",
        "golden",
        "build",
        "--dicom-dir",
        str(golden / "dicom"),
        "--annotations",
        str(golden / "annotations.csv"),
        "--out",
        str(tmp_path / "golden-datasets"),
        "--upload",
        "yes",
    )
    golden_version = built.stdout.strip().splitlines()[-1]
    assert _subjects(checkout)[0].startswith(f"pin golden set {golden_version}")

    # [1] data: synthetic DICOMs → fused, checked, split, versioned dataset in S3
    synth = tmp_path / "synth"
    stack.cxr("data", "synth", "--out", str(synth), "--n-images", "24", "--seed", "4", "--size", "512")
    ingest = stack.cxr(
        "data",
        "ingest",
        "--dicom-dir",
        str(synth / "dicom"),
        "--annotations",
        str(synth / "annotations.csv"),
        "--out",
        str(tmp_path / "datasets"),
        "--upload",
        "yes",
    )
    first_dataset = ingest.stdout.strip().splitlines()[-1]

    # [2] training on 2 Ray workers → a registered version with lineage
    stack.cxr(
        "train", "run", "--config", str(config), "--workers", "2", "--dataset", first_dataset, timeout=900
    )
    (v1,) = mlflow.search_model_versions(f"name='{MODEL}'")
    for tag in (
        "dataset_version",
        "git_commit",
        "config_sha256",
        "onnx_sha256",
        "map50",
        "map40",
        "parity_max_abs_diff",
    ):
        assert v1.tags.get(tag), f"lineage tag {tag} missing on version {v1.version}"
    assert v1.tags["dataset_version"] == first_dataset
    # the dataset's report, drawn at ingest and published beside it, is in the run and on the card
    card, run_id = v1.description or "", str(v1.run_id)
    assert f"/datasets/{first_dataset}/report/index.html" in card
    assert f"runs:/{run_id}/dataset_report/index.html" in card
    report_files = {Path(a.path).name for a in mlflow.list_artifacts(run_id, "dataset_report")}
    assert {"index.html", "report.json", "samples.png"} <= report_files

    # [3] a fresh stack: the first version goes to production by forced, reasoned commits
    stack.cxr("promote", v1.version, "--to", "staging")
    for stage in ("canary", "production"):
        stack.cxr("promote", v1.version, "--to", stage, "--force", "--reason", "first model of a fresh stack")
    subjects = _subjects(checkout)
    assert f"promote {MODEL} {v1.version} to production (was none)" in subjects
    assert mlflow.get_model_version_by_alias(MODEL, "production").version == v1.version
    gateway = env["CXR_GATEWAY_URL"]
    # the stack's reconcile watcher loads production (repository build + Triton load): minutes when the
    # machine is busy; polling, so a long limit costs nothing when it is not
    _poll("the gateway to be ready", lambda: httpx.get(f"{gateway}/readyz").status_code == 200, timeout=300.0)

    images = [p.read_bytes() for p in sorted((synth / "dicom").glob("*.dicom"))]
    pacs = httpx.Client(base_url=gateway, headers={"Authorization": f"Bearer {keys['pacs']}"}, timeout=60)
    served = [_detect(pacs, img) for img in images[:4]]
    assert {(r["model"]["stage"], r["model"]["version"]) for r in served} == {("production", v1.version)}

    # [4] a radiologist corrects one result; the correction is stored for retraining
    radiologist = httpx.Client(
        base_url=gateway, headers={"Authorization": f"Bearer {keys['radiologist']}"}, timeout=60
    )
    feedback = radiologist.post(
        "/v1/feedback",
        json={
            "request_id": served[0]["request_id"],
            "feedback_id": "e2e-feedback-1",
            "new_boxes": [{"class_id": 3, "box": [120.0, 200.0, 380.0, 400.0]}],
            "comment": "cardiomegaly missed",
        },
    )
    assert feedback.status_code in (200, 201), feedback.text
    assert feedback.json()["status"] == "stored"
    stored_feedback = feedback.json()["feedback_id"]  # the server's id: "e2e-feedback-1" is only idempotency
    # ... and another one on the review page, in Chromium, as radiologists do
    dicom_files = sorted((synth / "dicom").glob("*.dicom"))
    _, page_feedback = draw_box_and_submit(
        gateway,
        keys["radiologist"],
        dicom_files[1],
        class_id=3,
        comment="cardiomegaly missed (review page)",
        screenshot=tmp_path / "review.png",
    )

    # [5] the retrain DAG locally: feedback merged into a new dataset version, fine-tuned
    #     from production's weights, registered, promoted to staging by the pipeline itself; its
    #     recipe names another architecture, and fine-tuning keeps production's
    first_architecture = yaml.safe_load(config.read_text())["model"]
    other = "yolo11-slim" if first_architecture == "yolo11n" else "yolo11n"
    retrain_config = _training_config(tmp_path / "e2e-retrain.yaml", model=other)
    work = tmp_path / "pipeline"
    stack.cxr(
        "pipeline",
        "run",
        "--source",
        "latest",
        "--config",
        str(retrain_config),
        "--base-model",
        "production",
        "--workers",
        "2",
        "--run-name",
        "e2e-retrain",
        "--work-dir",
        str(work),
        timeout=1200,
    )
    summary = json.loads((work / "summary.json").read_text())
    assert summary["succeeded"] and summary["promoted"], summary
    assert summary["base_model_version"] == v1.version
    assert summary["dataset_version"] != first_dataset
    assert summary["feedback_items"] >= 2
    v2 = str(summary["model_version"])
    assert v2 != v1.version
    architectures = [
        mlflow.get_run(str(mlflow.get_model_version(MODEL, v).run_id)).data.params["model"]
        for v in (v1.version, v2)
    ]
    assert architectures == [first_architecture] * 2, architectures
    manifest = json.loads(_s3_manifest(env, summary["dataset_version"]))
    for feedback_id in (stored_feedback, page_feedback):
        assert any(feedback_id in obj for obj in manifest["source"]["feedback_objects"]), (
            feedback_id,
            manifest["source"],
        )
    assert f"promote {MODEL} {v2} to staging (was {v1.version})" in _subjects(checkout)
    assert mlflow.get_model_version_by_alias(MODEL, "staging").version == v2

    # [6] canary at 10 %, traffic, `cxr canary step` until the canary is production
    stack.cxr("promote", v2, "--to", "canary", "--force", "--reason", "e2e: tiny models, gate not meaningful")
    prometheus = env["CXR_PROMETHEUS_URL"]
    seen: set[tuple[str, str]] = set()
    for _ in range(6):
        production = yaml.safe_load((checkout / "k8s/overlays/production/model.yaml").read_text())
        if str(production["model_version"]) == v2:
            break
        # continuous traffic until Prometheus has seen enough canary requests in the window
        # (a burst before the first scrape of a new series shows no increase)
        deadline = time.monotonic() + 180
        while True:
            for img in images[:8]:
                reply = _detect(pacs, _with_new_study(img))
                seen.add((reply["model"]["stage"], reply["model"]["version"]))
            if _canary_requests(prometheus) >= TEST_POLICY["canary"]["min_requests"]:
                break
            assert time.monotonic() < deadline, f"no canary traffic reached Prometheus; served: {seen}"
        stack.cxr("canary", "step")
    assert ("canary", v2) in seen, seen
    production = yaml.safe_load((checkout / "k8s/overlays/production/model.yaml").read_text())
    assert str(production["model_version"]) == v2
    assert mlflow.get_model_version_by_alias(MODEL, "production").version == v2
    subjects = _subjects(checkout)
    assert any("canary" in s and "50" in s for s in subjects), subjects
    promoted = next(
        c
        for c in Repo(checkout).iter_commits(max_count=30)
        if c.summary.startswith(f"promote {MODEL} {v2} to production")
    )
    assert "- golden set vs production (paired): pass" in promoted.message, promoted.message
    assert f"Golden set {golden_version}" in promoted.message
    # the production Triton loads v2 (the canary step's reconcile, or the stack's watcher after it):
    # one minute on a quiet machine was once not enough in CI; polling, so the longer limit is free
    _poll(
        "production traffic on the new version",
        lambda: _detect(pacs, _with_new_study(images[0]))["model"]["version"] == v2,
        timeout=180,
    )

    # [7] `make demo` against this stack: a table of findings, SRs referencing their sources, overlays
    demo_out = tmp_path / "demo"
    shown = stack.cxr("demo", "--out", str(demo_out), "--n-images", "2").stdout
    assert "Findings per image" in shown and "STOW-RS" in shown, shown
    results = [json.loads(p.read_text()) for p in demo_out.glob("*.json")]
    assert len(results) == 2 and {(r["model"]["stage"], r["model"]["version"]) for r in results} == {
        ("production", v2)
    }, results
    srs = sorted(demo_out.glob("*-sr.dcm"))
    assert len(srs) == 2 and len(list(demo_out.glob("*-overlay.png"))) == 2
    sources = {pydicom.dcmread(p).SOPInstanceUID for p in (demo_out / "studies" / "dicom").glob("*.dicom")}
    for sr_file in srs:
        evidence = pydicom.dcmread(sr_file).CurrentRequestedProcedureEvidenceSequence[0]
        assert (
            evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID in sources
        )

    # [8] nothing left loopback during the whole loop
    attempts = stack.audit_log.read_text().splitlines() if stack.audit_log.exists() else []
    assert attempts == [], attempts


def _s3_manifest(env: dict[str, str], version: str) -> bytes:
    from data_pipeline.store import ObjectStore

    store = ObjectStore(
        env["CXR_S3_ENDPOINT"],
        env["CXR_S3_ACCESS_KEY"],
        env["CXR_S3_SECRET_KEY"],
        env["CXR_S3_BUCKET"],
        env["CXR_S3_REGION"],
    )
    data: bytes = store.get_bytes(f"datasets/{version}/manifest.json")
    return data

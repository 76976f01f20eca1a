"""The gateway applies a version's operating points: per-class thresholds by default, calibrated confidence.

The same tiny model is served twice, once bare (as a version trained before operating points)
and once with an ``operating_points.json`` beside it; the bare one's low-threshold answer is the
reference every expectation is computed from.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from core.hashing import file_sha256
from core.operating_points import CONFIG_PARAMETER, OPERATING_POINTS_FILE, OperatingPoints
from data_pipeline.classes import CLASS_NAMES
from serving.inference.operating_points import beside, from_parameters
from serving.inference.triton_repo import build_repository
from tests.unit.serving.serving_support import make_dicom, onnx_settings, write_stage_files

pytestmark = pytest.mark.unit

TEMPERATURE = 2.0
LOW = 0.05  # the reference request's threshold: well below every threshold the tests set


def _calibrated(raw: float) -> float:
    z = np.log(raw) - np.log1p(-raw)
    return float(1 / (1 + np.exp(-z / TEMPERATURE)))


def _client(model: Path, keys_file: Path, root: Path) -> TestClient:
    from serving.gateway.app import create_app

    write_stage_files(root / "gitops", production="7")
    settings = onnx_settings(model, keys_file, root, routing_poll_s=0.0)
    return TestClient(create_app(settings, use_store=False), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def bare(
    onnx_model: Path, api_keys: tuple[Path, dict[str, str]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestClient]:
    root = tmp_path_factory.mktemp("ops-bare")
    model = root / "model" / "model.onnx"
    model.parent.mkdir()
    shutil.copyfile(onnx_model, model)
    with _client(model, api_keys[0], root) as client:
        yield client


def _headers(keys: dict[str, str], role: str = "pacs") -> dict[str, str]:
    return {"Authorization": f"Bearer {keys[role]}", "Content-Type": "application/dicom"}


@pytest.fixture(scope="module")
def reference(bare: TestClient, keys: dict[str, str]) -> list[dict[str, Any]]:
    """Every detection of the bare model on the test image above LOW (raw scores)."""
    r = bare.post(f"/v1/detect?conf={LOW}", content=make_dicom(seed=3), headers=_headers(keys))
    assert r.status_code == 200, r.text
    dets: list[dict[str, Any]] = r.json()["detections"]
    assert len(dets) >= 3, "the test needs detections"
    assert all("raw_confidence" not in d for d in dets)  # no calibrator: raw scores, no extra field
    return dets


@pytest.fixture(scope="module")
def chosen(reference: list[dict[str, Any]]) -> tuple[int, float]:
    """A class of the reference answer and a threshold in its scores' widest gap (some kept, some not)."""
    counts: dict[int, list[float]] = {}
    for d in reference:
        counts.setdefault(d["class_id"], []).append(d["confidence"])
    cid = max(counts, key=lambda c: len(set(counts[c])))
    scores = sorted(set(counts[cid]))
    assert len(scores) > 1, "the test needs a class with different scores"
    gap = int(np.argmax(np.diff(scores)))  # mid-gap: no rounded score lies near the threshold
    return cid, (scores[gap] + scores[gap + 1]) / 2


def _artifact(cid: int, threshold: float, onnx_sha256: str) -> OperatingPoints:
    classes = [
        {
            "class_id": i,
            "class_name": name,
            "threshold": threshold if i == cid else 1.0,
            "rule": "sensitivity",
            "instances": 5,
            "calibrated_threshold": _calibrated(threshold) if i == cid else 1.0,
        }
        for i, name in enumerate(CLASS_NAMES)
    ]
    return OperatingPoints.model_validate(
        {
            "onnx_sha256": onnx_sha256,
            "fallback_threshold": 0.25,
            "calibration": "temperature",
            "calibrator": {"method": "temperature", "temperature": TEMPERATURE},
            "classes": classes,
        }
    )


@pytest.fixture(scope="module")
def with_points(
    onnx_model: Path,
    api_keys: tuple[Path, dict[str, str]],
    chosen: tuple[int, float],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[TestClient]:
    root = tmp_path_factory.mktemp("ops-with")
    model = root / "model" / "model.onnx"
    model.parent.mkdir()
    shutil.copyfile(onnx_model, model)
    (model.parent / OPERATING_POINTS_FILE).write_text(_artifact(*chosen, file_sha256(model)).to_json())
    with _client(model, api_keys[0], root) as client:
        yield client


def _key(d: dict[str, Any]) -> tuple[int, tuple[float, ...]]:
    return d["class_id"], tuple(round(v, 1) for v in d["box"])


def test_per_class_thresholds_apply_by_default_with_calibrated_confidence(
    with_points: TestClient,
    reference: list[dict[str, Any]],
    chosen: tuple[int, float],
    keys: dict[str, str],
) -> None:
    cid, threshold = chosen
    r = with_points.post("/v1/detect", content=make_dicom(seed=3), headers=_headers(keys))
    assert r.status_code == 200, r.text
    dets = r.json()["detections"]
    expected = {_key(d): d for d in reference if d["class_id"] == cid and d["confidence"] >= threshold}
    assert dets and {_key(d) for d in dets} == set(expected)  # only that class, only above its threshold
    assert len(dets) < len(reference)  # the thresholds did drop detections the bare model returns
    for d in dets:
        raw = expected[_key(d)]["confidence"]
        assert d["raw_confidence"] == pytest.approx(raw, abs=1e-4)
        assert d["confidence"] == pytest.approx(_calibrated(raw), abs=1e-4)
        assert d["confidence"] != pytest.approx(raw, abs=1e-3)  # the calibrated value, not the raw one


def test_a_request_threshold_overrides_them_on_the_calibrated_confidence(
    with_points: TestClient,
    reference: list[dict[str, Any]],
    chosen: tuple[int, float],
    keys: dict[str, str],
) -> None:
    request_conf = _calibrated(0.3)
    r = with_points.post(
        f"/v1/detect?conf={request_conf}", content=make_dicom(seed=3), headers=_headers(keys)
    )
    assert r.status_code == 200, r.text
    dets = r.json()["detections"]
    expected = {_key(d) for d in reference if d["confidence"] > 0.3}
    assert {_key(d) for d in dets} == expected  # every class, thresholded on what the client reads
    assert {d["class_id"] for d in dets} != {chosen[0]} or len(dets) != len(  # not the default answer
        [d for d in reference if d["class_id"] == chosen[0] and d["confidence"] >= chosen[1]]
    )
    assert all(d["confidence"] > request_conf for d in dets)


def test_models_lists_the_operating_points_or_says_there_are_none(
    with_points: TestClient, bare: TestClient, chosen: tuple[int, float], keys: dict[str, str]
) -> None:
    cid, threshold = chosen
    ops_info = with_points.get("/v1/models", headers=_headers(keys, "operator")).json()
    production = ops_info["stages"]["production"]["operating_points"]
    assert production["status"] == "applied" and production["calibration"] == "temperature"
    assert production["classes"][CLASS_NAMES[cid]]["threshold"] == pytest.approx(threshold, abs=1e-6)
    assert len(production["classes"]) == len(CLASS_NAMES)
    bare_info = bare.get("/v1/models", headers=_headers(keys, "operator")).json()
    none = bare_info["stages"]["production"]["operating_points"]
    assert none["status"] == "none" and "global threshold 0.6" in none["note"]


def test_operating_points_of_another_model_are_ignored(onnx_model: Path, tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    shutil.copyfile(onnx_model, model)
    (tmp_path / OPERATING_POINTS_FILE).write_text(_artifact(0, 0.5, "0" * 64).to_json())
    assert beside(model) is None
    (tmp_path / OPERATING_POINTS_FILE).write_text(_artifact(0, 0.5, file_sha256(model)).to_json())
    assert beside(model) is not None


def test_triton_repository_carries_them_to_the_gateway(onnx_model: Path, tmp_path: Path) -> None:
    model = tmp_path / "cache" / "model.onnx"
    model.parent.mkdir()
    shutil.copyfile(onnx_model, model)
    bare_dir = build_repository(model, tmp_path / "bare-repo", model_version="6")
    assert CONFIG_PARAMETER not in (bare_dir / "config.pbtxt").read_text()

    ops = _artifact(2, 0.4, file_sha256(model))
    (model.parent / OPERATING_POINTS_FILE).write_text(ops.to_json())
    for variant in ("python", "onnxruntime"):
        model_dir = build_repository(model, tmp_path / variant, variant=variant, model_version="7")  # type: ignore[arg-type]
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2 as mc

        config = text_format.Parse((model_dir / "config.pbtxt").read_text(), mc.ModelConfig())
        params = {k: v.string_value for k, v in config.parameters.items()}
        assert from_parameters(params) == ops  # what the Triton backend parses into the ServedModel
    assert from_parameters({}) is None and from_parameters({CONFIG_PARAMETER: "{not json"}) is None

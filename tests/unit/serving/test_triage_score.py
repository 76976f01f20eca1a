"""The triage score (core/triage.py): from the boxes, before thresholds, calibrated, max over images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from core.operating_points import OperatingPoints
from core.triage import CANDIDATE_FLOOR, head_image_score, image_score, is_priority, study_score
from data_pipeline.classes import CLASS_NAMES
from data_pipeline.geometry import LetterboxParams
from serving.inference.postprocess import to_detections

pytestmark = pytest.mark.unit

NC = len(CLASS_NAMES)
PARAMS = LetterboxParams(scale=1.0, pad_x=0, pad_y=0, src_w=128, src_h=128, dst=128)


def _head(scores: dict[int, list[tuple[int, float]]], anchors: int = 40, seed: int = 0) -> np.ndarray:
    """A raw head (4+nc, anchors): random small boxes, class scores set per anchor as given."""
    rng = np.random.default_rng(seed)
    pred = np.zeros((4 + NC, anchors), np.float32)
    pred[0:2] = rng.uniform(20, 100, (2, anchors))
    pred[2:4] = rng.uniform(4, 30, (2, anchors))
    for anchor, pairs in scores.items():
        for cid, score in pairs:
            pred[4 + cid, anchor] = score
    return pred


def _ops(**extra: Any) -> OperatingPoints:
    classes = [
        {"class_id": i, "class_name": n, "threshold": 0.9, "rule": "sensitivity", "instances": 5}
        | {"calibrated_threshold": 0.9}
        for i, n in enumerate(CLASS_NAMES)
    ]
    return OperatingPoints.model_validate({"fallback_threshold": 0.9, "classes": classes, **extra})


def test_image_score_is_the_best_box_and_zero_without_boxes() -> None:
    assert image_score([0.2, 0.7, 0.4]) == pytest.approx(0.7)
    assert image_score([]) == 0.0
    assert image_score(np.zeros(0)) == 0.0


def test_study_score_is_the_max_over_images_not_inflated_by_more_views() -> None:
    assert study_score([0.6]) == pytest.approx(0.6)  # one image: the study score is the image score
    assert study_score([0.6, 0.6, 0.6, 0.6]) == pytest.approx(0.6)  # noisy-OR would say 0.97
    assert study_score([0.1, 0.8, 0.3]) == pytest.approx(0.8)
    assert study_score([]) == 0.0


def test_priority_is_score_at_or_above_the_threshold() -> None:
    assert is_priority(0.5, 0.5) and is_priority(0.51, 0.5)
    assert not is_priority(0.49, 0.5)


def test_sub_threshold_candidates_count_although_the_operating_points_drop_every_box() -> None:
    pred = _head({3: [(2, 0.4)], 7: [(5, 0.25)]})
    ops = _ops()  # every class needs 0.9: no box is returned
    kept = to_detections(
        pred, PARAMS, CLASS_NAMES, conf_threshold=None, iou_threshold=0.7, max_det=300, operating_points=ops
    )
    assert kept == []
    assert head_image_score(pred[4:], ops) == pytest.approx(0.4)


def test_nothing_above_the_floor_scores_zero() -> None:
    pred = _head({1: [(0, CANDIDATE_FLOOR / 2)]})
    assert head_image_score(pred[4:]) == 0.0
    assert head_image_score(np.zeros((NC, 0), np.float32)) == 0.0


def test_score_is_calibrated_per_class_like_the_returned_confidence() -> None:
    # class 2's raw 0.5 calibrates high, class 5's raw 0.6 calibrates low: the calibrated max wins
    ops = _ops(
        calibrator={"method": "isotonic", "x": [0.0, 1.0], "y": [0.0, 0.2]},
        classes=[
            {
                "class_id": 2,
                "class_name": CLASS_NAMES[2],
                "threshold": 0.1,
                "rule": "sensitivity",
                "instances": 5,
                "calibrated_threshold": 0.1,
                "calibrator": {"method": "isotonic", "x": [0.0, 0.5, 1.0], "y": [0.0, 0.9, 1.0]},
            }
        ],
    )
    pred = _head({0: [(2, 0.5)], 1: [(5, 0.6)]})
    assert head_image_score(pred[4:], ops) == pytest.approx(0.9)
    assert head_image_score(pred[4:]) == pytest.approx(0.6)  # uncalibrated: the raw maximum


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_head_score_equals_the_best_calibrated_box_after_nms_at_the_floor(seed: int) -> None:
    """No second NMS is needed: the best box of each class always survives it."""
    rng = np.random.default_rng(seed)
    pred = _head({}, anchors=300, seed=seed)
    pred[4:] = rng.beta(0.3, 3.0, (NC, 300)).astype(np.float32)  # overlapping, mostly low scores
    ops = _ops(calibrator={"method": "temperature", "temperature": 2.0})
    boxes = to_detections(
        pred,
        PARAMS,
        CLASS_NAMES,
        conf_threshold=CANDIDATE_FLOOR,
        iou_threshold=0.5,
        max_det=300,
        operating_points=ops,
    )
    assert boxes
    assert head_image_score(pred[4:], ops) == pytest.approx(max(d.confidence for d in boxes), abs=1e-6)


def _non_finite_head() -> np.ndarray:
    """A real 0.95 finding (anchor 0) beside anchors an overflowing fp16 engine could emit."""
    pred = _head({0: [(3, 0.95)], 1: [(3, np.inf)], 2: [(5, 0.8)], 3: [(6, 0.7)]})
    pred[0, 2] = np.nan  # a NaN box with a plausible score
    pred[2, 3] = np.inf  # an infinitely wide box
    return pred


def test_a_non_finite_model_output_never_reaches_the_answer() -> None:
    import json

    kept = to_detections(
        _non_finite_head(), PARAMS, CLASS_NAMES, conf_threshold=0.25, iou_threshold=0.7, max_det=300
    )
    assert [(d.class_id, round(d.confidence, 2)) for d in kept] == [(3, 0.95)]
    assert all(np.isfinite(d.box).all() for d in kept)
    json.dumps([d.to_json() for d in kept], allow_nan=False)  # what the JSON response needs


def test_a_non_finite_anchor_does_not_hide_its_classs_real_finding_from_the_triage(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from serving.contract import ModelContract
    from serving.inference.backend import ServedModel
    from serving.inference.pipeline import Pipeline
    from tests.unit.serving.serving_support import onnx_settings

    settings = onnx_settings(tmp_path / "unused.onnx", tmp_path / "keys.json", tmp_path, conf_threshold=0.25)
    pipeline = Pipeline(settings, backend=None, metrics=None, cpu=None)  # type: ignore[arg-type]
    upload = SimpleNamespace(prepared=SimpleNamespace(params=PARAMS, source_size=(128, 128)))
    model = ServedModel(name="m", version="1", contract=ModelContract(class_names=CLASS_NAMES))
    uploads: list[Any] = [upload]
    detections, scores, _ = pipeline._post(_non_finite_head()[None], uploads, model, None)
    assert [d.class_id for d in detections[0]] == [3]
    assert scores == [pytest.approx(0.95)]  # the inf anchor of class 3 used to drop the class: 0.8


@pytest.mark.parametrize(
    ("score", "shown"), [(0.49996, 0.4999), (0.5, 0.5), (0.7, 0.7), (0.12345, 0.1234), (1.0, 1.0)]
)
def test_a_shown_score_is_cut_never_rounded_up(score: float, shown: float) -> None:
    from core.triage import shown_score

    assert shown_score(score) == shown

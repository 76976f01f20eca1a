"""Registration keeps how the model answered its val split: the reference of prediction drift."""

from __future__ import annotations

import numpy as np
import pytest

from core.operating_points import OperatingPoints
from core.prediction_reference import build_prediction_reference
from data_pipeline.classes import CLASS_NAMES
from training.config import EvalConfig
from training.operating_points import build_operating_points
from training.paired import ImageResult

pytestmark = pytest.mark.unit


def _image(i: int, conf: list[float], cls: list[int], correct: list[bool], gt: list[int]) -> ImageResult:
    return ImageResult(
        image_id=str(i),
        correct=np.asarray(correct, dtype=bool),
        conf=np.asarray(conf, dtype=np.float64),
        pred_cls=np.asarray(cls, dtype=np.int64),
        gt_cls=np.asarray(gt, dtype=np.int64),
    )


def _split() -> list[ImageResult]:
    """Ten images with a true class-0 box at 0.9 and a false one at 0.5 (below its operating point),
    a true class-3 box found at 0.8 in two of them, and two images without any detection."""
    images = [
        _image(
            i,
            [0.9, 0.5] + ([0.8] if i < 2 else []),
            [0, 0] + ([3] if i < 2 else []),
            [True, False, True][: 2 + (i < 2)],
            [0] + ([3] if i < 2 else []),
        )
        for i in range(10)
    ]
    return images + [_image(10 + i, [], [], [], []) for i in range(2)]


def test_the_operating_points_carry_the_answers_the_gateway_would_give_on_the_split() -> None:
    ops = build_operating_points(_split(), CLASS_NAMES, EvalConfig(calibration="none"), split="val")
    ref = ops.prediction_reference
    assert ref is not None and ref.split == "val" and ref.images == 12
    assert [c.class_name for c in ref.classes] == list(CLASS_NAMES)
    aortic, nodule = ref.classes[0], ref.classes[3]
    # class 0's threshold is 0.9 (every true box, none of the false ones): one kept per image
    assert ops.thresholds(len(CLASS_NAMES))[0] == pytest.approx(0.9)
    assert aortic.detections == 10 and aortic.count_hist[:3] == [2, 10, 0]
    assert aortic.confidence_hist[9] == 10  # returned at 0.9: the last bin
    assert nodule.detections == 2 and nodule.count_hist[:2] == [10, 2]
    assert ref.detection_rate(0) == pytest.approx(10 / 12)
    assert all(c.detections == 0 for c in ref.classes if c.class_id not in (0, 3))
    # it survives the artifact's JSON, which is what every backend reads
    assert OperatingPoints.from_json(ops.to_json()).prediction_reference == ref


def test_an_artifact_without_a_reference_keeps_its_bytes() -> None:
    ops = OperatingPoints(fallback_threshold=0.25)
    assert "prediction_reference" not in ops.to_json()
    assert OperatingPoints.from_json(ops.to_json()).prediction_reference is None


def test_an_empty_split_gives_no_reference() -> None:
    assert build_prediction_reference([], CLASS_NAMES) is None

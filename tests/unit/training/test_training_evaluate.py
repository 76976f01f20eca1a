"""Evaluation metrics on a known answer: an oracle predictor that returns the labels themselves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data_pipeline.classes import CLASS_NAMES
from data_pipeline.geometry import boxes_to_input, letterbox_params, yolo_to_xyxy
from training.config import EvalConfig
from training.dataset import DatasetRef, open_dataset_dir
from training.errors import DatasetError
from training.evaluate import evaluate

pytestmark = pytest.mark.unit


class OraclePredictor:
    """Answers with the ground-truth boxes (optionally shifted) as raw head output, image by image."""

    backend = "oracle"
    class_names = tuple(CLASS_NAMES)

    def __init__(self, dataset: DatasetRef, split: str, imgsz: int, shift: float = 0.0) -> None:
        self.imgsz = imgsz
        self.answers = []
        for image in dataset.images(split):
            rows = np.loadtxt(dataset.label_file(image), ndmin=2)
            src = 128  # tiny dataset images are 128 x 128
            boxes = boxes_to_input(yolo_to_xyxy(rows[:, 1:5], src, src), letterbox_params(src, src, imgsz))
            boxes[:, [0, 2]] += shift * (boxes[:, 2] - boxes[:, 0])[:, None]
            self.answers.append((boxes, rows[:, 0].astype(int)))
        self.cursor = 0

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if len(batch) > 1 and self.cursor >= len(self.answers):  # latency runs after the pass
            return np.zeros((len(batch), 4 + len(CLASS_NAMES), 8), dtype=np.float32)
        out = np.zeros((len(batch), 4 + len(CLASS_NAMES), 8), dtype=np.float32)
        for i in range(len(batch)):
            if self.cursor >= len(self.answers):
                break
            boxes, cls = self.answers[self.cursor]
            self.cursor += 1
            for j, (box, c) in enumerate(zip(boxes, cls, strict=True)):
                out[i, :4, j] = [
                    (box[0] + box[2]) / 2,
                    (box[1] + box[3]) / 2,
                    box[2] - box[0],
                    box[3] - box[1],
                ]
                out[i, 4 + c, j] = 0.9
        return out


@pytest.fixture
def dataset(tiny_dataset_dir: Path, tmp_path: Path) -> DatasetRef:
    return open_dataset_dir(tiny_dataset_dir, tmp_path)


def test_perfect_predictions_score_map_one_at_every_threshold(dataset: DatasetRef) -> None:
    report = evaluate(
        OraclePredictor(dataset, "test", 64), dataset, EvalConfig(), split="test", latency=False
    )
    assert report.map50 == pytest.approx(1.0, abs=0.01)
    assert report.map40 == pytest.approx(1.0, abs=0.01)
    assert report.precision == pytest.approx(1.0) and report.recall == pytest.approx(1.0)
    assert {c.class_id for c in report.per_class} <= {3, 8, 10}
    # the manifest keeps no study UID: each image is its own study, so both AUCs are one figure
    assert report.study_triage_auc == report.no_finding_auc


def test_vindr_map40_counts_boxes_that_miss_iou_half(dataset: DatasetRef) -> None:
    # shifting each box by 40% of its width gives IoU 0.6/1.4 = 0.43: a hit at 0.4, a miss at 0.5
    report = evaluate(
        OraclePredictor(dataset, "test", 64, shift=0.4), dataset, EvalConfig(), split="test", latency=False
    )
    assert report.map40 > 0.9
    assert report.map50 < 0.1


def test_plots_are_written_when_asked(dataset: DatasetRef, tmp_path: Path) -> None:
    report = evaluate(
        OraclePredictor(dataset, "val", 64),
        dataset,
        EvalConfig(),
        split="val",
        plots_dir=tmp_path,
        latency=False,
    )
    names = {Path(p).name for p in report.plots}
    assert {"PR_curve.png", "confusion_matrix_normalized.png"} <= names


def test_empty_split_is_a_dataset_error(dataset: DatasetRef) -> None:
    with pytest.raises(DatasetError, match="no images"):
        evaluate(
            OraclePredictor(dataset, "val", 64), dataset, EvalConfig(), split="nosuchsplit", latency=False
        )


def test_a_paired_comparison_on_the_same_images_sees_the_shifted_model_worse(dataset: DatasetRef) -> None:
    """evaluate() hands out each image's matches; the paired bootstrap compares two models on them."""
    from training.paired import non_inferior, paired_bootstrap

    oracle, shifted = [], []
    evaluate(
        OraclePredictor(dataset, "test", 64),
        dataset,
        EvalConfig(),
        split="test",
        latency=False,
        results=oracle,
    )
    # 60% of the width off: IoU below 0.4, every box a miss at the gate's threshold
    evaluate(
        OraclePredictor(dataset, "test", 64, shift=0.6),
        dataset,
        EvalConfig(),
        split="test",
        latency=False,
        results=shifted,
    )
    assert [r.image_id for r in oracle] == [p.stem for p in dataset.images("test")]
    comparison = paired_bootstrap(shifted, oracle, dataset.patients(), resamples=100, seed=0)
    assert comparison.overall.diff < -0.5
    assert not non_inferior(comparison, margin=0.0, min_instances=1).passed

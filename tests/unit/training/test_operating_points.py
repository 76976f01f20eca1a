"""Per-class operating points and calibration: known thresholds, ECE by hand, calibrators that help."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import pytest

from core.operating_points import (
    OPERATING_POINTS_FILE,
    Calibrator,
    ClassOperatingPoint,
    OperatingPoints,
    OperatingPointsError,
)
from data_pipeline.classes import CLASS_NAMES
from data_pipeline.geometry import boxes_to_input, letterbox_params, yolo_to_xyxy
from training.calibration import (
    ISOTONIC_FLOOR,
    Detections,
    expected_calibration_error,
    fit_calibration,
    fit_calibrator,
)
from training.config import EvalConfig
from training.dataset import DatasetRef
from training.operating_points import (
    ThresholdChoice,
    card_section,
    choose_threshold,
    operating_point_metrics,
    operating_points_on_split,
    write_operating_points,
)

pytestmark = pytest.mark.unit

# seven detections of one class, five boxes (one never detected): recall 0.2, 0.4, 0.4, 0.6, 0.6, 0.8, 0.8
SCORES = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
HITS = np.array([True, True, False, True, False, True, False])


def _choose(
    target: Literal["sensitivity", "f1"] = "sensitivity",
    sensitivity: float = 0.9,
    conf: np.ndarray = SCORES,
    correct: np.ndarray = HITS,
    instances: int = 5,
) -> ThresholdChoice:
    return choose_threshold(
        conf, correct, instances, target=target, target_sensitivity=sensitivity, fallback=0.25
    )


@pytest.mark.parametrize(
    ("target", "threshold", "recall"), [(0.8, 0.4, 0.8), (0.6, 0.6, 0.6), (0.3, 0.8, 0.4)]
)
def test_sensitivity_rule_picks_the_highest_threshold_that_reaches_the_target(
    target: float, threshold: float, recall: float
) -> None:
    choice = _choose(sensitivity=target)
    assert choice.rule == "sensitivity" and choice.target_met is True
    assert choice.threshold == pytest.approx(threshold)
    assert choice.sensitivity == pytest.approx(recall)
    kept = choice.threshold <= SCORES
    assert HITS[kept].sum() / 5 >= target  # the known sensitivity is really reached with >=


def test_unreachable_sensitivity_takes_the_best_reachable_and_says_so() -> None:
    choice = _choose(sensitivity=0.9)
    assert choice.threshold == pytest.approx(0.4) and choice.sensitivity == pytest.approx(0.8)
    assert choice.target_met is False and "out of reach" in choice.note


def test_f1_rule_picks_the_f1_maximum() -> None:
    choice = _choose(target="f1")
    # F1 at 0.4: P 4/6, R 0.8 -> 0.727, the maximum (0.6: 0.667, 0.8: 0.571)
    assert choice.rule == "f1" and choice.threshold == pytest.approx(0.4)
    assert choice.precision == pytest.approx(4 / 6)


def test_f1_rule_takes_the_highest_threshold_of_an_exact_f1_tie() -> None:
    # six boxes; at 0.4: 4 of 6 kept are hits (P 4/6, R 4/6), at 0.1: 5 of 9 (P 5/9, R 5/6): F1 2/3 both
    conf = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
    hits = np.array([True, False, True, False, True, True, False, False, True])
    choice = _choose(target="f1", conf=conf, correct=hits, instances=6)
    assert choice.threshold == pytest.approx(0.4)  # was 0.1: round-off broke the tie, 3 more false alarms
    assert choice.precision == pytest.approx(4 / 6) and choice.sensitivity == pytest.approx(4 / 6)


def test_tied_scores_are_kept_or_dropped_together() -> None:
    choice = _choose(conf=np.array([0.5, 0.5, 0.5]), correct=np.array([True, False, True]), instances=2)
    assert choice.threshold == pytest.approx(0.5) and choice.precision == pytest.approx(2 / 3)


def test_classes_without_boxes_or_hits_fall_back_to_the_global_threshold() -> None:
    none = _choose(conf=np.array([0.7]), correct=np.array([False]), instances=0)
    miss = _choose(conf=np.array([0.7]), correct=np.array([False]), instances=3)
    for choice in (none, miss):
        assert choice.rule == "fallback" and choice.threshold == 0.25
    assert "no instances" in none.note and "matched" in miss.note


def test_ece_by_hand() -> None:
    # bin (0.1, 0.2]: accuracy 0.5, confidence 0.2; bin (0.7, 0.8]: accuracy 1, confidence 0.8
    ece = expected_calibration_error(np.array([0.2, 0.2, 0.8, 0.8]), np.array([0, 1, 1, 1]), bins=10)
    assert ece == pytest.approx(0.5 * 0.3 + 0.5 * 0.2)
    assert expected_calibration_error(np.zeros(0), np.zeros(0)) is None


def _overconfident(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores sigmoid(z) of detections whose true probability is sigmoid(z / 3): far too sure."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 3.0, n)
    truth = rng.random(n) < 1 / (1 + np.exp(-z / 3))
    return 1 / (1 + np.exp(-z)), truth


def _shifted(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores whose true probability is score**3: a bias temperature scaling cannot remove."""
    rng = np.random.default_rng(seed)
    score = rng.random(n)
    return score, rng.random(n) < score**3


@pytest.mark.parametrize(("method", "sample"), [("temperature", _overconfident), ("isotonic", _shifted)])
def test_fitted_calibrator_lowers_ece_on_held_out_detections(method: str, sample: object) -> None:
    fit_scores, fit_truth = sample(4000, 0)  # type: ignore[operator]
    test_scores, test_truth = sample(4000, 1)  # type: ignore[operator]
    calibrator = fit_calibrator(fit_scores, fit_truth, method)  # type: ignore[arg-type]
    before = expected_calibration_error(test_scores, test_truth)
    after = expected_calibration_error(calibrator.apply(test_scores), test_truth)
    assert before is not None and after is not None
    assert before > 0.08 and after < before / 3
    if method == "temperature":
        assert calibrator.temperature == pytest.approx(3.0, rel=0.15)


def test_isotonic_knots_reproduce_scikit_learn() -> None:
    from sklearn.isotonic import IsotonicRegression

    scores, truth = _shifted(500, 2)
    calibrator = fit_calibrator(scores, truth, "isotonic")
    floor = ISOTONIC_FLOOR
    reference = IsotonicRegression(y_min=floor, y_max=1 - floor, out_of_bounds="clip").fit(scores, truth)
    probe = np.linspace(-0.1, 1.1, 101)
    np.testing.assert_allclose(calibrator.apply(probe), reference.predict(probe), atol=1e-12)
    # never certainty: a separable sample still maps into [floor, 1 - floor]
    separable = fit_calibrator(
        np.r_[np.full(50, 0.2), np.full(50, 0.9)], np.r_[np.zeros(50), np.ones(50)], "isotonic"
    )
    assert separable.apply(np.array([0.0, 1.0])).tolist() == [floor, 1 - floor]


def test_fit_calibration_per_class_and_out_of_fold() -> None:
    over, over_truth = _overconfident(600, 3)
    rare, rare_truth = _overconfident(10, 4)
    dets = Detections(
        conf=np.r_[over, rare],
        cls=np.r_[np.zeros(600, int), np.ones(10, int)],
        correct=np.r_[over_truth, rare_truth],
        image=np.arange(610) % 40,
    )
    fitted = fit_calibration(dets, [0, 1, 2], "temperature", min_samples=30)
    assert set(fitted.per_class) == {0}  # class 1 has too few detections: the global calibrator
    assert fitted.calibrator_for(1) == fitted.global_calibrator
    assert fitted.ece_after[0] < fitted.ece_before[0] / 2  # type: ignore[operator]
    assert fitted.samples == {0: 600, 1: 10, 2: 0} and fitted.ece_before[2] is None
    identity = fit_calibration(dets, [0], "none")
    assert identity.ece_after == identity.ece_before and identity.global_calibrator.method == "identity"


def _artifact() -> OperatingPoints:
    return OperatingPoints.model_validate(
        {
            "fallback_threshold": 0.25,
            "calibration": "temperature",
            "calibrator": {"method": "temperature", "temperature": 2.0},
            "classes": [
                {
                    "class_id": 3,
                    "class_name": "Cardiomegaly",
                    "threshold": 0.4,
                    "rule": "sensitivity",
                    "instances": 10,
                    "calibrated_threshold": 0.3,
                    "calibrator": {"method": "isotonic", "x": [0.0, 1.0], "y": [0.0, 0.5]},
                }
            ],
        }
    )


def test_artifact_thresholds_calibration_and_round_trip() -> None:
    ops = _artifact()
    thresholds = ops.thresholds(len(CLASS_NAMES))
    assert thresholds[3] == 0.4 and thresholds[0] == 0.25
    calibrated = ops.calibrate(np.array([0.8, 0.8]), np.array([3, 0]))
    assert calibrated[0] == pytest.approx(0.4)  # class 3's isotonic knots
    assert calibrated[1] == pytest.approx(1 / (1 + np.exp(-np.log(4) / 2)))  # the global temperature
    assert OperatingPoints.from_json(ops.to_json()) == ops and ops.calibrated
    with pytest.raises(OperatingPointsError):
        OperatingPoints.from_json(ops.to_json().replace('"format_version":1', '"format_version":99'))
    with pytest.raises(ValueError):
        Calibrator(method="isotonic", x=[0.0, 1.0], y=[0.5, 0.1])


class NoisyOracle:
    """Every true box at score 0.9, plus one false box per image at 0.6: known operating points."""

    backend = "oracle"
    class_names = tuple(CLASS_NAMES)

    def __init__(self, dataset: DatasetRef, split: str, imgsz: int) -> None:
        self.imgsz = imgsz
        self.answers = []
        for image in dataset.images(split):
            rows = np.loadtxt(dataset.label_file(image), ndmin=2)
            boxes = boxes_to_input(yolo_to_xyxy(rows[:, 1:5], 128, 128), letterbox_params(128, 128, imgsz))
            self.answers.append((boxes, rows[:, 0].astype(int)))
        self.cursor = 0

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        out = np.zeros((len(batch), 4 + len(CLASS_NAMES), 8), dtype=np.float32)
        for i in range(len(batch)):
            boxes, cls = self.answers[self.cursor]
            self.cursor += 1
            for j, (box, c) in enumerate(zip(boxes, cls, strict=True)):
                w, h = box[2] - box[0], box[3] - box[1]
                out[i, :4, j] = [box[0] + w / 2, box[1] + h / 2, w, h]
                out[i, 4 + c, j] = 0.9
            out[i, :4, 7] = [4, 4, 4, 4]  # a false box in a corner, as class 3
            out[i, 4 + 3, 7] = 0.6
        return out


def test_operating_points_on_the_val_split(dataset: DatasetRef, tmp_path: Path) -> None:
    cfg = EvalConfig(calibration="isotonic", calibration_min_samples=2)
    ops = operating_points_on_split(
        NoisyOracle(dataset, "val", 64), dataset, cfg, onnx_sha256="abc", split="val"
    )
    by_id = {c.class_id: c for c in ops.classes}
    assert len(ops.classes) == len(CLASS_NAMES) and ops.onnx_sha256 == "abc"
    present = {c.class_id for c in ops.classes if c.instances}
    assert present and present <= {3, 8, 10}
    for cid in present:  # every box found at 0.9: the highest threshold reaching 0.9 sensitivity is 0.9
        assert by_id[cid].threshold == pytest.approx(0.9, abs=1e-6) and by_id[cid].sensitivity == 1.0
    assert by_id[0].rule == "fallback" and by_id[0].threshold == cfg.conf_threshold
    # class 3's false boxes at 0.6 are all wrong: calibration drives them towards 0
    assert by_id[3].ece_before is not None and by_id[3].ece_after < by_id[3].ece_before  # type: ignore[operator]
    assert ops.calibrate(np.array([0.6]), np.array([3]))[0] < 0.1
    path = write_operating_points(ops, tmp_path)
    assert path.name == OPERATING_POINTS_FILE and OperatingPoints.from_json(path.read_text()) == ops
    metrics = operating_point_metrics(ops)
    assert metrics["val/threshold/cardiomegaly"] == pytest.approx(0.9, abs=1e-6)
    assert "val/ece_after/cardiomegaly" in metrics and "val/ece_after_mean" in metrics
    section = card_section(ops)
    assert "Cardiomegaly" in section and "isotonic" in section and ops.sha256() in section


def test_training_writes_them_beside_the_onnx_and_into_the_card(
    exported: Path, dataset: DatasetRef, tmp_path: Path
) -> None:
    """The run's step on the real exported model: artifact, tags, MLflow names, card section."""
    from mlflow.utils.validation import _validate_metric_name

    from core.hashing import file_sha256
    from serving.inference.operating_points import beside
    from training.config import TrainConfig
    from training.evaluate import evaluate
    from training.export import ExportResult
    from training.model_card import render_model_card
    from training.operating_points import operating_point_tags
    from training.predictors import OrtPredictor
    from training.run import _operating_points

    onnx = tmp_path / "onnx" / "model.onnx"
    onnx.parent.mkdir()
    onnx.write_bytes(exported.read_bytes())  # the session's export stays untouched
    export = ExportResult(onnx, file_sha256(onnx), 17, 64, 0.0, 1)
    config = TrainConfig(imgsz=64)
    ops = _operating_points(config, dataset, export)
    assert ops is not None and ops.onnx_sha256 == export.sha256 and ops.split == "val"
    assert ops.dataset_version == dataset.version and ops.calibration == config.eval.calibration
    assert beside(onnx) == ops  # what the gateway and the repository builder will read
    for name in operating_point_metrics(ops):
        _validate_metric_name(name)
    tags = operating_point_tags(ops)
    assert tags["operating_points_sha256"] == ops.sha256() and all(len(v) <= 5000 for v in tags.values())

    report = evaluate(OrtPredictor.load(onnx), dataset, config.eval, split="test", latency=False)
    card = render_model_card(
        config=config,
        dataset=dataset,
        run_name="run",
        git_commit="abc",
        epochs_completed=1,
        torch_report=report,
        onnx_report=report,
        export=export,
        operating_points=ops,
    )
    assert "## Operating points and calibration (split `val`)" in card and ops.sha256() in card
    assert "| study-level triage AUC (worklist score) |" in card

    class NoVal:
        version = dataset.version

        def images(self, split: str) -> list[Path]:
            return []

    assert _operating_points(config, NoVal(), export) is None  # type: ignore[arg-type]


class SecondOpinionOracle(NoisyOracle):
    """Every true box's anchor also scores "Aortic enlargement" (class 0, never in the tiny dataset)
    at 0.5: the gateway keeps only an anchor's best class (serving/inference/postprocess.py)."""

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        out = super().__call__(batch)
        found = out[:, 5:, :].max(axis=1) >= 0.9  # the anchors holding a true box (classes 1..13)
        out[:, 4, :] = np.where(found, 0.5, out[:, 4, :])
        return out


def test_operating_points_see_the_detections_the_gateway_serves_one_class_per_anchor(
    dataset: DatasetRef,
) -> None:
    """The thresholds, calibration and drift reference are chosen on what the gateway would answer:
    a runner-up class on an anchor is never served, so it must not count as a class-0 detection."""
    from serving.inference.postprocess import to_detections
    from training.evaluate import preprocess

    cfg = EvalConfig(calibration="none")
    ops = operating_points_on_split(SecondOpinionOracle(dataset, "val", 64), dataset, cfg, split="val")
    served = 0
    replay = SecondOpinionOracle(dataset, "val", 64)
    for image in dataset.images("val"):
        tensor, params = preprocess(image, 64)
        raw = replay(tensor[None])[0]
        answers = to_detections(
            raw, params, tuple(CLASS_NAMES), conf_threshold=None, iou_threshold=cfg.nms_iou, max_det=300,
            operating_points=ops,
        )  # fmt: skip
        served += sum(d.class_id == 0 for d in answers)
    assert served == 0
    assert ops.prediction_reference is not None
    assert ops.prediction_reference.classes[0].detections == served  # was one per true box
    assert next(c for c in ops.classes if c.class_id == 0).samples == 0  # nor calibrated on them


def test_calibrate_returns_a_new_array_and_leaves_the_callers_scores_alone() -> None:
    """An identity global calibrator with a per-class one used to write into the caller's float64 array."""
    own = Calibrator(method="temperature", temperature=2.0)
    point = ClassOperatingPoint(
        class_id=0,
        class_name="a",
        threshold=0.3,
        rule="f1",
        instances=1,
        calibrated_threshold=0.3,
        calibrator=own,
    )
    ops = OperatingPoints(fallback_threshold=0.25, classes=[point])
    scores = np.array([0.9, 0.9])
    out = ops.calibrate(scores, np.array([0, 1]))
    assert out[0] == pytest.approx(0.75) and out[1] == 0.9
    assert scores.tolist() == [0.9, 0.9]

"""Variants other than INT8: fp16-trt is refused where TensorRT is absent, and measured like any
variant where its providers exist (the CPU provider stands in for them here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from core.hashing import file_sha256
from core.operating_points import OPERATING_POINTS_FILE, OperatingPoints
from training.config import EvalConfig
from training.dataset import DatasetRef
from training.errors import TrainingError
from training.evaluate import evaluate
from training.predictors import OrtPredictor
from training.variants import build_variant, measure_variant

pytestmark = pytest.mark.unit


def test_fp16_trt_without_tensorrt_is_refused_saying_where_it_can_be_built(
    exported: Path, dataset: DatasetRef, tmp_path: Path
) -> None:
    fp32 = evaluate(OrtPredictor.load(exported), dataset, EvalConfig(), split="test", latency=False)
    with pytest.raises(TrainingError, match=r"TensorrtExecutionProvider.*GPU machine with onnxruntime-gpu"):
        build_variant("fp16-trt", exported, tmp_path / "trt", dataset, EvalConfig(), fp32)
    with pytest.raises(TrainingError, match="fp32 is the version's own export"):
        build_variant("fp32", exported, tmp_path / "fp32", dataset, EvalConfig(), fp32)


def test_a_provider_variant_is_the_stamped_fp32_graph_measured_with_its_own_operating_points(
    exported: Path, dataset: DatasetRef, tmp_path: Path
) -> None:
    config = EvalConfig(conf_threshold=0.01)  # the tiny fixture model is unsure: count its weak findings
    fp32 = evaluate(OrtPredictor.load(exported), dataset, config)
    built = measure_variant(
        "fp16-trt", exported, tmp_path / "v", dataset, config, fp32, providers=["CPUExecutionProvider"]
    )
    model = built.folder / "model.onnx"
    meta = {p.key: p.value for p in onnx.load(str(model)).metadata_props}
    assert meta["cxr_variant"] == "fp16-trt"
    assert built.figures.sha256 == file_sha256(model) != file_sha256(exported)
    # the same graph on the same provider: no drop and identical scores, so any figure the gate
    # reads on a GPU machine comes from TensorRT, not from this code
    assert built.figures.map50_drop == pytest.approx(0.0, abs=1e-9)
    assert built.figures.score_max_abs_diff == pytest.approx(0.0, abs=1e-6)
    assert built.figures.finding_agreement == 1.0  # of the findings counted just below
    from training.variants import parity, parity_images

    images = parity_images(dataset, 32)
    assert images == dataset.images("test")[:32]  # never the val images INT8 is calibrated on
    assert parity(OrtPredictor.load(exported), OrtPredictor.load(model), images, config).findings > 0
    ops = OperatingPoints.from_json((built.folder / OPERATING_POINTS_FILE).read_text())
    assert ops.onnx_sha256 == built.figures.sha256
    tags = built.figures.tags()
    assert tags["variants"] == "fp32,fp16-trt" and tags["variant_fp16_trt_sha256"] == built.figures.sha256


def test_finding_agreement_counts_what_each_side_reports_that_the_other_does_not() -> None:
    from training.variants import _same_findings

    fp32 = np.array([[0, 0, 10, 10, 0.9, 1], [20, 20, 30, 30, 0.8, 2]], dtype=np.float32)
    moved = np.array([[1, 1, 11, 11, 0.7, 1], [20, 20, 30, 30, 0.6, 3]], dtype=np.float32)  # 2nd: other class
    assert _same_findings(fp32, fp32, 0.5) == 2
    assert _same_findings(fp32, moved, 0.5) == 1
    assert _same_findings(fp32, moved[:0], 0.5) == 0
    far = np.array([[5, 5, 15, 15, 0.9, 1]], dtype=np.float32)  # IoU 25/175 with the first
    assert _same_findings(fp32[:1], far, 0.5) == 0


def test_parity_of_a_model_with_itself_is_exact_and_of_a_blind_copy_is_zero_agreement(
    exported: Path, dataset: DatasetRef
) -> None:
    from training.variants import parity

    model = OrtPredictor.load(exported)
    images = dataset.images("val")[:4]
    low = EvalConfig(conf_threshold=0.01)  # the tiny fixture model is unsure: count its weak findings
    same = parity(model, model, images, low)
    assert (same.score_max_abs_diff, same.finding_agreement, same.images) == (0.0, 1.0, 4)
    assert same.findings > 0

    class Blind:
        imgsz = model.imgsz

        def __call__(self, batch: np.ndarray) -> np.ndarray:
            out = model(batch)
            out[:, 4:] = 0.0  # a conversion that lost every score
            return out

    broken = parity(model, Blind(), images, low)  # type: ignore[arg-type]
    assert broken.findings > 0 and broken.finding_agreement == 0.0
    assert broken.score_max_abs_diff > 0.0

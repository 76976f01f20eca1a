"""Variants other than INT8: fp16-trt is refused where TensorRT is absent, and measured like any
variant where its providers exist (the CPU provider stands in for them here)."""

from __future__ import annotations

from pathlib import Path

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
    config = EvalConfig()
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
    ops = OperatingPoints.from_json((built.folder / OPERATING_POINTS_FILE).read_text())
    assert ops.onnx_sha256 == built.figures.sha256
    tags = built.figures.tags()
    assert tags["variants"] == "fp32,fp16-trt" and tags["variant_fp16_trt_sha256"] == built.figures.sha256

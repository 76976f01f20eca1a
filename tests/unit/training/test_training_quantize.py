"""Optional INT8 export: calibrated on dataset images, contract kept, head decoding in float, never silent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from core.operating_points import OPERATING_POINTS_FILE, OperatingPoints
from training.config import EvalConfig
from training.dataset import DatasetRef
from training.errors import TrainingError
from training.evaluate import evaluate, preprocess
from training.predictors import OrtPredictor
from training.quantize import quantize_int8

pytestmark = pytest.mark.unit


def _images(dataset: DatasetRef) -> list[Path]:
    return (dataset.images("val") + dataset.images("test"))[:4]


def test_int8_model_is_quantized_keeps_the_contract_and_scores_in_float(
    exported: Path, dataset: DatasetRef, tmp_path: Path
) -> None:
    images = _images(dataset)
    result = quantize_int8(exported, tmp_path / "model.int8.onnx", images)

    proto = onnx.load(str(result.onnx_path))
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    meta = {p.key: p.value for p in proto.metadata_props}
    source_meta = {p.key: p.value for p in onnx.load(str(exported)).metadata_props}
    assert meta["cxr_contract"] == source_meta["cxr_contract"]
    assert meta["cxr_quantization"] == "int8-static-qdq"
    # the output comes straight from a float node of the head, not from a DequantizeLinear
    producer = next(n for n in proto.graph.node if proto.graph.output[0].name in n.output)
    assert producer.op_type != "DequantizeLinear"
    assert result.float_nodes > 0

    fp32, int8 = OrtPredictor.load(exported), OrtPredictor.load(result.onnx_path)
    assert int8.imgsz == fp32.imgsz and int8.class_names == fp32.class_names
    batch = np.stack([preprocess(p, fp32.imgsz)[0] for p in images])
    a, b = fp32(batch), int8(batch)
    assert a.shape == b.shape
    assert result.max_abs_diff == pytest.approx(float(np.abs(a - b).max()), rel=1e-5)
    # class scores (rows 4..) stay float sigmoids: int8 moves them, not by a uint8 step over 0..imgsz
    assert float(np.abs(a[:, 4:] - b[:, 4:]).max()) < 0.2
    assert meta["cxr_variant"] == "int8"  # the gateway names the variant that answered from this

    report = evaluate(int8, dataset, EvalConfig(), split="test", latency=False)
    assert 0.0 <= report.map50 <= 1.0


def test_int8_without_calibration_images_is_a_clear_error(exported: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="calibration needs at least one image"):
        quantize_int8(exported, tmp_path / "model.int8.onnx", [])


def test_training_run_builds_the_int8_variant_only_when_asked_with_its_figures_as_tags(
    exported: Path, dataset: DatasetRef, tmp_path: Path
) -> None:
    from core.hashing import file_sha256
    from training.config import TrainConfig
    from training.export import ExportResult
    from training.run import _quantize_and_evaluate

    export = ExportResult(exported, file_sha256(exported), 17, 64, 0.0, 1)
    fp32_report = evaluate(OrtPredictor.load(exported), dataset, EvalConfig(), split="test")
    off = TrainConfig()
    assert _quantize_and_evaluate(off, dataset, export, fp32_report, tmp_path) is None
    on = TrainConfig.model_validate({"eval": {"int8": True, "int8_calibration_images": 3}})
    got = _quantize_and_evaluate(on, dataset, export, fp32_report, tmp_path)
    assert got is not None
    outcome = got.outcome
    assert outcome.result.calibration_images == 3 and outcome.result.onnx_path == got.folder / "model.onnx"
    assert outcome.result.sha256 != export.sha256
    assert outcome.report.backend == "onnx" and outcome.fp32_report is fp32_report
    summary, metrics = outcome.summary(), outcome.metrics()
    assert summary["map50"] == outcome.report.map50 and "int8/map50_drop" in metrics
    # the variant's own operating points, measured on the INT8 file (the gateway checks the sha256)
    ops = OperatingPoints.from_json((got.folder / OPERATING_POINTS_FILE).read_text())
    assert ops.onnx_sha256 == outcome.result.sha256
    tags = got.figures.tags()
    assert tags["variants"] == "fp32,int8" and tags["variant_int8_sha256"] == outcome.result.sha256
    assert float(tags["variant_int8_map50_drop"]) == pytest.approx(
        fp32_report.map50 - outcome.report.map50, abs=1e-6
    )
    assert float(tags["variant_int8_map40_drop"]) == pytest.approx(
        fp32_report.map40 - outcome.report.map40, abs=1e-6
    )
    from training.variants import parity, parity_images

    checked = parity(
        OrtPredictor.load(exported),
        OrtPredictor.load(outcome.result.onnx_path),
        parity_images(dataset, 3),
        EvalConfig(),
    )
    assert float(tags["variant_int8_score_max_abs_diff"]) == pytest.approx(
        checked.score_max_abs_diff, abs=1e-6
    )
    assert got.figures.tags(carried="fp32,int8")["variants"] == "fp32,int8"  # rebuilt: not listed twice

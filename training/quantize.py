"""INT8 post-training quantization of the exported ONNX: the ``int8`` serving variant's file.

ONNX Runtime's static quantization (``onnxruntime.quantization``, QDQ format,
per-channel int8 weights, uint8 activations) calibrated on validation images,
with its numbers: max |fp32 ORT - int8 ORT| on raw outputs and on the class
scores, the mAP of the same evaluation code, and the drop against the fp32
export. The registry's ``onnx_sha256`` stays the fp32 file whose parity with
PyTorch passed; :mod:`training.variants` attaches the INT8 file beside it as a
variant, which a stage serves only when its file names it and the variant gate
(delivery/gates.py) has read the drop.

The detection head's decoding (DFL softmax, sigmoid, the concat of pixel boxes
with 0..1 class scores) stays in float: one uint8 scale over an output whose
values run from 0 to the input size would round every class score to zero.
Its convolutions are quantized like the rest of the network.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from core.variants import VARIANT_METADATA_KEY
from training.config import EvalConfig
from training.dataset import DatasetRef
from training.errors import TrainingError
from training.evaluate import EvalReport, evaluate, preprocess

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Int8Result:
    """The quantized file and how far it moved from the fp32 export."""

    onnx_path: Path
    sha256: str
    calibration_images: int
    max_abs_diff: float  # raw outputs, fp32 ORT vs int8 ORT, on the calibration images
    float_nodes: int  # head-decoding nodes kept in float


@dataclass(frozen=True)
class Int8Outcome:
    """An INT8 export evaluated like the fp32 one it came from."""

    result: Int8Result
    report: EvalReport
    fp32_report: EvalReport

    @property
    def map50_drop(self) -> float:
        return self.fp32_report.map50 - self.report.map50

    def summary(self) -> dict[str, object]:
        """The ``int8`` section of evaluation.json (the fp32 figures are in its ``onnx`` section)."""
        return {
            "onnx_sha256": self.result.sha256,
            "calibration_images": self.result.calibration_images,
            "max_abs_diff_vs_fp32": self.result.max_abs_diff,
            "float_head_nodes": self.result.float_nodes,
            "map50": self.report.map50,
            "map40": self.report.map40,
            "map50_95": self.report.map50_95,
            "map50_drop": self.map50_drop,
            "latency_ms_b1": self.report.latency_ms_b1,
            "latency_ms_b8": self.report.latency_ms_b8,
        }

    def metrics(self) -> dict[str, float]:
        """MLflow metrics under ``int8/``."""
        values = {
            "map50": self.report.map50,
            "map40": self.report.map40,
            "map50_drop": self.map50_drop,
            "max_abs_diff_vs_fp32": self.result.max_abs_diff,
            "latency_ms_b1": self.report.latency_ms_b1,
        }
        return {f"int8/{k}": float(v) for k, v in values.items() if v is not None}


def _head_decode_nodes(model: onnx.ModelProto) -> list[str]:
    """Non-convolution nodes of the layer that produces the graph's output (the Detect head)."""
    graph = model.graph
    output = graph.output[0].name
    producer = next((n for n in graph.node if output in n.output), None)
    if producer is None or producer.name.count("/") < 2:  # not ultralytics' naming: quantize as is
        return []
    prefix = "/".join(producer.name.split("/")[:2]) + "/"  # e.g. "/model.23/"
    return [n.name for n in graph.node if n.name.startswith(prefix) and n.op_type != "Conv"]


def _calibration_reader(tensors: list[np.ndarray], input_name: str) -> object:
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        """One letterboxed image per call, as evaluation and serving prepare it."""

        def __init__(self) -> None:
            self._items: Iterator[np.ndarray] = iter(tensors)

        def get_next(self) -> dict[str, np.ndarray] | None:
            tensor = next(self._items, None)
            return None if tensor is None else {input_name: tensor[None]}

    return _Reader()


def quantize_int8(onnx_path: Path, out_path: Path, calibration_images: list[Path]) -> Int8Result:
    """fp32 ``onnx_path`` -> int8 ``out_path`` calibrated on ``calibration_images``; contract kept."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from core.hashing import file_sha256
    from training.predictors import OrtPredictor

    if not calibration_images:
        raise TrainingError("INT8 calibration needs at least one image; the val and test splits are empty")
    fp32 = OrtPredictor.load(onnx_path)
    tensors = [preprocess(p, fp32.imgsz)[0] for p in calibration_images]  # read once: calibration and diff
    source = onnx.load(str(onnx_path))
    keep_float = _head_decode_nodes(source)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cxr-int8-") as tmp:
        # calibration writes an augmented copy of the model next to it: keep that out of the run folder
        staged = Path(tmp) / "model.onnx"
        shutil.copyfile(onnx_path, staged)
        quantize_static(
            str(staged),
            str(out_path),
            _calibration_reader(tensors, fp32.input_name),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=keep_float,
        )
    quantized = onnx.load(str(out_path))
    del quantized.metadata_props[:]
    quantized.metadata_props.extend(source.metadata_props)  # the serving contract travels with the file
    entry = quantized.metadata_props.add()
    entry.key, entry.value = "cxr_quantization", "int8-static-qdq"
    entry = quantized.metadata_props.add()
    entry.key, entry.value = VARIANT_METADATA_KEY, "int8"
    onnx.save(quantized, str(out_path))

    int8 = OrtPredictor.load(out_path)
    batch = np.stack(tensors)
    diff = float(np.abs(fp32(batch) - int8(batch)).max())
    if not np.isfinite(diff):
        raise TrainingError(f"INT8 model {out_path} produces NaN/Inf outputs; the quantization is broken")
    log.info(
        "event=int8_quantized path=%s calibration_images=%d max_abs_diff=%.4g float_nodes=%d",
        out_path,
        len(calibration_images),
        diff,
        len(keep_float),
    )
    return Int8Result(
        onnx_path=out_path,
        sha256=file_sha256(out_path),
        calibration_images=len(calibration_images),
        max_abs_diff=diff,
        float_nodes=len(keep_float),
    )


def quantize_and_evaluate(
    onnx_path: Path,
    out_path: Path,
    dataset: DatasetRef,
    eval_config: EvalConfig,
    calibration_images: int,
    fp32_report: EvalReport,
) -> Int8Outcome:
    """INT8 of ``onnx_path`` calibrated on the first val images (test ones when val is empty),
    evaluated with the same code and settings as the fp32 export whose report is ``fp32_report``.

    The training run (``eval.int8``) and ``cxr train quantize`` both go through here.
    """
    from training.predictors import OrtPredictor

    images = (dataset.images("val") or dataset.images("test"))[:calibration_images]
    result = quantize_int8(onnx_path, out_path, images)
    report = evaluate(OrtPredictor.load(result.onnx_path), dataset, eval_config)
    return Int8Outcome(result, report, fp32_report)

"""ONNX export for serving, with the model contract in its metadata and a parity check that fails loudly.

Ultralytics does the export itself (dynamic axes, its own
``names``/``imgsz``/``stride`` metadata; onnxslim's simplification only when the
recipe asks, ``eval.onnx_simplify``). This module adds the
``cxr_contract`` key the gateway reads instead of guessing, checks the graph
has the agreed names and shape, and compares raw outputs of PyTorch and ONNX
Runtime on real dataset images. NMS stays OUT of the graph: the gateway runs
it, so one exported model serves every confidence/IoU setting and the shadow
comparison sees raw scores.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.hashing import file_sha256
from training.errors import ParityError, TrainingError
from training.evaluate import preprocess
from training.predictors import OrtPredictor, TorchPredictor

log = logging.getLogger(__name__)

INPUT_NAME = "images"
OUTPUT_NAME = "output0"
PAD_VALUE = 114


@dataclass(frozen=True)
class ExportResult:
    """The exported file and the facts the registry records about it."""

    onnx_path: Path
    sha256: str
    opset: int
    imgsz: int
    parity_max_abs_diff: float
    parity_images: int


def contract(imgsz: int, class_names: tuple[str, ...]) -> dict[str, object]:
    """The ``cxr_contract`` metadata value shared with serving (see DESIGN.md, model contract)."""
    return {
        "input": INPUT_NAME,
        "output": OUTPUT_NAME,
        "layout": "xywh+cls",
        "imgsz": [imgsz, imgsz],
        "pad_value": PAD_VALUE,
        "normalize": "div255",
        "nms": "gateway",
        "class_names": list(class_names),
    }


def _check_graph(path: Path, n_classes: int) -> int:
    """The exported graph has the agreed names, a dynamic batch axis and 4 + nc output rows; returns opset."""
    import onnx

    model = onnx.load(str(path))
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    if inputs != [INPUT_NAME] or outputs[:1] != [OUTPUT_NAME]:
        raise TrainingError(
            f"exported graph has inputs {inputs} / outputs {outputs}, contract wants images/output0"
        )
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    if batch_dim.dim_param == "" and batch_dim.dim_value != 0:
        raise TrainingError(
            f"exported graph has a fixed batch of {batch_dim.dim_value}; serving needs it dynamic"
        )
    rows = model.graph.output[0].type.tensor_type.shape.dim[1].dim_value
    if rows and rows != 4 + n_classes:
        raise TrainingError(f"output0 has {rows} rows per anchor, contract wants 4 + {n_classes}")
    return int(next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")))


def _write_contract(path: Path, imgsz: int, class_names: tuple[str, ...]) -> None:
    import onnx

    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props}
    meta["cxr_contract"] = json.dumps(contract(imgsz, class_names))
    del model.metadata_props[:]
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def export_onnx(weights: Path, out_dir: Path, *, opset: int | None = None, simplify: bool = False) -> Path:
    """``best.pt`` -> ``out_dir/model.onnx`` (dynamic batch, contract in metadata).

    ``simplify`` runs onnxslim over the graph, as ultralytics does by default. Off here: ONNX
    Runtime folds constants and fuses nodes itself when it loads a session, while onnxslim's
    shape inference made the export slower in ``make up`` (the bootstrap model: 7.8 s against
    2.8-3.3 s; the runs' ``ort_latency_ms_b1`` 5.1 ms slimmed, 5.7-5.8 ms not, one run each:
    docs/benchmarks.md).
    """
    from ultralytics import YOLO

    torch_model = TorchPredictor.load(weights)
    out_dir.mkdir(parents=True, exist_ok=True)
    staged = out_dir / "export"
    if staged.exists():
        shutil.rmtree(staged)
    staged.mkdir()
    staged_weights = staged / "model.pt"
    shutil.copyfile(weights, staged_weights)  # ultralytics writes the .onnx next to the weights
    kwargs: dict[str, object] = {
        "format": "onnx",
        "dynamic": True,
        "simplify": simplify,
        "imgsz": torch_model.imgsz,
    }
    if opset is not None:
        kwargs["opset"] = opset
    produced = Path(str(YOLO(str(staged_weights)).export(device="cpu", **kwargs)))
    target = out_dir / "model.onnx"
    shutil.move(str(produced), target)
    shutil.rmtree(staged, ignore_errors=True)
    _check_graph(target, len(torch_model.class_names))
    _write_contract(target, torch_model.imgsz, torch_model.class_names)
    log.info("event=onnx_exported path=%s imgsz=%d", target, torch_model.imgsz)
    return target


def check_parity(weights: Path, onnx_path: Path, images: list[Path], *, max_abs_diff: float) -> float:
    """Max |PyTorch - ORT| over raw outputs on real images, at batch N and 1; raises :class:`ParityError`."""
    if not images:
        raise ParityError("parity check needs at least one dataset image; the split is empty")
    torch_model = TorchPredictor.load(weights)
    ort_model = OrtPredictor.load(onnx_path)
    if ort_model.imgsz != torch_model.imgsz:
        raise ParityError(f"ONNX imgsz {ort_model.imgsz} differs from the checkpoint's {torch_model.imgsz}")
    batch = np.stack([preprocess(p, torch_model.imgsz)[0] for p in images])
    expected = torch_model(batch)
    # the reference must be finite too: |NaN - x| is NaN, and ``NaN > limit`` is False, so a broken
    # checkpoint would otherwise "pass" parity and register parity_max_abs_diff=nan
    if not np.isfinite(expected).all():
        raise ParityError("PyTorch output has NaN/Inf values on the parity images: the checkpoint is broken")
    got_batch = ort_model(batch)
    got_single = np.concatenate([ort_model(batch[i : i + 1]) for i in range(len(batch))])
    for label, got in (("batch", got_batch), ("single", got_single)):
        if got.shape != expected.shape:
            raise ParityError(
                f"ONNX output shape {got.shape} ({label}) differs from PyTorch's {expected.shape}"
            )
        if not np.isfinite(got).all():
            raise ParityError(f"ONNX output ({label}) has NaN/Inf values: the export is broken")
    diff = float(max(np.abs(expected - got_batch).max(), np.abs(expected - got_single).max()))
    log.info("event=parity images=%d max_abs_diff=%.3g limit=%.3g", len(images), diff, max_abs_diff)
    if not diff <= max_abs_diff:  # written so that a NaN difference fails too
        raise ParityError(
            f"ONNX export of {weights.name} differs from PyTorch by {diff:.3g} (limit {max_abs_diff:.3g}) "
            f"on {len(images)} dataset images; refusing to register it"
        )
    return diff


def export_with_parity(
    weights: Path,
    out_dir: Path,
    images: list[Path],
    *,
    max_abs_diff: float,
    opset: int | None = None,
    simplify: bool = False,
) -> ExportResult:
    """Export, then prove parity; the file is deleted when parity fails so nothing ships it by accident."""
    path = export_onnx(weights, out_dir, opset=opset, simplify=simplify)
    try:
        diff = check_parity(weights, path, images, max_abs_diff=max_abs_diff)
    except ParityError:
        path.unlink(missing_ok=True)
        raise
    return ExportResult(
        onnx_path=path,
        sha256=file_sha256(path),
        opset=_check_graph(path, len(TorchPredictor.load(weights).class_names)),
        imgsz=OrtPredictor.load(path).imgsz,
        parity_max_abs_diff=diff,
        parity_images=len(images),
    )

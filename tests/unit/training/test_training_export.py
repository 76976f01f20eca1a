"""ONNX export: the serving contract in metadata, dynamic batch, parity that fails loudly, equal mAP."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from data_pipeline.geometry import boxes_to_source, xyxy_to_yolo
from training.config import EvalConfig
from training.dataset import DatasetRef, open_dataset_dir
from training.errors import ParityError
from training.evaluate import detections, evaluate, preprocess
from training.export import check_parity, export_onnx
from training.predictors import OrtPredictor, TorchPredictor

pytestmark = pytest.mark.unit


def test_export_records_the_serving_contract(exported: Path) -> None:
    meta = {p.key: p.value for p in onnx.load(str(exported)).metadata_props}
    contract = json.loads(meta["cxr_contract"])
    assert contract["input"] == "images" and contract["output"] == "output0"
    assert contract["imgsz"] == [64, 64] and contract["pad_value"] == 114 and contract["nms"] == "gateway"
    assert len(contract["class_names"]) == 14
    assert "names" in meta and "stride" in meta  # ultralytics' own keys are kept


def test_export_has_a_dynamic_batch_axis(exported: Path) -> None:
    model = OrtPredictor.load(exported)
    out = model(np.zeros((3, 3, 64, 64), dtype=np.float32))
    assert out.shape[:2] == (3, 18)


def test_parity_on_dataset_images_is_within_1e3(
    tiny_checkpoint: Path, exported: Path, dataset: DatasetRef
) -> None:
    diff = check_parity(tiny_checkpoint, exported, dataset.images("val")[:4], max_abs_diff=1e-3)
    assert 0 <= diff <= 1e-3


def test_onnxslim_runs_only_when_the_recipe_asks(
    tiny_checkpoint: Path, exported: Path, tmp_path: Path, dataset: DatasetRef
) -> None:
    assert EvalConfig().onnx_simplify is False  # ONNX Runtime folds the graph at load (training/export.py)
    slimmed = export_onnx(tiny_checkpoint, tmp_path, simplify=True)
    nodes = {p: len(onnx.load(str(p)).graph.node) for p in (exported, slimmed)}
    assert nodes[slimmed] < nodes[exported]  # the default export was not slimmed, and slimming works
    diff = check_parity(tiny_checkpoint, slimmed, dataset.images("val")[:2], max_abs_diff=1e-3)
    assert 0 <= diff <= 1e-3


def test_tampered_onnx_fails_parity_loudly(
    tiny_checkpoint: Path, exported: Path, dataset: DatasetRef, tmp_path: Path
) -> None:
    model = onnx.load(str(exported))
    head = [t for t in model.graph.initializer if t.name.startswith("model.23.")]  # the Detect head
    assert head, "expected the Detect head's weights in the graph"
    rng = np.random.default_rng(0)
    for tensor in head:  # a head retrained by someone else: same shapes, other values
        original = numpy_helper.to_array(tensor)
        noisy = original + rng.normal(0.0, 0.05, original.shape)
        tensor.CopyFrom(numpy_helper.from_array(noisy.astype(np.float32), tensor.name))
    tampered = tmp_path / "tampered.onnx"
    onnx.save(model, str(tampered))
    with pytest.raises(ParityError, match="refusing to register"):
        check_parity(tiny_checkpoint, tampered, dataset.images("val")[:4], max_abs_diff=1e-3)


def _pseudo_labelled(dataset: DatasetRef, model: TorchPredictor, root: Path) -> DatasetRef:
    """A copy of the test split labelled with the model's own top detections: a known, non-trivial answer."""
    dest = root / "pseudo"
    shutil.copytree(dataset.path, dest)
    for image in dataset.images("test"):
        tensor, params = preprocess(image, model.imgsz)
        det = detections(model(tensor[None]), EvalConfig(), conf=0.25)[0][:3]
        boxes = boxes_to_source(det[:, :4], params)
        yolo = xyxy_to_yolo(boxes, params.src_w, params.src_h)
        lines = [
            f"{int(c)} {x:.6f} {y:.6f} {w:.6f} {h:.6f}"
            for c, (x, y, w, h) in zip(det[:, 5], yolo, strict=True)
        ]
        (dest / "labels" / "test" / f"{image.stem}.txt").write_text("\n".join(lines) + "\n")
    return open_dataset_dir(dest, root / "work")


def test_pytorch_and_onnx_evaluations_agree_within_0005(
    tiny_checkpoint: Path, exported: Path, dataset: DatasetRef, tmp_path: Path
) -> None:
    torch_model = TorchPredictor.load(tiny_checkpoint)
    pseudo = _pseudo_labelled(dataset, torch_model, tmp_path)
    torch_report = evaluate(torch_model, pseudo, EvalConfig(), split="test", latency=False)
    onnx_report = evaluate(OrtPredictor.load(exported), pseudo, EvalConfig(), split="test", latency=False)
    assert torch_report.map50 > 0.3  # the comparison is between non-trivial scores
    assert abs(torch_report.map50 - onnx_report.map50) <= 0.005
    assert abs(torch_report.map40 - onnx_report.map40) <= 0.005
    assert abs(torch_report.map50_95 - onnx_report.map50_95) <= 0.005


class _Fixed:
    """A stand-in predictor that answers every batch with one fixed raw output per image."""

    imgsz = 64
    class_names = ("a",)

    def __init__(self, row: np.ndarray) -> None:
        self.row = row

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return np.repeat(self.row[None], len(batch), axis=0)


def test_a_non_finite_pytorch_reference_fails_parity_instead_of_passing_with_nan(
    dataset: DatasetRef, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """|NaN - x| is NaN and ``NaN > limit`` is False: a broken reference must not read as parity."""
    good = np.ones((5, 8), dtype=np.float32)
    broken = good.copy()
    broken[4, 0] = np.nan
    monkeypatch.setattr(TorchPredictor, "load", classmethod(lambda cls, path: _Fixed(broken)))
    monkeypatch.setattr(OrtPredictor, "load", classmethod(lambda cls, path, *a, **k: _Fixed(good)))
    with pytest.raises(ParityError, match="PyTorch"):
        check_parity(
            tmp_path / "best.pt", tmp_path / "model.onnx", dataset.images("val")[:2], max_abs_diff=1e-3
        )

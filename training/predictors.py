"""Two ways to run the same detector on a batch: PyTorch (ultralytics checkpoint) and ONNX Runtime.

Both take the serving contract's input (float32 [N, 3, H, W], RGB, 0..1,
letterboxed with pad 114) and return the raw head output [N, 4 + 14, A]
(cx, cy, w, h in input pixels, then class scores), so evaluation, the export
parity check and the latency numbers run one code path for both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from training.errors import TrainingError


class Predictor(Protocol):
    """A model that maps a preprocessed batch to raw detections."""

    backend: str
    imgsz: int
    class_names: tuple[str, ...]

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


@dataclass
class TorchPredictor:
    """An ultralytics checkpoint (``best.pt``) in eval mode on CPU, fused like ultralytics' own export."""

    model: Any
    imgsz: int
    class_names: tuple[str, ...]
    backend: str = "pytorch"

    @classmethod
    def load(cls, weights: Path) -> TorchPredictor:
        from ultralytics.nn.tasks import load_checkpoint

        if not weights.is_file():
            raise TrainingError(f"weights file {weights} does not exist")
        model, ckpt = load_checkpoint(weights, device="cpu", fuse=True)
        model.eval()
        args = ckpt.get("train_args") or {}
        imgsz = int(args.get("imgsz", 640))
        names = model.names if isinstance(model.names, dict) else dict(enumerate(model.names))
        return cls(model=model, imgsz=imgsz, class_names=tuple(names[i] for i in sorted(names)))

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self.model(torch.from_numpy(np.ascontiguousarray(batch)))
        out = out[0] if isinstance(out, (list, tuple)) else out
        return out.float().cpu().numpy()


@dataclass
class OrtPredictor:
    """An exported ONNX model under ONNX Runtime's CPU provider (what serving runs)."""

    session: Any
    imgsz: int
    class_names: tuple[str, ...]
    input_name: str
    backend: str = "onnx"

    @classmethod
    def load(cls, path: Path, threads: int = 0, providers: list[Any] | None = None) -> OrtPredictor:
        """``providers``: ONNX Runtime's execution providers in order (default: the CPU, as served)."""
        import onnxruntime as ort

        if not path.is_file():
            raise TrainingError(f"ONNX file {path} does not exist")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(
            str(path), sess_options=options, providers=providers or ["CPUExecutionProvider"]
        )
        meta = session.get_modelmeta().custom_metadata_map
        imgsz, names = _contract_from_metadata(meta)
        return cls(session=session, imgsz=imgsz, class_names=names, input_name=session.get_inputs()[0].name)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        out = self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})
        return np.asarray(out[0])


def _contract_from_metadata(meta: dict[str, str]) -> tuple[int, tuple[str, ...]]:
    """imgsz and class names from ``cxr_contract``, else ultralytics' own metadata keys."""
    import ast

    if "cxr_contract" in meta:
        contract = json.loads(meta["cxr_contract"])
        return int(max(contract["imgsz"])), tuple(contract["class_names"])
    imgsz = ast.literal_eval(meta.get("imgsz", "[640, 640]"))
    names = ast.literal_eval(meta.get("names", "{}"))
    return int(max(imgsz)), tuple(names[i] for i in sorted(names))


def load_predictor(path: Path) -> Predictor:
    """``.pt`` -> PyTorch, ``.onnx`` -> ONNX Runtime."""
    suffix = path.suffix.lower()
    if suffix == ".pt":
        return TorchPredictor.load(path)
    if suffix == ".onnx":
        return OrtPredictor.load(path)
    raise TrainingError(f"cannot evaluate {path}: expected a .pt checkpoint or an .onnx export")

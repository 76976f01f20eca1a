"""An untrained YOLO11n checkpoint in ultralytics' format, for export and evaluation tests.

``cls_bias`` lifts every class logit so an untrained head produces confident
detections: the tests need a model with non-empty outputs, not a good one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from data_pipeline.classes import CLASS_NAMES


def make_checkpoint(path: Path, *, imgsz: int = 64, cls_bias: float = 0.0, seed: int = 0) -> Path:
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(seed)
    model = DetectionModel("yolo11n.yaml", nc=len(CLASS_NAMES), verbose=False)
    model.names = dict(enumerate(CLASS_NAMES))
    if cls_bias:
        with torch.no_grad():
            for branch in model.model[-1].cv3:
                branch[-1].bias += cls_bias
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"model": model, "ema": None, "train_args": {"imgsz": imgsz, "task": "detect"}, "epoch": -1}, path
    )
    return path

"""The model contract between training and serving, read from the model itself.

Training writes ``cxr_contract`` into the ONNX metadata (and the Triton
repository builder copies it into the model config's parameters), so the
gateway never guesses the input size, padding or class list of the model it
talks to: a model trained at 1024 px is served at 1024 px without a config change.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_pipeline.classes import CLASS_NAMES
from serving.errors import ModelNotReady

DEFAULT_CLASS_NAMES: tuple[str, ...] = tuple(CLASS_NAMES)


@dataclass(frozen=True)
class ModelContract:
    """What the gateway must know to feed a model and read its answer."""

    imgsz: tuple[int, int] = (640, 640)
    input_name: str = "images"
    output_name: str = "output0"
    pad_value: int = 114
    class_names: tuple[str, ...] = DEFAULT_CLASS_NAMES
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """Square letterbox side: the longer of the two (the exporter uses square inputs)."""
        return max(self.imgsz)

    @classmethod
    def from_json(cls, text: str, extra: dict[str, str] | None = None) -> ModelContract:
        try:
            data = json.loads(text)
            imgsz = data.get("imgsz", [640, 640])
            if isinstance(imgsz, int):
                imgsz = [imgsz, imgsz]
            return cls(
                imgsz=(int(imgsz[0]), int(imgsz[1])),
                input_name=str(data.get("input", "images")),
                output_name=str(data.get("output", "output0")),
                pad_value=int(data.get("pad_value", 114)),
                class_names=tuple(data.get("class_names") or DEFAULT_CLASS_NAMES),
                extra=dict(extra or {}),
            )
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            raise ModelNotReady(f"model contract metadata is malformed: {exc}") from exc

    def to_json(self) -> str:
        return json.dumps(
            {
                "input": self.input_name,
                "output": self.output_name,
                "layout": "xywh+cls",
                "imgsz": list(self.imgsz),
                "pad_value": self.pad_value,
                "normalize": "div255",
                "nms": "gateway",
                "class_names": list(self.class_names),
            }
        )


def read_onnx_metadata(path: Path) -> dict[str, str]:
    """metadata_props of an ONNX file, without loading its weights into memory twice."""
    import onnx

    return metadata_of(onnx.load(str(path), load_external_data=False))


def metadata_of(model: Any) -> dict[str, str]:
    """metadata_props of a loaded ONNX ``ModelProto``."""
    return {prop.key: prop.value for prop in model.metadata_props}


def contract_from_metadata(meta: dict[str, str]) -> ModelContract:
    """The cxr_contract key if present, else ultralytics' own imgsz/names keys."""
    if "cxr_contract" in meta:
        return ModelContract.from_json(meta["cxr_contract"], extra=meta)
    imgsz = [640, 640]
    if "imgsz" in meta:
        imgsz = json.loads(meta["imgsz"].replace("(", "[").replace(")", "]"))
    names: tuple[str, ...] = DEFAULT_CLASS_NAMES
    if "names" in meta:
        import ast

        parsed = ast.literal_eval(meta["names"])  # ultralytics writes a Python dict repr
        names = tuple(parsed[i] for i in sorted(parsed))
    return ModelContract(imgsz=(int(imgsz[0]), int(imgsz[1])), class_names=names, extra=meta)


@dataclass(frozen=True)
class Detection:
    """One finding: VinDr class id/name, confidence and [x_min, y_min, x_max, y_max] in source pixels.

    ``confidence`` is calibrated when the served version has a calibrator (its operating
    points); ``raw_confidence`` then keeps the model's own score, an optional field clients
    that only read the DESIGN.md response never see change shape for.
    """

    class_id: int
    class_name: str
    confidence: float
    box: tuple[float, float, float, float]
    raw_confidence: float | None = None

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "class_id": self.class_id,
            "class_name": self.class_name,
            "confidence": round(self.confidence, 5),
            "box": [round(v, 2) for v in self.box],
        }
        if self.raw_confidence is not None:
            out["raw_confidence"] = round(self.raw_confidence, 5)
        return out

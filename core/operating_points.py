"""A model version's operating points and confidence calibration: the artifact training and serving share.

Training chooses a confidence threshold per class on the validation split (for a target
sensitivity, or the F1 maximum) and fits a calibrator there; it writes the result as
``operating_points.json`` beside the version's ONNX (so it is part of the registered
version's artifacts). The Triton repository builder copies it into the model config
(:data:`CONFIG_PARAMETER`) and the in-process ONNX backend reads it beside the model file;
the gateway then filters with the thresholds and returns the calibrated confidence.

The schema AND the calibration function live here, below both packages, so the confidence the
gateway returns is computed by the very code that measured its calibration error in training.

Thresholds are on the model's RAW score (what NMS sees): a detection is kept when its raw
score is at least its class's threshold. The calibrators are non-decreasing, so a threshold
on the raw score is also one on the calibrated confidence (``calibrated_threshold``).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from core.errors import CxrError
from core.prediction_reference import PredictionReference

#: the artifact's file name, beside ``model.onnx`` in the run's ``onnx/`` artifacts and in the caches
OPERATING_POINTS_FILE = "operating_points.json"
#: the Triton model-config parameter that carries the artifact's JSON to the gateway
CONFIG_PARAMETER = "cxr_operating_points"
FORMAT_VERSION: Literal[1] = 1
_EPS = 1e-7

Target = Literal["sensitivity", "f1"]
CalibrationMethod = Literal["temperature", "isotonic", "none"]


class OperatingPointsError(CxrError):
    """An operating-points artifact is malformed or of a format this code does not read."""


class Calibrator(BaseModel):
    """A non-decreasing map from the model's raw score to P(the detection is a true finding).

    ``temperature``: sigmoid(logit(score) / T). ``isotonic``: piecewise-linear through the
    knots (``x`` raw scores, ``y`` calibrated values), clipped outside them, exactly what
    scikit-learn's ``IsotonicRegression(out_of_bounds="clip").predict`` computes.
    """

    model_config = ConfigDict(frozen=True)

    method: Literal["identity", "temperature", "isotonic"] = "identity"
    temperature: float = Field(default=1.0, gt=0)
    x: list[float] = []
    y: list[float] = []

    @model_validator(mode="after")
    def _knots(self) -> Calibrator:
        if self.method == "isotonic":
            if len(self.x) != len(self.y) or len(self.x) < 1:
                raise ValueError("an isotonic calibrator needs as many knots x as values y (at least one)")
            if np.any(np.diff(self.x) < 0) or np.any(np.diff(self.y) < 0):
                raise ValueError("isotonic knots must be sorted and their values non-decreasing")
        return self

    def apply(self, scores: np.ndarray) -> np.ndarray:
        """Calibrated confidences (float64) of raw scores."""
        s = np.asarray(scores, dtype=np.float64)
        if self.method == "temperature":
            p = np.clip(s, _EPS, 1 - _EPS)
            z = np.log(p) - np.log1p(-p)
            return np.asarray(1.0 / (1.0 + np.exp(-z / self.temperature)))
        if self.method == "isotonic":
            return np.asarray(np.interp(s, self.x, self.y))
        return s


class ClassOperatingPoint(BaseModel):
    """One class's threshold, how it was chosen, and its calibration error before/after."""

    class_id: int = Field(ge=0)
    class_name: str
    threshold: float = Field(ge=0, le=1, description="raw score; kept when raw >= threshold")
    rule: Literal["sensitivity", "f1", "fallback"]
    instances: int = Field(ge=0, description="ground-truth boxes of the class in the split")
    sensitivity: float | None = None  # recall at the IoU, at the threshold, on the split
    precision: float | None = None
    target_met: bool | None = None  # the sensitivity rule: was the target reachable
    calibrated_threshold: float = Field(ge=0, le=1, description="the threshold on the returned scale")
    calibrator: Calibrator | None = None  # None: the artifact's global calibrator
    samples: int = Field(default=0, ge=0, description="detections the calibration error was measured on")
    ece_before: float | None = None
    ece_after: float | None = None
    note: str = ""


class OperatingPoints(BaseModel):
    """The artifact: per-class thresholds, calibrators and calibration errors of one model (format 1)."""

    format_version: Literal[1] = FORMAT_VERSION
    onnx_sha256: str = ""  # the model these were measured on; a mismatch means they belong to another
    dataset_version: str = ""
    split: str = "val"
    iou: float = 0.4
    target: Target = "sensitivity"
    target_sensitivity: float | None = 0.9
    fallback_threshold: float = Field(ge=0, le=1, description="classes without instances in the split")
    calibration: CalibrationMethod = "none"
    calibration_min_conf: float = 0.0
    calibration_min_samples: int = 0
    ece_bins: int = 10
    calibrator: Calibrator = Calibrator()  # global: classes with too few samples for their own
    classes: list[ClassOperatingPoint] = []
    ece_before: float | None = None  # mean over classes with samples
    ece_after: float | None = None
    # how the model answered the split at these points (core/prediction_reference.py); optional, so
    # an artifact written before it still reads, and such a version simply has no prediction drift
    prediction_reference: PredictionReference | None = None

    # ------------------------------------------------------------------ reading

    @classmethod
    def from_json(cls, text: str | bytes) -> OperatingPoints:
        """Parse the artifact; anything malformed or of another format is an :class:`OperatingPointsError`."""
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise OperatingPointsError(
                f"operating points are malformed or of an unknown format: {exc}"
            ) from exc

    def to_json(self) -> str:
        """Compact, key-sorted JSON: the same artifact always gives the same bytes (and hash).

        An artifact without a prediction reference leaves the key out, so the bytes (and the
        sha256 registered with it) of every artifact written before the block existed stay the same.
        """
        data = self.model_dump(mode="json")
        if data.get("prediction_reference") is None:
            data.pop("prediction_reference", None)
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    def sha256(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    # ------------------------------------------------------------------ applying

    def _by_id(self) -> dict[int, ClassOperatingPoint]:
        return {c.class_id: c for c in self.classes}

    def thresholds(self, num_classes: int) -> np.ndarray:
        """Raw-score threshold per class id 0..num_classes-1 (the fallback for classes not listed)."""
        out = np.full(num_classes, self.fallback_threshold, dtype=np.float64)
        for c in self.classes:
            if c.class_id < num_classes:
                out[c.class_id] = c.threshold
        return out

    def calibrator_for(self, class_id: int) -> Calibrator:
        point = self._by_id().get(class_id)
        return point.calibrator if point is not None and point.calibrator is not None else self.calibrator

    def calibrate(self, scores: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """Calibrated confidence of each raw score, by its class's calibrator (float64)."""
        s = np.asarray(scores, dtype=np.float64)
        c = np.asarray(classes).astype(np.int64)
        # a copy: the identity calibrator returns its input, and the per-class writes below must
        # never reach the caller's array (np.asarray does not copy a float64 one)
        out = np.array(self.calibrator.apply(s), dtype=np.float64, copy=True)
        for point in self.classes:
            if point.calibrator is None:
                continue
            mask = c == point.class_id
            if mask.any():
                out[mask] = point.calibrator.apply(s[mask])
        return out

    @property
    def calibrated(self) -> bool:
        """Whether the confidence the gateway returns differs from the raw score."""
        return self.calibrator.method != "identity" or any(
            c.calibrator is not None and c.calibrator.method != "identity" for c in self.classes
        )

    def tag(self) -> str:
        """A short registry tag: the rule, the calibrator and the mean ECE before -> after."""
        rule = f"sensitivity>={self.target_sensitivity}" if self.target == "sensitivity" else "f1-max"
        ece = (
            f" ece {self.ece_before:.4f}->{self.ece_after:.4f}"
            if self.ece_before is not None and self.ece_after is not None
            else ""
        )
        return f"v{self.format_version} {rule} on {self.split}; calibration {self.calibration}{ece}"

    def summary(self) -> dict[str, Any]:
        """What ``/v1/models`` lists: the rule, the calibration and every class's thresholds."""
        return {
            "format_version": self.format_version,
            "target": self.target,
            "target_sensitivity": self.target_sensitivity,
            "split": self.split,
            "iou": self.iou,
            "calibration": self.calibration,
            "fallback_threshold": self.fallback_threshold,
            "ece_before": self.ece_before,
            "ece_after": self.ece_after,
            "classes": {
                c.class_name: {
                    "class_id": c.class_id,
                    "threshold": round(c.threshold, 6),
                    "calibrated_threshold": round(c.calibrated_threshold, 6),
                    "rule": c.rule,
                    "instances": c.instances,
                    "sensitivity": c.sensitivity,
                    "precision": c.precision,
                    "ece_before": c.ece_before,
                    "ece_after": c.ece_after,
                }
                for c in sorted(self.classes, key=lambda c: c.class_id)
            },
        }

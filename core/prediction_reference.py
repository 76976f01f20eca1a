"""What a model version's answers looked like on its validation split: the reference of prediction drift.

Input drift (``data_pipeline.drift``) only sees the images; a model whose detections of one class
collapse, or whose confidences slide, on images that look as usual raises nothing there. So
registration records, per class, how the EXPORTED model answered the validation split at its
operating points (the very detections and calibrated confidences the gateway would return), and
the gateway compares a sliding window of its own answers with it
(:mod:`serving.inference.prediction_drift`).

The reference rides inside ``operating_points.json`` (:class:`core.operating_points.OperatingPoints`,
key ``prediction_reference``): that artifact already travels with the version to every backend
(beside the ONNX, in Triton's ``config.pbtxt``) and is measured on the same split with the same
thresholds, so no new plumbing can carry a reference of another model. It is optional: a version
registered before it simply has no prediction drift score.

Histograms are stored as COUNTS, not proportions, so the scorer knows each side's sample size and
can smooth accordingly. The bins are fixed here and copied into the reference, so the gateway bins
its window with the edges the reference was built with even if these defaults change later.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

#: the returned (calibrated) confidence, ten equal-width bins, as ``data_pipeline.drift`` bins confidences
CONFIDENCE_EDGES: tuple[float, ...] = tuple(round(i / 10, 1) for i in range(11))
#: lower edges of the bins of "detections of one class in one image": 0, 1, 2, 3-4, 5-9, ... 100+.
#: A finding is mostly absent, sometimes once or twice in an image; the log-spaced tail keeps a model
#: that floods an image with boxes distinguishable from one that returns a few.
COUNT_EDGES: tuple[int, ...] = (0, 1, 2, 3, 5, 10, 20, 50, 100)


def count_bins(counts: np.ndarray, edges: Sequence[int]) -> np.ndarray:
    """The bin index of each per-image detection count (the last bin is open-ended)."""
    return np.searchsorted(np.asarray(edges), np.asarray(counts), side="right") - 1


def confidence_bins(confidences: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """The bin index of each confidence; 1.0 falls in the last bin, anything outside is clipped in."""
    idx = np.searchsorted(np.asarray(edges), np.asarray(confidences, dtype=np.float64), side="right") - 1
    return np.clip(idx, 0, len(edges) - 2)


class ClassPredictionReference(BaseModel):
    """One class on the split: how often it was detected and with which confidences."""

    model_config = ConfigDict(frozen=True)

    class_id: int = Field(ge=0)
    class_name: str
    detections: int = Field(ge=0, description="detections kept at the class's operating point")
    count_hist: list[int] = Field(description="images per bin of the class's detections in one image")
    confidence_hist: list[int] = Field(description="kept detections per bin of the returned confidence")


class PredictionReference(BaseModel):
    """Per-class detection counts and confidence histograms of one model on one split (format 1)."""

    model_config = ConfigDict(frozen=True)

    format_version: Literal[1] = 1
    split: str = "val"
    images: int = Field(ge=1)
    count_edges: list[int] = list(COUNT_EDGES)
    confidence_edges: list[float] = list(CONFIDENCE_EDGES)
    classes: list[ClassPredictionReference]

    @model_validator(mode="after")
    def _shapes(self) -> PredictionReference:
        if len(self.count_edges) < 2 or self.count_edges[0] != 0 or np.any(np.diff(self.count_edges) <= 0):
            raise ValueError("count_edges must start at 0 and increase")
        if len(self.confidence_edges) < 2 or np.any(np.diff(self.confidence_edges) <= 0):
            raise ValueError("confidence_edges must increase")
        for c in self.classes:
            if len(c.count_hist) != len(self.count_edges):
                raise ValueError(f"class {c.class_name}: count_hist needs one entry per count edge")
            if len(c.confidence_hist) != len(self.confidence_edges) - 1:
                raise ValueError(f"class {c.class_name}: confidence_hist needs one entry per confidence bin")
            if sum(c.count_hist) != self.images:
                raise ValueError(f"class {c.class_name}: count_hist must count every one of the images")
            if sum(c.confidence_hist) != c.detections:
                raise ValueError(f"class {c.class_name}: confidence_hist must count every detection")
        return self

    def detection_rate(self, class_id: int) -> float:
        """Mean detections of the class per image on the split (0 for a class not listed)."""
        for c in self.classes:
            if c.class_id == class_id:
                return c.detections / self.images
        return 0.0


def build_prediction_reference(
    images: Sequence[Sequence[tuple[int, float]]],
    class_names: Sequence[str],
    *,
    split: str = "val",
) -> PredictionReference | None:
    """The reference of a split from each image's kept detections as ``(class_id, returned confidence)``.

    ``images`` holds one entry per image of the split, empty for an image without detections (those
    are what makes a detection RATE). None for an empty split: nothing to compare with.
    """
    if not images:
        return None
    n_classes = len(class_names)
    count_hist = np.zeros((n_classes, len(COUNT_EDGES)), dtype=np.int64)
    conf_hist = np.zeros((n_classes, len(CONFIDENCE_EDGES) - 1), dtype=np.int64)
    for dets in images:
        cls = np.asarray([c for c, _ in dets], dtype=np.int64).reshape(-1)
        conf = np.asarray([s for _, s in dets], dtype=np.float64).reshape(-1)
        known = (cls >= 0) & (cls < n_classes)
        cls, conf = cls[known], conf[known]
        per_class = np.bincount(cls, minlength=n_classes)
        count_hist[np.arange(n_classes), count_bins(per_class, COUNT_EDGES)] += 1
        np.add.at(conf_hist, (cls, confidence_bins(conf, CONFIDENCE_EDGES)), 1)
    return PredictionReference(
        split=split,
        images=len(images),
        classes=[
            ClassPredictionReference(
                class_id=cid,
                class_name=name,
                detections=int(conf_hist[cid].sum()),
                count_hist=count_hist[cid].tolist(),
                confidence_hist=conf_hist[cid].tolist(),
            )
            for cid, name in enumerate(class_names)
        ],
    )

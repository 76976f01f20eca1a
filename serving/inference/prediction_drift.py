"""Prediction drift per stage: a sliding window of what the model ANSWERED vs its validation split.

Input drift (:mod:`serving.inference.drift`) watches the images; this watches the answers. Each
stage keeps a window of the last ``CXR_PREDICTION_DRIFT_WINDOW`` images it answered at the served
version's operating points: per image, how many detections of each class, and the confidence of
each. Every ``CXR_PREDICTION_DRIFT_MIN_SAMPLES`` images the window is scored, per class, against
the reference registration took from the same model on its validation split
(``OperatingPoints.prediction_reference``, :mod:`core.prediction_reference`):

* ``count`` PSI: the distribution of "detections of this class in one image" (so a class that
  vanishes, or floods images with boxes, moves it; "no detection" is a bin of its own);
* ``confidence`` PSI: the distribution of the returned (calibrated) confidences of the class,
  scored only once the window holds ``CXR_PREDICTION_DRIFT_MIN_DETECTIONS`` of them;
* the detection rate (mean detections per image) beside the reference's, for the dashboard.

Why PSI. It is the drift index the project already uses for its inputs
(``data_pipeline.drift.psi``, reused here rather than written twice), so one scale and one set of
alert levels (< 0.1 stable, 0.1-0.25 moderate, > 0.25 drifted) covers both kinds of drift; it works
on binned counts, which is what a reference small enough to ride in ``operating_points.json`` can
keep; and unlike a Kolmogorov-Smirnov test it handles the discrete, mostly-zero count distribution
and is symmetric (a class that disappears scores like one that appears). Unlike a p-value it does
not grow with the window: a big window is not "significant" for a negligible shift.

Smoothing. A bin empty on one side would make PSI infinite, so the scorer adds half a count to
every bin that is occupied on at least one side (bins empty on both sides carry no information
and are left out, so many empty bins do not add up to a fake shift). Sampling noise alone gives a
PSI of about ``(bins - 1) * (1/n_window + 1/n_reference)``; the defaults (500 images, scored from
50, and at least 50 detections for the confidence PSI) keep it well under the 0.25 alert level.

Only answers at the operating points are compared (a request with its own ``conf`` changes what
is returned by design), a version without a reference has no score (its series are removed, never
an error), and a new version on a stage starts a new window: the old version's answers say
nothing about the new reference.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from core.prediction_reference import PredictionReference, confidence_bins, count_bins
from data_pipeline.drift import psi

log = logging.getLogger(__name__)

#: pseudo-count added to every bin occupied on either side before PSI (Jeffreys' prior)
SMOOTHING = 0.5


def smoothed_psi(reference: Sequence[float], window: Sequence[float]) -> float:
    """PSI of two count histograms over the same bins, smoothed as the module docstring says."""
    ref = np.asarray(reference, dtype=np.float64)
    win = np.asarray(window, dtype=np.float64)
    occupied = (ref > 0) | (win > 0)
    if occupied.sum() < 2 or ref.sum() == 0 or win.sum() == 0:
        return 0.0  # one shared bin (or an empty side): nothing to compare
    return max(0.0, psi((ref[occupied] + SMOOTHING).tolist(), (win[occupied] + SMOOTHING).tolist()))


@dataclass(frozen=True)
class ClassDrift:
    """One class of one window against the reference."""

    class_id: int
    class_name: str
    count_psi: float
    confidence_psi: float | None  # None: too few detections in the window or the reference
    detection_rate: float  # detections per image in the window
    reference_rate: float  # detections per image on the validation split
    detections: int


@dataclass(frozen=True)
class PredictionDriftReport:
    stage: str
    model_version: str
    images: int
    classes: tuple[ClassDrift, ...]

    @property
    def score(self) -> float:
        """The largest PSI of any class and kind (0 without classes)."""
        values = [c.count_psi for c in self.classes]
        values += [c.confidence_psi for c in self.classes if c.confidence_psi is not None]
        return max(values, default=0.0)


def score_window(
    reference: PredictionReference,
    images: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    min_detections: int,
    stage: str = "",
    model_version: str = "",
) -> PredictionDriftReport:
    """Score a window of answers, each ``(class ids, confidences)`` of one image, against ``reference``."""
    n_bins_count = len(reference.count_edges)
    n_bins_conf = len(reference.confidence_edges) - 1
    ids = [c.class_id for c in reference.classes]
    size = max(ids, default=-1) + 1
    count_hist = np.zeros((size, n_bins_count), dtype=np.int64)
    conf_hist = np.zeros((size, n_bins_conf), dtype=np.int64)
    for cls, conf in images:
        known = (cls >= 0) & (cls < size)
        cls, conf = cls[known], conf[known]
        per_class = np.bincount(cls, minlength=size)
        count_hist[np.arange(size), count_bins(per_class, reference.count_edges)] += 1
        np.add.at(conf_hist, (cls, confidence_bins(conf, reference.confidence_edges)), 1)
    n = len(images)
    classes = []
    for ref in reference.classes:
        cid = ref.class_id
        detections = int(conf_hist[cid].sum())
        enough = detections >= min_detections and ref.detections >= min_detections
        classes.append(
            ClassDrift(
                class_id=cid,
                class_name=ref.class_name,
                count_psi=smoothed_psi(ref.count_hist, count_hist[cid].tolist()),
                confidence_psi=smoothed_psi(ref.confidence_hist, conf_hist[cid].tolist()) if enough else None,
                detection_rate=detections / n if n else 0.0,
                reference_rate=ref.detections / reference.images,
                detections=detections,
            )
        )
    return PredictionDriftReport(stage=stage, model_version=model_version, images=n, classes=tuple(classes))


def _same(a: PredictionReference | None, b: PredictionReference | None) -> bool:
    # identity first: a backend hands out the same parsed object until the version changes
    return a is b or (a is not None and b is not None and a == b)


@dataclass
class _StageWindow:
    model_version: str
    reference: PredictionReference | None
    images: deque[tuple[np.ndarray, np.ndarray]] = field(default_factory=deque)
    since_score: int = 0


class PredictionDriftMonitor:
    """Per-stage windows of answers, scored against each served version's prediction reference.

    ``on_report`` gets every report (the gateway sets its gauges from it); ``on_reset`` is called
    with the stage when its version changes or has no reference, so stale series disappear.
    """

    def __init__(
        self,
        *,
        window: int,
        min_samples: int,
        min_detections: int,
        on_report: Callable[[PredictionDriftReport], None],
        on_reset: Callable[[str], None] | None = None,
    ) -> None:
        self.window = window
        self.min_samples = min_samples
        self.min_detections = min_detections
        self.on_report = on_report
        self.on_reset = on_reset
        self._stages: dict[str, _StageWindow] = {}
        self._lock = threading.Lock()

    def observe(
        self,
        stage: str,
        *,
        model_version: str,
        reference: PredictionReference | None,
        detections: Sequence[tuple[int, float]],
    ) -> PredictionDriftReport | None:
        """Add one image's answer (blocking: run off the event loop); rescore every ``min_samples``.

        Never raises: prediction drift is monitoring, and a broken reference must not fail a request.
        """
        try:
            return self._observe(stage, model_version, reference, detections)
        except Exception as exc:
            log.warning(
                "prediction_drift_failed stage=%s error_type=%s error=%s", stage, type(exc).__name__, exc
            )
            return None

    def _observe(
        self,
        stage: str,
        model_version: str,
        reference: PredictionReference | None,
        detections: Sequence[tuple[int, float]],
    ) -> PredictionDriftReport | None:
        with self._lock:
            state = self._stages.get(stage)
            if state is None or state.model_version != model_version or not _same(state.reference, reference):
                state = _StageWindow(model_version, reference, deque(maxlen=self.window))
                self._stages[stage] = state
                if self.on_reset is not None:
                    self.on_reset(stage)
                if reference is None:
                    log.info(
                        "prediction_drift_off stage=%s version=%s reason=no_reference", stage, model_version
                    )
            if state.reference is None:
                return None
            cls = np.fromiter((c for c, _ in detections), dtype=np.int64, count=len(detections))
            conf = np.fromiter((s for _, s in detections), dtype=np.float64, count=len(detections))
            state.images.append((cls, conf))
            state.since_score += 1
            if len(state.images) < self.min_samples or state.since_score < self.min_samples:
                return None
            state.since_score = 0
            images = list(state.images)
            ref = state.reference
        report = score_window(
            ref, images, min_detections=self.min_detections, stage=stage, model_version=model_version
        )
        with self._lock:  # a new version may have reset the stage while this one was scored
            if self._stages.get(stage) is not state:
                return None
            self.on_report(report)
        log.info(
            "prediction_drift_scored stage=%s version=%s score=%.4f window=%d",
            stage,
            model_version,
            report.score,
            report.images,
        )
        return report

"""Confidence calibration of detections: expected calibration error and the calibrators fitted on validation.

A detector's score is not a probability: "0.6" may be right 30 % of the time for one class and
90 % for another. A radiologist reads the number as "how likely is this finding real", so the
gateway returns a calibrated confidence instead, P(the detection is a true positive at IoU 0.4),
fitted on the validation split:

- ``temperature``: one temperature on the score's logit, fitted by maximum likelihood (scipy's
  bounded scalar minimiser). Keeps the ranking and the shape; cannot shift a biased detector.
- ``isotonic``: scikit-learn's ``IsotonicRegression`` (the maintained pool-adjacent-violators
  implementation), any non-decreasing map; needs more samples.

The fitted parameters are stored as :class:`core.operating_points.Calibrator` and applied by
its ``apply``, the same function the gateway runs. ECE uses equal-width bins over the
detections' confidences: sum over bins of |bin| / n * |accuracy(bin) - mean confidence(bin)|.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from core.operating_points import CalibrationMethod, Calibrator

log = logging.getLogger(__name__)

_EPS = 1e-7
_LOG_T_BOUNDS = (float(np.log(0.05)), float(np.log(20.0)))


def expected_calibration_error(conf: np.ndarray, correct: np.ndarray, bins: int = 10) -> float | None:
    """ECE with ``bins`` equal-width bins on [0, 1]; None when there is nothing to measure."""
    c = np.asarray(conf, dtype=np.float64)
    y = np.asarray(correct, dtype=np.float64)
    if c.size == 0:
        return None
    # bin i holds (i/bins, (i+1)/bins]; 0 falls into the first bin
    index = np.clip(np.ceil(c * bins).astype(int) - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        mask = index == b
        n = int(mask.sum())
        if n:
            total += n / c.size * abs(float(y[mask].mean()) - float(c[mask].mean()))
    return total


def _fit_temperature(conf: np.ndarray, correct: np.ndarray) -> Calibrator:
    from scipy.optimize import minimize_scalar

    p = np.clip(conf.astype(np.float64), _EPS, 1 - _EPS)
    z = np.log(p) - np.log1p(-p)
    y = correct.astype(np.float64)

    def nll(log_t: float) -> float:
        scaled = z / np.exp(log_t)
        # -[y log s + (1-y) log(1-s)] with s = sigmoid(scaled), written stably
        return float(np.mean(np.logaddexp(0.0, scaled) - y * scaled))

    best = minimize_scalar(nll, bounds=_LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-4})
    return Calibrator(method="temperature", temperature=float(np.exp(best.x)))


ISOTONIC_FLOOR = 0.01


def _fit_isotonic(conf: np.ndarray, correct: np.ndarray) -> Calibrator:
    from sklearn.isotonic import IsotonicRegression

    # Bounded away from 0 and 1: a validation split of a few hundred detections cannot show that
    # a finding is certain (or impossible), and a radiologist reads "1.00" as certainty.
    model = IsotonicRegression(
        y_min=ISOTONIC_FLOOR, y_max=1 - ISOTONIC_FLOOR, increasing=True, out_of_bounds="clip"
    )
    model.fit(conf.astype(np.float64), correct.astype(np.float64))
    return Calibrator(
        method="isotonic",
        x=[float(v) for v in model.X_thresholds_],
        y=[float(v) for v in model.y_thresholds_],
    )


def fittable(correct: np.ndarray, min_samples: int) -> bool:
    """Enough detections, and both outcomes among them (one outcome alone says nothing about the map)."""
    y = np.asarray(correct, dtype=bool)
    return y.size >= min_samples and bool(y.any()) and not bool(y.all())


def fit_calibrator(conf: np.ndarray, correct: np.ndarray, method: CalibrationMethod) -> Calibrator:
    """Fit ``method`` to detections (raw score, is it a true positive); ``none`` is the identity."""
    c = np.asarray(conf, dtype=np.float64)
    y = np.asarray(correct, dtype=bool)
    if method == "none" or c.size == 0:
        return Calibrator()
    if method == "temperature":
        return _fit_temperature(c, y)
    return _fit_isotonic(c, y)


@dataclass(frozen=True)
class Detections:
    """Detections of one split, flattened: raw score, class, true positive at IoU 0.4, and source image."""

    conf: np.ndarray
    cls: np.ndarray
    correct: np.ndarray
    image: np.ndarray  # index of the image each detection came from (for the folds)

    def where(self, mask: np.ndarray) -> Detections:
        return Detections(self.conf[mask], self.cls[mask], self.correct[mask], self.image[mask])


@dataclass(frozen=True)
class FittedCalibration:
    """The global calibrator, the per-class ones, and each class's ECE before and after."""

    global_calibrator: Calibrator
    per_class: dict[int, Calibrator]
    samples: dict[int, int]
    ece_before: dict[int, float | None]
    ece_after: dict[int, float | None]

    def calibrator_for(self, class_id: int) -> Calibrator:
        return self.per_class.get(class_id, self.global_calibrator)


def _fit_all(
    dets: Detections, classes: Sequence[int], method: CalibrationMethod, min_samples: int
) -> tuple[Calibrator, dict[int, Calibrator]]:
    """One global calibrator on all detections, and one per class that has enough of its own."""
    if method == "none":
        return Calibrator(), {}
    both = fittable(dets.correct, 2)
    global_cal = fit_calibrator(dets.conf, dets.correct, method) if both else Calibrator()
    per_class = {}
    for cid in classes:
        mask = dets.cls == cid
        if fittable(dets.correct[mask], min_samples):
            per_class[int(cid)] = fit_calibrator(dets.conf[mask], dets.correct[mask], method)
    return global_cal, per_class


def fit_calibration(
    dets: Detections,
    classes: Sequence[int],
    method: CalibrationMethod,
    *,
    min_samples: int = 30,
    bins: int = 10,
    folds: int = 2,
) -> FittedCalibration:
    """Fit on every detection given; measure "after" out of fold, so memorising the split earns nothing.

    The calibrators returned are fitted on all of ``dets``. The ECE after calibration is
    measured on detections whose calibrator did NOT see them: images are split into ``folds``
    groups, each group calibrated by calibrators fitted on the others, exactly as the final ones
    are (global, or per class when the class has ``min_samples`` detections of both outcomes).
    """
    global_cal, per_class = _fit_all(dets, classes, method, min_samples)
    out_of_fold = dets.conf.astype(np.float64).copy()
    if method != "none" and folds > 1 and dets.conf.size:
        fold_of = dets.image % folds
        for k in range(folds):
            held = fold_of == k
            g, pc = _fit_all(dets.where(~held), classes, method, min_samples)
            for cid in np.unique(dets.cls[held]):
                mask = held & (dets.cls == cid)
                out_of_fold[mask] = pc.get(int(cid), g).apply(dets.conf[mask])
    samples, before, after = {}, {}, {}
    for cid in classes:
        mask = dets.cls == cid
        samples[int(cid)] = int(mask.sum())
        before[int(cid)] = expected_calibration_error(dets.conf[mask], dets.correct[mask], bins)
        after[int(cid)] = expected_calibration_error(out_of_fold[mask], dets.correct[mask], bins)
    log.info(
        "event=calibration_fitted method=%s per_class=%d detections=%d",
        method,
        len(per_class),
        dets.conf.size,
    )
    return FittedCalibration(global_cal, per_class, samples, before, after)

"""The study-level abnormality score: one definition for the gateway and for evaluation.

A worklist sorts studies by "how likely is something abnormal here", and evaluation reports how
well that score separates studies with findings from "No finding" ones (``study_triage_auc``).
Both must compute the very same number, so the definition lives here, below serving and training:

- **Image score**: the highest confidence over the image's candidate boxes after NMS, 0 when
  there is none. Candidates are every box above :data:`CANDIDATE_FLOOR` (evaluation's own
  candidate threshold), taken BEFORE the per-class operating points drop boxes: a study whose boxes
  all lie below their class thresholds must still rank above a study with nothing at all, or the
  score of every "quiet" study would be 0 and its AUC would measure nothing. In the gateway the
  confidence is the calibrated one it returns (the version's operating points), in evaluation the
  model's raw score (operating points are chosen on val after the test evaluation).
- **Study score**: the maximum over the study's images. Not noisy-OR (1 - prod(1 - p)): that
  treats the views as independent evidence, which they are not (a PA and a lateral show the same
  chest), so a study with many views would be inflated towards 1 without any more finding. The
  maximum equals the image score for a one-image study, so study and image level agree there.
- **Priority**: ``score >= threshold`` (``CXR_TRIAGE_THRESHOLD``).

NMS never suppresses the highest-scoring box of a class (it is the one the others are compared
with), so the maximum over post-NMS candidates equals the maximum over the raw head's anchors
above the floor; :func:`head_image_score` therefore needs no second NMS.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from core.operating_points import OperatingPoints

#: candidates below this are not boxes at all; the same floor as evaluation's NMS (``conf=0.001``)
CANDIDATE_FLOOR = 0.001


def image_score(confidences: Iterable[float] | np.ndarray) -> float:
    """An image's score: the highest confidence of its candidate boxes, 0.0 when it has none."""
    values = np.asarray(list(confidences) if not isinstance(confidences, np.ndarray) else confidences)
    return float(values.max()) if values.size else 0.0


def study_score(image_scores: Iterable[float]) -> float:
    """A study's score: the highest of its images' scores (0.0 for a study without images)."""
    return image_score(image_scores)


def shown_score(score: float) -> float:
    """The score as answers carry it: 4 decimals, cut, not rounded.

    Rounded, 0.49996 read 0.5 beside a priority threshold of 0.5 while the study was not
    priority (the flag compares the unrounded score). ``round(..., 9)`` first takes off the
    float noise of the scaling (0.7 * 1e4 is 6999.999999999999), which a cut would turn into 0.6999.
    """
    return math.floor(round(score * 1e4, 9)) / 1e4


def is_priority(score: float, threshold: float) -> bool:
    """Whether a score flags its study as priority (at or above the threshold)."""
    return score >= threshold


def head_image_score(
    class_scores: np.ndarray,
    operating_points: OperatingPoints | None = None,
    floor: float = CANDIDATE_FLOOR,
) -> float:
    """The image score from one image's raw class scores ``(num_classes, anchors)``.

    Each anchor is a candidate of its best class (as in the gateway's NMS); with operating points
    that calibrate, the best raw score of each class is calibrated by that class's calibrator.
    Calibrators are non-decreasing, so calibrating only the per-class maxima (at most 14 values,
    not every anchor) gives the same maximum.
    """
    if class_scores.ndim != 2 or class_scores.size == 0:
        return 0.0
    cls = class_scores.argmax(axis=0)
    conf = class_scores[cls, np.arange(class_scores.shape[1])].astype(np.float64)
    keep = conf > floor
    if not keep.any():
        return 0.0
    best = np.full(class_scores.shape[0], -np.inf)
    np.maximum.at(best, cls[keep], conf[keep])
    present = np.flatnonzero(np.isfinite(best))
    values = best[present]
    if operating_points is not None and operating_points.calibrated:
        values = operating_points.calibrate(values, present)
    return image_score(values)

"""Input drift per stage: a sliding window of what the gateway saw vs the training data.

A model degrades silently when the images change (a new detector, another
hospital's VOI defaults). Each stage keeps a ``data_pipeline.drift.DriftWindow``
of recent images and compares their intensity statistics it with the
``reference_stats.json`` of the dataset the served model was trained on, using
``compare_to_reference`` (one drift definition for the whole project). The
score is exported as ``cxr_drift_score{stage}``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from data_pipeline.drift import DriftWindow, compare_to_reference

log = logging.getLogger(__name__)

ReferenceLoader = Callable[[str], dict[str, Any] | None]


def input_reference(reference: dict[str, Any], features: dict[str, Any]) -> dict[str, Any]:
    """The part of a dataset's reference statistics that describes ``features`` of the images, only.

    ``compare_to_reference`` also scores the reference's ``class_frequency`` (boxes per image
    of each class) whenever the window holds images, against the window's detections. This window
    holds none by design, so every dataset with findings scored as heavily drifted (a PSI of
    several units on images drawn from the training distribution itself) and
    ``cxr_drift_score`` alerted on every stage. Only the compared input features are kept.
    """
    known = reference.get("features", {})
    return {"features": {name: known[name] for name in features if name in known}}


class DriftMonitor:
    def __init__(
        self,
        *,
        window: int,
        min_samples: int,
        on_score: Callable[[str, float], None],
        reference_file: Path | None = None,
        reference_loader: ReferenceLoader | None = None,
        reference_retry_s: float = 60.0,
    ) -> None:
        self.window = window
        self.min_samples = min_samples
        self.on_score = on_score
        self._windows: dict[str, DriftWindow] = {}
        self._refs: dict[str, dict[str, Any] | None] = {}
        self._reference_file = reference_file
        self._loader = reference_loader
        #: a reference that failed to load (the store down) is asked for again after this long
        self.reference_retry_s = reference_retry_s
        self._retry_at: dict[str, float] = {}
        self._since_score: dict[str, int] = {}
        self._lock = threading.Lock()

    def _reference(self, dataset_version: str) -> dict[str, Any] | None:
        """The dataset's reference statistics, loaded once; None when it has none.

        A load that fails (the store briefly down) is not remembered as "no reference": it was,
        and drift went unscored for that dataset version until the gateway restarted. It is
        tried again after ``reference_retry_s``.
        """
        key = dataset_version or "_file"
        if key in self._refs:
            return self._refs[key]
        if time.monotonic() < self._retry_at.get(key, 0.0):
            return None
        ref: dict[str, Any] | None = None
        try:
            if self._reference_file is not None and self._reference_file.exists():
                ref = json.loads(self._reference_file.read_text())
            elif dataset_version and self._loader is not None:
                ref = self._loader(dataset_version)
        except Exception as exc:  # no reference = no drift score, never a failed request
            log.warning("drift_reference_unavailable dataset=%s error=%s", dataset_version, exc)
            self._retry_at[key] = time.monotonic() + self.reference_retry_s
            return None
        self._refs[key] = ref
        return ref

    def observe(
        self,
        stage: str,
        *,
        mean: float,
        std: float,
        width: int,
        height: int,
        dataset_version: str = "",
    ) -> float | None:
        """Add one image (blocking: run off the event loop); rescore every ``min_samples`` images.

        Only what comes IN is compared (intensity): the model's own boxes differ
        between stages by design and would make a canary look like drift.
        """
        with self._lock:
            window = self._windows.setdefault(stage, DriftWindow(self.window))
            window.add(mean, width, height, intensity_std=std)
            self._since_score[stage] = self._since_score.get(stage, 0) + 1
            if len(window) < self.min_samples or self._since_score[stage] < self.min_samples:
                return None
            self._since_score[stage] = 0
            stats = window.stats()
        reference = self._reference(dataset_version)
        if reference is None:
            return None
        try:
            # intensity only: image sizes vary with the sending modality's settings far more
            # than with what the model sees after the letterbox
            features = {"intensity_mean": stats.intensity_means, "intensity_std": stats.intensity_stds}
            score = float(
                compare_to_reference(
                    input_reference(reference, features), features, min_samples=self.min_samples
                ).score
            )
        except Exception as exc:  # a malformed reference must not break serving
            log.warning("drift_score_failed stage=%s error=%s", stage, exc)
            return None
        self.on_score(stage, score)
        log.info("drift_scored stage=%s score=%.4f window=%d", stage, score, stats.n_images)
        return score

"""Drift: a window like the reference scores low, a shifted one scores high."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipeline.drift import (
    DriftWindow,
    build_reference,
    compare_to_reference,
    intensity_mean_std,
    level_histogram,
    psi,
)

pytestmark = pytest.mark.unit


def _reference(rng: np.random.Generator) -> dict:
    n = 2000
    boxes = rng.uniform(0.2, 0.4, size=(800, 2))
    boxes = np.hstack([boxes, boxes + rng.uniform(0.05, 0.2, size=(800, 2))])
    return build_reference(
        intensity_means=rng.normal(0.5, 0.05, n).tolist(),
        intensity_stds=rng.normal(0.2, 0.02, n).tolist(),
        widths=rng.integers(1800, 3000, n).tolist(),
        heights=rng.integers(1800, 3000, n).tolist(),
        class_ids=rng.integers(0, 14, 800).tolist(),
        boxes_norm=boxes,
        pixel_histogram=rng.integers(0, 1000, 64).tolist(),
        n_images=n,
    )


def _window(rng: np.random.Generator, mean: float, size: int) -> DriftWindow:
    window = DriftWindow(size=500)
    for _ in range(300):
        dets = [(int(rng.integers(0, 14)), (0.3 * size, 0.3 * size, 0.42 * size, 0.42 * size))]
        window.add(float(rng.normal(mean, 0.05)), int(rng.integers(size - 50, size + 50)), size, dets)
    return window


def test_same_distribution_is_stable_and_shifted_intensity_is_drift() -> None:
    rng = np.random.default_rng(0)
    reference = _reference(rng)
    same = compare_to_reference(reference, _window(rng, 0.5, 2400).stats())
    shifted = compare_to_reference(reference, _window(rng, 0.7, 2400).stats())
    assert same.per_feature["intensity_mean"].psi < 0.1
    assert shifted.per_feature["intensity_mean"].psi > 0.25
    assert shifted.per_feature["intensity_mean"].ks > same.per_feature["intensity_mean"].ks
    assert shifted.score > same.score


def test_smaller_images_show_up_as_size_drift() -> None:
    rng = np.random.default_rng(1)
    reference = _reference(rng)
    report = compare_to_reference(reference, _window(rng, 0.5, 1024).stats())
    assert report.per_feature["image_height"].psi > 0.25


def test_a_quiet_window_does_not_raise_the_score() -> None:
    rng = np.random.default_rng(2)
    reference = _reference(rng)
    window = DriftWindow()
    window.add(0.95, 500, 500)
    report = compare_to_reference(reference, window.stats(), min_samples=20)
    assert report.score == 0.0
    assert report.per_feature["intensity_mean"].n == 1


def test_psi_is_zero_for_identical_and_positive_for_different_distributions() -> None:
    assert psi([0.25, 0.25, 0.5], [0.25, 0.25, 0.5]) == pytest.approx(0.0)
    assert psi([0.25, 0.25, 0.5], [0.5, 0.25, 0.25]) > 0.1


def test_feature_named_window_in_either_argument_order_scores_the_same() -> None:
    rng = np.random.default_rng(4)
    reference = _reference(rng)
    means = rng.normal(0.7, 0.05, 200).tolist()
    stds = rng.normal(0.2, 0.02, 200).tolist()
    window = {"intensity_mean": means, "intensity_std": stds}
    forward = compare_to_reference(reference, window)
    backward = compare_to_reference(window, reference)  # type: ignore[arg-type]
    assert forward.score == backward.score > 0.25
    assert forward.per_feature["intensity_std"].n == 200


def test_compare_accepts_the_stats_as_a_plain_dict() -> None:
    rng = np.random.default_rng(3)
    reference = _reference(rng)
    stats = _window(rng, 0.5, 2400).stats()
    as_dict = {k: getattr(stats, k) for k in stats.__dataclass_fields__}
    assert compare_to_reference(reference, as_dict).score == compare_to_reference(reference, stats).score


def test_mean_and_std_from_the_level_histogram_match_numpy_on_the_pixels() -> None:
    """The gateway and the dataset builder take intensity statistics from one histogram: same numbers."""
    rng = np.random.default_rng(3)
    for image in (
        rng.integers(0, 256, (301, 257), dtype=np.uint8),
        np.full((64, 64), 200, np.uint8),
        (rng.normal(60, 25, (128, 96)).clip(0, 255)).astype(np.uint8),
    ):
        mean, std = intensity_mean_std(level_histogram(image))
        assert mean == pytest.approx(float(image.mean()) / 255.0, abs=1e-9)
        assert std == pytest.approx(float(image.std()) / 255.0, abs=1e-9)

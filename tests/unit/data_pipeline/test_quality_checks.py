"""Quality checks: blank/saturated/small images, near duplicates, label problems."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from data_pipeline.config import QualityThresholds
from data_pipeline.quality import check_images, check_labels, image_stats, near_duplicate_groups

pytestmark = pytest.mark.unit


def _texture(seed: int, size: int = 256) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (16, 16)).astype(np.uint8)
    import cv2

    return cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)


def test_blank_saturated_small_and_odd_aspect_images_fail() -> None:
    t = QualityThresholds()
    stats = [
        image_stats("ok", _texture(0), 2000, 2400),
        image_stats("blank", np.full((256, 256), 90, np.uint8), 2000, 2400),
        image_stats("saturated", np.where(_texture(1) > 100, 255, 0).astype(np.uint8), 2000, 2400),
        image_stats("small", _texture(2), 200, 180),
        image_stats("strip", _texture(3), 3000, 500),
    ]
    failures = check_images(stats, t)
    assert failures["blank"] == ["blank"]
    assert "saturated" in failures["saturated"]
    assert failures["too_small"] == ["small"]
    assert failures["extreme_aspect"] == ["strip"]
    assert all("ok" not in ids for ids in failures.values())


def test_near_duplicates_are_grouped_and_distinct_images_are_not() -> None:
    base = _texture(10)
    noisy = np.clip(base.astype(int) + np.random.default_rng(0).integers(-3, 4, base.shape), 0, 255).astype(
        np.uint8
    )
    stats = [image_stats("a", base, 256, 256), image_stats("a-copy", noisy, 256, 256)]
    stats += [image_stats(f"other{k}", _texture(20 + k), 256, 256) for k in range(5)]
    groups = near_duplicate_groups(stats, QualityThresholds().duplicate_max_distance)
    assert groups == [["a", "a-copy"]]


def test_label_checks_flag_tiny_outside_and_bad_class() -> None:
    fused = pd.DataFrame(
        {
            "image_id": ["a", "b", "c", "d"],
            "class_id": [3, 8, 22, 14],
            "x_min": [10.0, 10.0, 10.0, np.nan],
            "y_min": [10.0, 10.0, 10.0, np.nan],
            "x_max": [12.0, 900.0, 50.0, np.nan],
            "y_max": [200.0, 50.0, 50.0, np.nan],
        }
    )
    failures = check_labels(fused, {"a": (500, 500), "b": (500, 500), "c": (500, 500)}, QualityThresholds())
    assert failures["tiny_box"] == ["a"]
    assert failures["box_outside_image"] == ["b"]
    assert failures["class_out_of_range"] == ["c"]

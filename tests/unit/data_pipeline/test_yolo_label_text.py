"""YOLO label lines: what reaches the training set from a fused box."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipeline.export import yolo_label_text

pytestmark = pytest.mark.unit


def test_a_box_under_one_original_pixel_is_left_out_not_written_as_a_zero_side() -> None:
    """Fused boxes can be a sliver: before, one 0.3 px wide on a 3000 px image became a label of
    width 0.000100 (and one under 0.0015 px, of width 0.000000), boxes of no region to learn."""
    boxes = np.array([[100.0, 100.0, 100.3, 180.0], [10.0, 20.0, 40.0, 20.5], [10.0, 20.0, 41.0, 60.0]])
    text = yolo_label_text(np.array([3, 5, 7]), boxes, 3000, 2500)
    assert text == "7 0.008500 0.016000 0.010333 0.016000\n"
    assert yolo_label_text(np.array([3]), boxes[:1], 3000, 2500) == ""

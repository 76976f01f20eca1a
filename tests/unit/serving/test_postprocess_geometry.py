"""Boxes come back in the ORIGINAL image's pixels, and only boxes that lie on the image at all."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipeline.geometry import letterbox_params
from serving.inference.postprocess import to_detections

pytestmark = pytest.mark.unit

NAMES = tuple(f"class {i}" for i in range(14))


def _pred(*boxes: tuple[float, float, float, float]) -> np.ndarray:
    """A (4 + 14, anchors) head output: one anchor per xywh box, class 0 at 0.9."""
    pred = np.zeros((4 + len(NAMES), len(boxes)), np.float32)
    for i, box in enumerate(boxes):
        pred[:4, i] = box
        pred[4, i] = 0.9
    return pred


@pytest.mark.parametrize("source_size", [None, (4000, 800)])
def test_a_box_in_the_letterbox_padding_is_no_finding_of_the_image(
    source_size: tuple[int, int] | None,
) -> None:
    """A wide image leaves grey bands above and below it; a box inside a band clipped to a zero-area
    line on the image's border, returned as a finding (into the JSON answer and the SR)."""
    params = letterbox_params(1000, 200, 128)  # the image fills rows 51..76 of the 128 px input
    assert (params.pad_y, params.new_h) == (51, 26)
    pred = _pred((64, 10, 20, 8), (64, 64, 20, 8), (64, 120, 30, 6), (140, 64, 6, 8))
    dets = to_detections(
        pred, params, NAMES, conf_threshold=0.5, iou_threshold=0.7, max_det=10, source_size=source_size
    )
    width, height = source_size or (1000, 200)
    assert len(dets) == 1
    x0, y0, x1, y1 = dets[0].box
    assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
    assert (x0, x1) == pytest.approx((54 / 128 * width, 74 / 128 * width))

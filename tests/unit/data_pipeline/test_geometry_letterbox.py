"""Letterbox and box mapping: same placement as ultralytics, exact round trips."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_pipeline.geometry import (
    boxes_to_input,
    boxes_to_source,
    letterbox,
    letterbox_params,
    resize_longest,
    xyxy_to_yolo,
    yolo_to_xyxy,
)

pytestmark = pytest.mark.unit

sizes = st.integers(min_value=16, max_value=4000)
targets = st.sampled_from([64, 128, 256, 320, 640, 1024])


@st.composite
def boxes_in_image(draw: st.DrawFn, width: int, height: int) -> np.ndarray:
    n = draw(st.integers(1, 6))
    rows = []
    for _ in range(n):
        x0 = draw(st.floats(0, width - 1, allow_nan=False))
        y0 = draw(st.floats(0, height - 1, allow_nan=False))
        x1 = draw(st.floats(x0 + 0.5, width, allow_nan=False))
        y1 = draw(st.floats(y0 + 0.5, height, allow_nan=False))
        rows.append([x0, y0, x1, y1])
    return np.array(rows)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), width=sizes, height=sizes, dst=targets)
def test_boxes_round_trip_source_to_input_and_back(
    data: st.DataObject, width: int, height: int, dst: int
) -> None:
    boxes = data.draw(boxes_in_image(width, height))
    params = letterbox_params(width, height, dst)
    back = boxes_to_source(boxes_to_input(boxes, params), params)
    np.testing.assert_allclose(back, boxes, atol=1e-6 * max(width, height))


@settings(max_examples=200, deadline=None)
@given(width=sizes, height=sizes, dst=targets)
def test_letterbox_keeps_aspect_and_centers_the_image(width: int, height: int, dst: int) -> None:
    p = letterbox_params(width, height, dst)
    assert max(p.new_w, p.new_h) == dst or abs(max(p.new_w, p.new_h) - dst) <= 1
    assert 0 <= p.pad_x <= dst - p.new_w and 0 <= p.pad_y <= dst - p.new_h
    assert abs((dst - p.new_w) - 2 * p.pad_x) <= 1 and abs((dst - p.new_h) - 2 * p.pad_y) <= 1
    # the image corners map onto the content's corners
    corners = boxes_to_input(np.array([[0, 0, width, height]]), p)[0]
    np.testing.assert_allclose(corners, [p.pad_x, p.pad_y, p.pad_x + p.new_w, p.pad_y + p.new_h], atol=1e-6)


@settings(max_examples=100, deadline=None)
@given(data=st.data(), width=sizes, height=sizes)
def test_mapped_boxes_are_clipped_to_the_original_image(data: st.DataObject, width: int, height: int) -> None:
    p = letterbox_params(width, height, 640)
    wild = np.array(data.draw(st.lists(st.floats(-2000, 3000, allow_nan=False), min_size=4, max_size=4)))
    out = boxes_to_source(wild.reshape(1, 4), p)[0]
    assert 0 <= out[0] <= width and 0 <= out[2] <= width
    assert 0 <= out[1] <= height and 0 <= out[3] <= height


@settings(max_examples=100, deadline=None)
@given(data=st.data(), width=sizes, height=sizes)
def test_yolo_normalization_round_trips(data: st.DataObject, width: int, height: int) -> None:
    boxes = data.draw(boxes_in_image(width, height))
    yolo = xyxy_to_yolo(boxes, width, height)
    assert ((yolo >= 0) & (yolo <= 1)).all()
    np.testing.assert_allclose(yolo_to_xyxy(yolo, width, height), boxes, atol=1e-6 * max(width, height))


def test_letterbox_matches_ultralytics_pixels_and_box_mapping() -> None:
    """Placement must equal ultralytics' own LetterBox and scale_boxes, or served boxes drift."""
    from ultralytics.data.augment import LetterBox
    from ultralytics.utils.ops import scale_boxes

    rng = np.random.default_rng(0)
    for width, height in [(2048, 2500), (3000, 1800), (333, 777), (640, 640)]:
        img = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        ours, params = letterbox(img, 640)
        theirs = LetterBox(new_shape=(640, 640), auto=False, scale_fill=False, scaleup=True, center=True)(
            image=img
        )
        np.testing.assert_array_equal(ours, theirs)
        boxes = np.array([[10.0, 20.0, 300.0, 400.0], [0.0, 0.0, 640.0, 640.0]])
        expected = scale_boxes((640, 640), boxes.copy(), (height, width))
        np.testing.assert_allclose(boxes_to_source(boxes, params), expected, atol=1e-4)


def test_letterbox_of_grey_image_keeps_rank_and_pad_value() -> None:
    img = np.full((100, 50), 7, dtype=np.uint8)
    out, params = letterbox(img, 64)
    assert out.shape == (64, 64)
    assert out[0, 0] == 114 and out[32, 32] == 7
    assert params.new_w == 32 and params.pad_x == 16


def test_resize_longest_never_upscales_and_keeps_aspect() -> None:
    img = np.zeros((3000, 1500), np.uint8)
    assert resize_longest(img, 1024).shape == (1024, 512)
    small = np.zeros((100, 50), np.uint8)
    assert resize_longest(small, 1024) is small

"""``make bench``'s serving suite: the pure helpers behind its variant figures."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.serve_bench import best_variant, ratio, to_uint8_windowed

pytestmark = pytest.mark.unit


def test_the_best_variant_is_the_fastest_whose_parity_passes() -> None:
    rps = {"fp32": 20.0, "int8": 30.0}
    assert best_variant(rps, {"fp32": 0.0, "int8": 0.05}, tolerance=0.1) == "int8"
    # a faster variant that moved the class scores too far is not served
    assert best_variant(rps, {"fp32": 0.0, "int8": 0.25}, tolerance=0.1) == "fp32"
    # a variant nobody measured never passes; nothing passing gives no figure
    assert best_variant(rps, {"fp32": 0.0}, tolerance=0.1) == "fp32"
    assert best_variant(rps, {}, tolerance=0.1) is None


def test_ratio_rounds_and_has_none_without_a_denominator() -> None:
    assert ratio(20.0, 3.0) == 6.667
    assert ratio(20.0, 0.0) is None


def test_phantoms_are_windowed_to_8_bit_as_their_dicom_window_says() -> None:
    pixels = np.array([[0, 1000, 2000, 3000, 4095]], dtype=np.uint16)
    out = to_uint8_windowed(pixels, center=2000, width=2000)
    assert out.dtype == np.uint8
    assert out[0, 0] == 0 and out[0, 1] == 0 and out[0, -1] == 255 and out[0, -2] == 255
    assert 120 <= out[0, 2] <= 135  # the center lands mid-grey

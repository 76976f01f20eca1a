"""The guarded DICOM reader: each hostile family is refused by the limit that bounds it, before pydicom."""

from __future__ import annotations

import os
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_pipeline import dicom_guard, hostile
from data_pipeline.config import DataSettings
from data_pipeline.dicom_guard import DicomLimitExceeded, DicomLimits
from data_pipeline.dicom_io import decode_bytes, read_header
from data_pipeline.errors import CorruptImage, ImageDecodeError

pytestmark = pytest.mark.unit

LIMITS = DicomLimits()


@pytest.mark.parametrize(
    ("data", "limit"),
    [
        (hostile.deep_nesting(5000), "CXR_DICOM_MAX_DEPTH"),
        (hostile.deep_nesting(50, defined=True), "CXR_DICOM_MAX_DEPTH"),
        (hostile.many_elements(20_000), "CXR_DICOM_MAX_ELEMENTS"),
        (hostile.giant_text(4 << 20), "CXR_DICOM_MAX_TEXT_BYTES"),
        (hostile.jpeg_bomb(60000, 60000), "CXR_DICOM_MAX_PIXELS"),
        (hostile.jpeg_bomb(10000, 10000, header_rows=10000, header_cols=10000), "CXR_DICOM_MAX_PIXELS"),
        (hostile.j2k_bomb(60000, 60000), "CXR_DICOM_MAX_PIXELS"),
        (hostile.deflate_bomb(200 << 20), "CXR_DICOM_MAX_INFLATED_BYTES"),
    ],
    ids=["nest-5000", "nest-50-defined", "elements", "text", "jpeg-sof", "jpeg-header", "j2k-siz", "deflate"],
)
def test_each_hostile_family_is_refused_by_its_named_limit(data: bytes, limit: str) -> None:
    with pytest.raises(DicomLimitExceeded) as caught:
        decode_bytes(data, salt="s", limits=LIMITS)
    assert caught.value.limit == limit and limit in str(caught.value)


def test_the_5000_deep_file_is_refused_without_pydicom_parsing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway was OOM-killed writing this file back; now pydicom never even reads it."""
    calls: list[int] = []
    monkeypatch.setattr(dicom_guard, "read_partial", lambda *a, **k: calls.append(1))
    with pytest.raises(DicomLimitExceeded):
        read_header(hostile.deep_nesting(5000), LIMITS)
    assert calls == []


@pytest.mark.parametrize(
    "data",
    [
        hostile.lying_length(1 << 30),
        hostile.huge_native(60000, 60000),
        hostile.truncated(hostile.valid(), 700),
    ],
    ids=["lying-length", "native-size-lies", "truncated"],
)
def test_lengths_that_point_past_the_data_are_corrupt_not_read(data: bytes) -> None:
    with pytest.raises(CorruptImage, match="remain"):
        decode_bytes(data, salt="s", limits=LIMITS)


def test_declared_size_is_checked_before_decoding_native_pixels() -> None:
    with pytest.raises(DicomLimitExceeded, match="CXR_DICOM_MAX_PIXEL_BYTES"):
        decode_bytes(hostile.valid(), salt="s", limits=DicomLimits(max_pixel_bytes=4096))
    with pytest.raises(DicomLimitExceeded, match="CXR_DICOM_MAX_FRAMES"):
        read_header(hostile.file_meta(hostile.EXPLICIT_LE) + hostile.header(frames=3), LIMITS)


def test_valid_files_and_invalid_dates_pass_the_guard() -> None:
    assert decode_bytes(hostile.valid(), salt="s", limits=LIMITS).rows == 64
    assert decode_bytes(hostile.invalid_dates(), salt="s", limits=LIMITS).cols == 64
    deflated_ok = hostile.deflate_bomb(1 << 16)  # a small deflated dataset is fine (no pixels: corrupt)
    with pytest.raises(CorruptImage, match="no pixel data"):
        decode_bytes(deflated_ok, salt="s", limits=LIMITS)


def test_every_limit_is_a_setting_with_a_safe_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXR_DICOM_MAX_DEPTH", "2")
    limits = DataSettings().dicom_limits()
    assert limits.max_depth == 2
    with pytest.raises(DicomLimitExceeded, match="CXR_DICOM_MAX_DEPTH"):
        decode_bytes(hostile.deep_nesting(3), salt="s", limits=limits)
    assert decode_bytes(hostile.deep_nesting(3), salt="s", limits=DicomLimits()).rows == 64


def test_the_fixed_corpus_ends_in_typed_errors_only() -> None:
    outcomes: dict[str, str] = {}
    for case in hostile.corpus(seed=1, mutations=30):
        try:
            decode_bytes(case.data, salt="s", limits=LIMITS)
            outcomes[case.name] = "decoded"
        except ImageDecodeError as exc:
            outcomes[case.name] = type(exc).__name__
    assert outcomes["invalid-dates"] == "decoded"
    assert all(
        v in ("decoded", "CorruptImage", "UnsupportedImage", "UnrecognisedImage", "DicomLimitExceeded")
        for v in outcomes.values()
    )


def _mutated(seed: int, flips: int, cut: int, family: int) -> bytes:
    bases: list[Any] = [
        hostile.valid(seed % 3),
        hostile.deep_nesting(1 + seed % 12),
        hostile.jpeg_bomb(8 + seed % 4000, 8),
        hostile.invalid_dates(),
    ]
    data = hostile.flipped(bases[family % len(bases)], random.Random(seed), flips)
    return data[: max(132, len(data) - cut)]


#: CI runs a short fuzz; ``CXR_FUZZ_EXAMPLES=5000`` is the long run (docs/security.md)
FUZZ_EXAMPLES = int(os.environ.get("CXR_FUZZ_EXAMPLES", "150"))


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    flips=st.integers(0, 12),
    cut=st.integers(0, 4096),
    family=st.integers(0, 3),
)
def test_fuzzed_headers_end_in_pixels_or_a_typed_error(seed: int, flips: int, cut: int, family: int) -> None:
    try:
        image = decode_bytes(_mutated(seed, flips, cut, family), salt="s", limits=LIMITS)
    except ImageDecodeError:
        return
    assert image.pixels.size == image.rows * image.cols

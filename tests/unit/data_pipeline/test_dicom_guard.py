"""The guarded DICOM reader: each hostile family is refused by the limit that bounds it, before pydicom."""

from __future__ import annotations

import io
import os
import random
import struct
import zlib
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom import dcmread

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


# ---------------------------------------------------------------------------- encodings pydicom switches to


def _implicit(group: int, elem: int, value: bytes, *, length: int | None = None) -> bytes:
    return struct.pack("<HHI", group, elem, len(value) if length is None else length) + value


def _one_item_sequence(group: int, elem: int, item_body: bytes, *, vr: bytes | None = b"SQ") -> bytes:
    """A sequence of undefined length holding one delimited item; ``vr=None``: implicit VR header."""
    head = struct.pack("<HH", group, elem) + (vr + b"\x00\x00" if vr else b"")
    return (
        head
        + struct.pack("<I", hostile.UNDEFINED)
        + struct.pack("<HHI", 0xFFFE, 0xE000, hostile.UNDEFINED)
        + item_body
        + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
        + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    )


def _behind_a_fake_header(hidden: bytes, length: int, tag: tuple[int, int] = (0x0009, 0x1001)) -> bytes:
    """An implicit-VR element whose value, misread as explicit VR, is an OB header stepping over ``hidden``.

    Its 4-byte ``length`` read as a VR and a 2-byte length gives length 0 (for 16: "\\x10\\x00", which
    pydicom takes for no VR; for 0x4141: "AA", which it takes for a VR when told explicit), so the next
    header a misreading walk meets is the fake OB at the start of the value, ending just past ``hidden``.
    """
    fake = struct.pack("<HH", 0x0009, 0x1002) + b"OB\x00\x00" + struct.pack("<I", length - 12 + len(hidden))
    return _implicit(*tag, fake + b"\x00" * (length - 12)) + hidden


def _flat(count: int, *, explicit: bool) -> bytes:
    """``count`` empty private elements: each one an object pydicom builds."""
    if explicit:
        return b"".join(hostile.element(0x0011, 0x1000 + i, b"LO", b"") for i in range(count))
    return b"".join(_implicit(0x0011, 0x1000 + i, b"") for i in range(count))


def _nested(depth: int) -> bytes:
    """ContentSequence ``depth`` levels deep in implicit VR (the dictionary says SQ)."""
    inner = b""
    for _ in range(depth):
        inner = _one_item_sequence(0x0040, 0xA730, inner, vr=None)
    return inner


def _depth(ds: Any) -> int:
    return max((1 + max(map(_depth, e.value), default=0) for e in ds if e.VR == "SQ"), default=0)


@pytest.mark.parametrize(
    ("hidden", "limits", "limit", "measure", "built"),
    [
        (
            _flat(5000, explicit=False),
            DicomLimits(max_elements=300),
            "CXR_DICOM_MAX_ELEMENTS",
            lambda ds: len(ds.ReferencedSeriesSequence[0]),
            5002,
        ),
        (_nested(50), LIMITS, "CXR_DICOM_MAX_DEPTH", _depth, 51),
    ],
    ids=["5000-elements", "50-levels"],
)
def test_an_implicit_item_in_an_explicit_file_cannot_hide_elements_from_the_walk(
    monkeypatch: pytest.MonkeyPatch,
    hidden: bytes,
    limits: DicomLimits,
    limit: str,
    measure: Callable[[Any], int],
    built: int,
) -> None:
    """pydicom re-checks each item's encoding; a walk keeping the parent's skipped what pydicom built."""
    # the first element's length (0: no VR) makes pydicom read the item implicit; the next one's reads "AA"
    item = _implicit(0x0009, 0x1000, b"") + _behind_a_fake_header(hidden, 0x4141)
    data = (
        hostile.file_meta(hostile.EXPLICIT_LE) + hostile.header() + _one_item_sequence(0x0008, 0x1115, item)
    )
    assert measure(dcmread(io.BytesIO(data), force=True)) == built  # the premise: pydicom builds all of it
    calls: list[int] = []
    monkeypatch.setattr(dicom_guard, "read_partial", lambda *a, **k: calls.append(1))
    with pytest.raises(DicomLimitExceeded) as caught:
        read_header(data, limits)
    assert caught.value.limit == limit and calls == []


def test_an_element_pydicom_reads_as_implicit_cannot_hide_elements_from_the_walk() -> None:
    """pydicom reads one element whose VR bytes are no VR as implicit VR, in an explicit dataset too."""
    data = (
        hostile.file_meta(hostile.EXPLICIT_LE)
        + hostile.header()
        + _behind_a_fake_header(_flat(5000, explicit=True), 16)
        + hostile.native_pixels()
    )
    assert len(dcmread(io.BytesIO(data), force=True)) > 5000
    with pytest.raises(DicomLimitExceeded, match="CXR_DICOM_MAX_ELEMENTS"):
        decode_bytes(data, salt="s", limits=DicomLimits(max_elements=300))


def test_a_deflated_dataset_in_implicit_vr_is_walked_as_pydicom_reads_it() -> None:
    """pydicom trusts the first inflated element over the transfer syntax: implicit VR here.

    A length of 0x4141 reads as the (unknown) VR "AA" with a 2-byte length 0 if walked as explicit.
    """
    body = _implicit(0x0008, 0x0016, b"1.2.840.10008.5.1.4.1.1.1.1\x00") + _behind_a_fake_header(
        _flat(5000, explicit=False), 0x4141
    )
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    data = hostile.file_meta(hostile.DEFLATED) + deflater.compress(body) + deflater.flush()
    with pytest.raises(DicomLimitExceeded, match="CXR_DICOM_MAX_ELEMENTS"):
        read_header(data, DicomLimits(max_elements=300))


def _meta_hiding_a_big_endian_syntax() -> bytes:
    """A file meta element with no VR whose 28-byte value pydicom skips: an explicit (0002,0010) saying BE.

    Scanned as explicit, the fake Explicit VR Big Endian is met first; pydicom keeps the real one (LE). The
    dataset's first element is 65,536 bytes read little endian, 256 read big endian, where a fake BE header
    steps over the rest.
    """
    fake_syntax = hostile.element(0x0002, 0x0010, b"UI", b"1.2.840.10008.1.2.2")
    meta = (
        hostile.element(0x0002, 0x0001, b"OB", b"\x00\x01")
        + _implicit(0x0002, 0x0003, fake_syntax)
        + hostile.element(0x0002, 0x0010, b"UI", hostile.EXPLICIT_LE.encode())
    )
    hidden = _flat(5000, explicit=True)
    value = bytearray(1 << 16)
    value[256:268] = (
        struct.pack(">HH", 0x0009, 0x1002) + b"OB\x00\x00" + struct.pack(">I", len(value) - 268 + len(hidden))
    )
    first = struct.pack("<HH", 0x0009, 0x1001) + b"OB\x00\x00" + b"\x00\x00\x01\x00" + bytes(value)
    return b"\x00" * 128 + b"DICM" + meta + first + hidden


def _implicit_meta() -> bytes:
    """A file meta group in implicit VR (pydicom follows its first element), one value 0x4141 long.

    Walked as explicit, that value is a fake header ending the meta group and stepping over the real
    transfer syntax and the dataset.
    """
    dataset = hostile.header() + _flat(5000, explicit=True)
    syntax = _implicit(0x0002, 0x0010, hostile.EXPLICIT_LE.encode())
    rest = _behind_a_fake_header(syntax + dataset, 0x4141, (0x0002, 0x0001))
    meta = _implicit(0x0002, 0x0000, struct.pack("<I", len(rest) - len(dataset))) + rest
    return b"\x00" * 128 + b"DICM" + meta


@pytest.mark.parametrize("make", [_meta_hiding_a_big_endian_syntax, _implicit_meta], ids=["element", "group"])
@pytest.mark.filterwarnings("ignore:Expected explicit VR")  # the premise: pydicom reads it anyway
def test_the_file_meta_is_read_in_the_encoding_pydicom_reads_it(make: Callable[[], bytes]) -> None:
    """The meta gives the transfer syntax and where the dataset starts: misread, it misplaces the walk."""
    data = make()
    assert len(dcmread(io.BytesIO(data), force=True)) > 5000  # the premise: pydicom builds them all
    with pytest.raises(DicomLimitExceeded, match="CXR_DICOM_MAX_ELEMENTS"):
        read_header(data, DicomLimits(max_elements=300))


def test_a_real_implicit_item_in_an_explicit_file_is_read_with_exact_counts() -> None:
    """Some writers encode items implicit (PS3.5 6.2.2); pydicom reads them, so the guard lets them in."""
    instance, klass = b"1.2.826.0.1.3680043.10.5.1\x00", b"1.2.840.10008.5.1.4.1.1.1.1\x00"
    nested = _one_item_sequence(0x0008, 0x1140, _implicit(0x0008, 0x1155, instance), vr=None)
    item = _implicit(0x0008, 0x1150, klass) + _implicit(0x0008, 0x1155, instance) + nested
    plain = hostile.file_meta(hostile.EXPLICIT_LE) + hostile.header()
    data = plain + _one_item_sequence(0x0008, 0x1115, item) + hostile.native_pixels()
    baseline = dicom_guard.read_guarded(plain + hostile.native_pixels(), sniffed=True, limits=LIMITS)
    guarded = dicom_guard.read_guarded(data, sniffed=True, limits=LIMITS)
    # SQ, item, 2 elements, nested SQ, item, 1 element, and each of the 4 delimiters
    assert guarded.facts.elements == baseline.facts.elements + 11
    assert guarded.facts.max_depth == 2
    read = guarded.dataset.ReferencedSeriesSequence[0]
    assert read.ReferencedSOPClassUID == klass.rstrip(b"\x00").decode()
    assert read.ReferencedImageSequence[0].ReferencedSOPInstanceUID == instance.rstrip(b"\x00").decode()
    assert decode_bytes(data, salt="s", limits=LIMITS).rows == 64

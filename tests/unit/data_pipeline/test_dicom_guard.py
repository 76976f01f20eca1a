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
from data_pipeline.dicom_io import decode_bytes, read_dicom, read_header
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


# ---------------------------------------------------------------------------- structures pydicom reads apart


def _built(ds: Any) -> int:
    """Every element pydicom builds, all levels (iterating converts each raw element, sequences included)."""
    return sum(1 + sum(_built(item) for item in e.value) if e.VR == "SQ" else 1 for e in ds)


def _meta(*elements: bytes) -> bytes:
    """Preamble, "DICM" and the given file meta elements, without a group length (pydicom needs none)."""
    return b"\x00" * 128 + b"DICM" + b"".join(elements)


def _tag(group: int, elem: int, length: int) -> bytes:
    """An item or delimiter: a tag and a 4-byte length, no VR."""
    return struct.pack("<HHI", group, elem, length)


_SOP_CLASS = b"1.2.840.10008.5.1.4.1.1.1.1\x00"


def test_a_command_group_before_the_dataset_is_refused() -> None:
    """pydicom reads leading (0000,eeee) elements as a command set and then the whole dataset.

    The walk stopped at the second one (zero fill ends a dataset there), so nothing behind it was counted.
    Without a group length, the gateway's zero-fill check never looks where the dataset starts.
    """
    data = (
        _meta(hostile.element(0x0002, 0x0010, b"UI", hostile.EXPLICIT_LE.encode()))
        + hostile.element(0x0000, 0x0000, b"UL", struct.pack("<I", 0))
        + hostile.element(0x0000, 0x0002, b"UI", b"1\x00")
        + hostile.header()
        + _flat(3000, explicit=True)
    )
    assert len(dcmread(io.BytesIO(data), force=True)) > 3000  # the premise: pydicom builds them all
    with pytest.raises(CorruptImage, match=r"command group \(0000,0000\) in a stored instance"):
        read_header(data, DicomLimits(max_elements=300))


def _sequence_holding_an_overlong_element() -> bytes:
    """A defined-length SQ whose item's element runs past the SQ: pydicom parses the SQ's bytes alone."""
    hidden = _flat(3000, explicit=True)
    inner = hostile.element(0x0009, 0x1002, b"OB", b"", length=len(hidden))
    item = _tag(0xFFFE, 0xE000, len(inner)) + inner
    return (
        hostile.file_meta(hostile.EXPLICIT_LE)
        + hostile.header()
        + hostile.element(0x0008, 0x1115, b"SQ", item)
        + hidden
    )


def _sequence_delimited_early() -> bytes:
    """A defined-length SQ ended early by a delimiter: pydicom leaves the rest of its bytes unread.

    Walked on, those bytes are a fake header stepping over the elements pydicom reads after the SQ.
    """
    hidden = _flat(3000, explicit=True)
    value = (
        _tag(0xFFFE, 0xE000, 0)
        + _tag(0xFFFE, 0xE0DD, 0)
        + hostile.element(0x0009, 0x1002, b"OB", b"", length=len(hidden))
    )
    return (
        hostile.file_meta(hostile.EXPLICIT_LE)
        + hostile.header()
        + hostile.element(0x0008, 0x1115, b"SQ", value)
        + hidden
    )


@pytest.mark.parametrize(
    ("make", "refusal", "match"),
    [
        (_sequence_holding_an_overlong_element, CorruptImage, "runs past the end of its sequence item"),
        (_sequence_delimited_early, DicomLimitExceeded, "CXR_DICOM_MAX_ELEMENTS"),
    ],
    ids=["element-past-the-sq", "delimiter-inside-a-defined-sq"],
)
def test_a_defined_length_sequence_is_walked_within_its_own_bytes(
    make: Callable[[], bytes], refusal: type[Exception], match: str
) -> None:
    """pydicom reads a defined-length SQ's value as bytes and goes on after it, whatever its items say."""
    data = make()
    assert _built(dcmread(io.BytesIO(data), force=True)) > 3000  # the premise
    with pytest.raises(refusal, match=match):
        read_header(data, DicomLimits(max_elements=300))


def test_an_undefined_length_on_a_non_sequence_element_is_refused() -> None:
    """Implicit (0010,0010) of undefined length: pydicom reads bytes up to the first sequence delimiter.

    The walk took it for a sequence, and an element in its item stepped past that delimiter over the
    elements pydicom reads next.
    """
    hidden = _flat(3000, explicit=False)
    item = _tag(0xFFFE, 0xE000, 8) + _implicit(0x0009, 0x1002, b"", length=8 + len(hidden))
    data = (
        hostile.file_meta("1.2.840.10008.1.2")
        + _implicit(0x0008, 0x0016, _SOP_CLASS)
        + _implicit(0x0010, 0x0010, b"", length=hostile.UNDEFINED)
        + item
        + _tag(0xFFFE, 0xE0DD, 0)
        + hidden
    )
    assert len(dcmread(io.BytesIO(data), force=True)) > 3000  # the premise
    with pytest.raises(
        CorruptImage, match="undefined length on a non-sequence element other than Pixel Data"
    ):
        read_header(data, DicomLimits(max_elements=300))


def _un_sequence(body: bytes) -> bytes:
    """ReferencedSeriesSequence sent as explicit UN of defined length: one implicit item holding ``body``."""
    return hostile.element(0x0008, 0x1115, b"UN", _tag(0xFFFE, 0xE000, len(body)) + body)


def test_a_sequence_sent_as_un_is_walked_as_the_sequence_pydicom_reads() -> None:
    """pydicom converts a UN element shorter than 64 KiB to its dictionary VR: an SQ it parses when read.

    Real files carry these (a node that did not know the tag re-encoded it); the walk had skipped the value.
    """
    plain = hostile.file_meta(hostile.EXPLICIT_LE) + hostile.header()
    data = plain + _un_sequence(_flat(3000, explicit=False))
    assert len(dcmread(io.BytesIO(data), force=True).ReferencedSeriesSequence[0]) == 3000  # the premise
    with pytest.raises(DicomLimitExceeded, match="CXR_DICOM_MAX_ELEMENTS"):
        read_header(data, DicomLimits(max_elements=300))
    real = plain + _un_sequence(_implicit(0x0008, 0x1150, _SOP_CLASS)) + hostile.native_pixels()
    guarded = dicom_guard.read_guarded(real, sniffed=True, limits=LIMITS)
    baseline = dicom_guard.read_guarded(plain + hostile.native_pixels(), sniffed=True, limits=LIMITS)
    assert (guarded.facts.elements, guarded.facts.max_depth) == (baseline.facts.elements + 3, 1)
    assert guarded.dataset.ReferencedSeriesSequence[0].ReferencedSOPClassUID == _SOP_CLASS[:-1].decode()


def _ge_thumbnail(body: bytes, *, creator_first: bool = True) -> bytes:
    """An implicit-VR file with GE's private (0009,1010) "GE IIS Thumbnail Sequence" holding ``body``.

    Implicit VR says nothing of it: pydicom's private dictionary makes it an SQ through its creator.
    """
    creator = _implicit(0x0009, 0x0010, b"GEIIS ")
    thumbnail = _implicit(0x0009, 0x1010, _tag(0xFFFE, 0xE000, len(body)) + body)
    private = creator + thumbnail if creator_first else thumbnail + creator
    return hostile.file_meta("1.2.840.10008.1.2") + _implicit(0x0008, 0x0016, _SOP_CLASS) + private


def test_a_private_sequence_pydicom_knows_is_walked_as_one() -> None:
    """An element met before its creator is refused: pydicom finds the creator wherever it stands."""
    for creator_first in (True, False):
        data = _ge_thumbnail(_flat(3000, explicit=False), creator_first=creator_first)
        assert len(dcmread(io.BytesIO(data), force=True)[0x0009, 0x1010].value[0]) == 3000  # the premise
        with pytest.raises(ImageDecodeError) as caught:
            read_header(data, DicomLimits(max_elements=300))
        if creator_first:
            assert (
                isinstance(caught.value, DicomLimitExceeded)
                and caught.value.limit == "CXR_DICOM_MAX_ELEMENTS"
            )
        else:
            assert isinstance(caught.value, CorruptImage) and "before its private creator" in str(
                caught.value
            )
    small = dicom_guard.read_guarded(_ge_thumbnail(_flat(2, explicit=False)), sniffed=True, limits=LIMITS)
    # the SOP class, the creator, the SQ, its item and the item's 2 elements, one level deep
    assert (small.facts.elements, small.facts.max_depth) == (6, 1)


def test_implicit_vr_text_is_bounded_like_explicit_text() -> None:
    """Implicit VR has no VR on the wire: the dictionary's (LT here) is what pydicom decodes it as."""
    data = (
        hostile.file_meta("1.2.840.10008.1.2")
        + _implicit(0x0008, 0x0016, _SOP_CLASS)
        + _implicit(0x0020, 0x4000, b"A" * 100_000)
    )
    assert len(dcmread(io.BytesIO(data), force=True).ImageComments) == 100_000  # the premise
    with pytest.raises(DicomLimitExceeded, match="CXR_DICOM_MAX_TEXT_BYTES"):
        read_header(data, DicomLimits(max_text_bytes=1 << 16))


def _little_endian_hides_from_big(*, big: bool) -> bytes:
    """A dataset whose first element is 65,536 bytes read one way and 256 read the other.

    Read in the other byte order, a fake header 256 bytes in steps over the 3,000 elements that
    follow the value in the order the dataset is written in (``big``: those are big endian).
    """
    order = ">" if big else "<"
    hidden = b"".join(
        struct.pack(f"{order}HH", 0x0011, 0x1000 + i) + b"LO" + struct.pack(f"{order}H", 0)
        for i in range(3000)
    )
    if big:  # big endian: a 256-byte value, the elements, then an OB filling up to where LE reading jumps
        value = b"\x00" * 256
        fill = (1 << 16) - 256 - len(hidden) - 12
        tail = (
            hidden
            + struct.pack(">HH", 0x0011, 0x3000)
            + b"OB\x00\x00"
            + struct.pack(">I", fill)
            + bytes(fill)
        )
        return struct.pack(">HH", 0x0009, 0x1001) + b"OB\x00\x00" + b"\x00\x00\x01\x00" + value + tail
    value = bytearray(1 << 16)
    value[256:268] = (
        struct.pack(">HH", 0x0009, 0x1002) + b"OB\x00\x00" + struct.pack(">I", len(value) - 268 + len(hidden))
    )
    return struct.pack("<HH", 0x0009, 0x1001) + b"OB\x00\x00" + b"\x00\x00\x01\x00" + bytes(value) + hidden


def test_without_a_transfer_syntax_the_dataset_is_read_in_the_byte_order_pydicom_guesses() -> None:
    """No (0002,0010): pydicom guesses explicit VR from a known VR, and big endian from a group >= 0x0400."""
    data = _meta(hostile.element(0x0002, 0x0001, b"OB", b"\x00\x01")) + _little_endian_hides_from_big(
        big=True
    )
    ds = dcmread(io.BytesIO(data), force=True)
    assert not ds.is_little_endian and len(ds) > 3000  # the premise
    with pytest.raises(DicomLimitExceeded, match="CXR_DICOM_MAX_ELEMENTS"):
        read_header(data, DicomLimits(max_elements=300))


_BIG_ENDIAN = b"1.2.840.10008.1.2.2"


@pytest.mark.parametrize(
    ("meta", "big"),
    [
        (hostile.element(0x0002, 0x0010, b"UI", b"\x00" + _BIG_ENDIAN), False),
        (hostile.element(0x0002, 0x0010, b"UI", b"\t" + _BIG_ENDIAN + b"\n"), True),
        (
            hostile.element(0x0002, 0x0010, b"UI", _BIG_ENDIAN)
            + hostile.element(0x0002, 0x0010, b"UI", hostile.EXPLICIT_LE.encode()),
            False,
        ),
        (hostile.element(0x0002, 0x0010, b"OB", _BIG_ENDIAN), False),
    ],
    ids=["leading-nul", "tab-and-newline", "the-last-of-two", "ob-value"],
)
@pytest.mark.filterwarnings("ignore")  # pydicom warns of the odd meta it reads anyway
def test_the_transfer_syntax_is_the_value_pydicom_compares(meta: bytes, big: bool) -> None:
    """pydicom's UID keeps a leading NUL but strips whitespace (tab, newline) from both ends, keeps the
    last of two (0002,0010), and compares an OB value as bytes (no match: explicit little endian).

    The walk stripped NULs and spaces only and took the first: each of these it read in the other byte
    order, where a fake header hides 3,000 elements.
    """
    data = _meta(hostile.element(0x0002, 0x0001, b"OB", b"\x00\x01"), meta) + _little_endian_hides_from_big(
        big=big
    )
    ds = dcmread(io.BytesIO(data), force=True)
    assert ds.is_little_endian is not big and len(ds) > 3000  # the premise
    with pytest.raises(DicomLimitExceeded, match="CXR_DICOM_MAX_ELEMENTS"):
        read_header(data, DicomLimits(max_elements=300))


def test_an_item_delimiter_before_the_dataset_is_refused() -> None:
    """pydicom's command-set read takes "OB" in the delimiter's length for a VR: 12 bytes, the walk 8.

    The 4 bytes between were a tag to the walk, and the dataset's first tag its length: 65,544 bytes
    stepping over everything pydicom reads.
    """
    rest = hostile.element(0x0008, 0x0001, b"OB", b"") + hostile.header() + _flat(3000, explicit=True)
    fill = 65_544 + 4 - len(rest) - 12
    data = (
        hostile.file_meta(hostile.EXPLICIT_LE)
        + _tag(0xFFFE, 0xE00D, 0)[:4]
        + b"OB\x00\x00"
        + struct.pack("<HH", 0x0009, 0x0001)
        + rest
        + hostile.element(0x0011, 0x3000, b"OB", bytes(fill))
    )
    assert len(dcmread(io.BytesIO(data), force=True)) > 3000  # the premise
    with pytest.raises(CorruptImage, match=r"\(FFFE,E00D\) where a data element belongs"):
        read_header(data, DicomLimits(max_elements=300))


def test_a_sequence_holding_something_other_than_items_is_refused() -> None:
    """pydicom reads any tag where an item belongs as an item header; the walk read it as an element."""
    hidden = _flat(3000, explicit=True)
    data = (
        hostile.file_meta(hostile.EXPLICIT_LE)
        + hostile.header()
        + struct.pack("<HH", 0x0008, 0x1115)
        + b"SQ\x00\x00"
        + struct.pack("<I", hostile.UNDEFINED)
        + _tag(0x0009, 0x0000, len(hidden))
        + hidden
        + _tag(0xFFFE, 0xE0DD, 0)
    )
    assert _built(dcmread(io.BytesIO(data), force=True)) > 3000  # the premise
    with pytest.raises(CorruptImage, match="where an item belongs"):
        read_header(data, DicomLimits(max_elements=300))


def test_encapsulated_pixel_data_without_its_delimiter_is_refused() -> None:
    """pydicom then scans the value byte by byte for a delimiter: one inside a fragment ends it there.

    What follows that delimiter in the fragment, which the walk stepped over, pydicom reads as elements.
    """
    jpeg = hostile.tiny_jpeg()
    fragment = jpeg + b"\x00" * (len(jpeg) % 2) + _tag(0xFFFE, 0xE0DD, 0) + _flat(3000, explicit=True)
    data = (
        hostile.file_meta(hostile.JPEG_BASELINE)
        + hostile.header(8, 8, bits=8)
        + struct.pack("<HH", 0x7FE0, 0x0010)
        + b"OB\x00\x00"
        + struct.pack("<I", hostile.UNDEFINED)
        + _tag(0xFFFE, 0xE000, 0)
        + _tag(0xFFFE, 0xE000, len(fragment))
        + fragment
    )
    assert len(dcmread(io.BytesIO(data), force=True)) > 3000  # the premise
    with pytest.raises(CorruptImage, match="ends inside encapsulated pixel data"):
        read_dicom(data, DicomLimits(max_elements=300))


def test_pixel_data_sent_as_a_sequence_is_refused() -> None:
    """Pixel Data with VR SQ is a sequence to pydicom; the walk stepped over its items as fragments."""
    hidden = _flat(3000, explicit=True)
    data = (
        hostile.file_meta(hostile.RLE)
        + hostile.header()
        + struct.pack("<HH", 0x7FE0, 0x0010)
        + b"SQ\x00\x00"
        + struct.pack("<I", hostile.UNDEFINED)
        + _tag(0xFFFE, 0xE000, len(hidden))
        + hidden
        + _tag(0xFFFE, 0xE0DD, 0)
    )
    assert len(dcmread(io.BytesIO(data), force=True).PixelData[0]) == 3000  # the premise
    with pytest.raises(CorruptImage, match="Pixel Data is encoded as a sequence"):
        read_dicom(data, DicomLimits(max_elements=300))


def _frames_as_us(frames: int) -> bytes:
    """A valid 64x64 DX whose NumberOfFrames is sent as US: the walk reads it as text (IS)."""
    head = hostile.header()
    frames_us = hostile.element(0x0028, 0x0008, b"US", struct.pack("<H", frames))
    at = head.index(struct.pack("<HH", 0x0028, 0x0010))  # before Rows: in tag order
    return (
        hostile.file_meta(hostile.EXPLICIT_LE) + head[:at] + frames_us + head[at:] + hostile.native_pixels()
    )


def test_sizes_pydicom_reads_otherwise_than_the_walk_are_checked_again_before_decoding() -> None:
    """NumberOfFrames as US 1024 (or Rows as UL): pydicom reads 1024 frames where the walk read 1."""
    data = _frames_as_us(1024)
    assert int(dcmread(io.BytesIO(data)).NumberOfFrames) == 1024  # what the decoder would be told
    with pytest.raises(DicomLimitExceeded) as refused:
        decode_bytes(data, salt="s", limits=LIMITS)
    assert refused.value.limit == "CXR_DICOM_MAX_FRAMES"
    decode_bytes(_frames_as_us(1), salt="s", limits=LIMITS)  # the same file with one frame decodes


def test_an_element_of_a_value_representation_dicom_does_not_define_is_refused_by_the_walk() -> None:
    """pydicom reads it, then raises NotImplementedError when its value is used: a 500 in STOW-RS."""
    from serving.dicom.headers import instance_uids

    head = hostile.header()
    bad = struct.pack("<HH", 0x0008, 0x0016) + b"QQ" + struct.pack("<H", 4) + b"1.2\x00"
    data = (
        hostile.file_meta(hostile.EXPLICIT_LE) + bad + head[head.index(struct.pack("<HH", 0x0008, 0x0018)) :]
    )
    with pytest.raises(NotImplementedError):
        dcmread(io.BytesIO(data)).get("SOPClassUID")
    with pytest.raises(CorruptImage, match="'QQ'"):
        read_header(data, LIMITS)
    assert instance_uids(data) == ("", "", "")


def test_a_stray_item_delimiter_after_a_defined_length_item_is_read_as_pydicom_reads_it() -> None:
    """A vendor quirk (DCMTK warns "found (fffe,e00d) instead of item tag"): pydicom reads it as an
    empty item, so it is not refused; an item delimiter claiming a length still is."""
    item_body = hostile.element(0x0008, 0x1150, b"UI", _SOP_CLASS.rstrip(b"\x00"))
    sequence = (
        struct.pack("<HH", 0x0008, 0x1115)
        + b"SQ\x00\x00"
        + struct.pack("<I", hostile.UNDEFINED)
        + _tag(0xFFFE, 0xE000, len(item_body))
        + item_body
        + _tag(0xFFFE, 0xE00D, 0)
        + _tag(0xFFFE, 0xE0DD, 0)
    )
    head = hostile.header()
    at = head.index(struct.pack("<HH", 0x0010, 0x0010))  # in tag order: (0008,1115) before the patient
    data = hostile.file_meta(hostile.EXPLICIT_LE) + head[:at] + sequence + head[at:]
    assert len(dcmread(io.BytesIO(data)).ReferencedSeriesSequence) == 2  # pydicom: the item and an empty one
    assert len(read_header(data, LIMITS).ReferencedSeriesSequence) == 2
    claiming = data.replace(_tag(0xFFFE, 0xE00D, 0), _tag(0xFFFE, 0xE00D, 8) + b"\x00" * 8)
    with pytest.raises(CorruptImage, match="where an item belongs"):
        read_header(claiming, LIMITS)


@pytest.mark.parametrize("reader", ["decode_file", "read_size"])
def test_a_file_larger_than_the_limit_is_refused_before_it_is_read(
    tmp_path: Any, reader: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """decode_file and read_size read at most max_file_bytes (they had read any file whole)."""
    from data_pipeline import dicom_io
    from data_pipeline.errors import UnsupportedImage

    limits = DicomLimits()
    cap = dicom_io.max_file_bytes(limits)
    huge = tmp_path / "huge.dcm"
    huge.write_bytes(hostile.valid())
    os.truncate(huge, cap + 1)  # sparse: the size a hostile export would claim
    reads: list[int] = []
    real_open = open

    def counting_open(*args: Any, **kwargs: Any) -> Any:
        handle = real_open(*args, **kwargs)
        real_read = handle.read
        handle.read = lambda n=-1: reads.append(n) or real_read(n)
        return handle

    monkeypatch.setattr("builtins.open", counting_open)
    with pytest.raises(UnsupportedImage, match=rf"huge\.dcm: file of {cap + 1} bytes exceeds"):
        getattr(dicom_io, reader)(huge, limits=limits)
    assert reads == [], "refused from its size, before any byte is read"
    monkeypatch.undo()
    os.truncate(huge, len(hostile.valid()))
    assert getattr(dicom_io, reader)(huge, limits=limits)  # the same file within the limit is read


@pytest.mark.parametrize(
    "uid",
    ["1.2." + "3" * 80, "1.2.3/../../etc", "1.2.3 OR 1=1", "1.2.3\x01", "x" * 10],
)
def test_a_study_uid_that_is_not_a_uid_is_refused_by_the_reader(uid: str) -> None:
    """The study, series and instance UIDs key the worklist, the send-back and derived objects."""
    from pydicom.dataset import Dataset

    from data_pipeline.dicom_io import _uid_or_none

    ds = Dataset()
    ds.StudyInstanceUID = "1.02.3"  # a leading zero: invalid by the letter, written by real modalities
    assert _uid_or_none(ds, "StudyInstanceUID") == "1.02.3"
    ds.StudyInstanceUID = uid
    with pytest.raises(CorruptImage, match="StudyInstanceUID is not a DICOM UID"):
        _uid_or_none(ds, "StudyInstanceUID")
    with pytest.raises(CorruptImage, match="StudyInstanceUID is not a DICOM UID"):
        decode_bytes(_with_study_uid(hostile.valid(), uid))


def _with_study_uid(data: bytes, uid: str) -> bytes:
    ds = dcmread(io.BytesIO(data))
    ds.StudyInstanceUID = uid
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _no_decoding(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record any call of pydicom's pixel decoder: a refusal must come before it."""
    import pydicom.pixels

    calls: list[int] = []
    real = pydicom.pixels.pixel_array

    def recording(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(pydicom.pixels, "pixel_array", recording)
    return calls


def test_a_compressed_frame_in_defined_length_pixel_data_is_refused_before_decoding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """pydicom parses items out of a defined-length value too; the codestream check skipped it (2 GB peak)."""
    calls = _no_decoding(monkeypatch)
    with pytest.raises(CorruptImage, match="defined length"):
        decode_bytes(hostile.defined_length_jpeg(2000, 2000), salt="s", limits=LIMITS)
    assert calls == []


def test_an_extended_offset_table_cannot_send_the_decoder_past_the_checked_fragment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first frame pydicom decodes starts where the EOT says: only the first fragment was checked."""
    calls = _no_decoding(monkeypatch)
    with pytest.raises(CorruptImage, match="Extended Offset Table"):
        decode_bytes(hostile.extended_offset_jpeg(2000, 2000), salt="s", limits=LIMITS)
    assert calls == []


def test_a_jp2_siz_outside_the_codestream_box_is_not_taken_for_the_frame_header() -> None:
    """openjpeg sizes a JP2 by its jp2c box's SIZ; a decoy SIZ in an XML box before it passed the check."""
    with pytest.raises(DicomLimitExceeded, match="60000x60000") as caught:
        decode_bytes(hostile.jp2_decoy(60000, 60000), salt="s", limits=LIMITS)
    assert caught.value.limit == "CXR_DICOM_MAX_PIXELS"
    assert dicom_guard.j2k_codestream(b"\x00\x00\x00\x0cjP  \r\n\x87\n" + b"\x00" * 8) is None
    import pydicom.data

    real_jp2 = pydicom.data.get_testdata_file("GDCMJ2K_TextGBR.dcm")  # a JP2-wrapped frame from GDCM
    assert real_jp2 is not None
    with open(real_jp2, "rb") as handle:
        assert decode_bytes(handle.read(), salt="s", limits=LIMITS).pixels.shape == (400, 400)


def _jpeg(mode: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, (8, 8), 128 if mode == "L" else (128, 64, 32)).save(buf, format="JPEG")
    return buf.getvalue()


def _j2k(precision: int) -> bytes:
    siz = struct.pack(">HHIIIIIIIIH", 41, 0, 8, 8, 0, 0, 8, 8, 0, 0, 1) + bytes([precision - 1, 1, 1])
    return b"\xff\x4f\xff\x51" + siz + b"\xff\x93" + b"\x00" * 64 + b"\xff\xd9"


@pytest.mark.parametrize(
    ("syntax", "codestream", "declares"),
    [(hostile.JPEG_BASELINE, _jpeg("RGB"), "8x8x3 of 8 bits"), (hostile.J2K, _j2k(16), "8x8x1 of 16 bits")],
    ids=["jpeg-3-samples", "j2k-16-bits"],
)
def test_a_codestream_with_more_samples_or_bits_than_the_header_is_refused_before_decoding(
    monkeypatch: pytest.MonkeyPatch, syntax: str, codestream: bytes, declares: str
) -> None:
    """Decoders allocate what the codestream declares: more samples or bits than the 8-bit grey header
    multiplied the decoded bytes CXR_DICOM_MAX_PIXEL_BYTES had bounded."""
    calls = _no_decoding(monkeypatch)
    data = hostile.file_meta(syntax) + hostile.header(8, 8, bits=8) + hostile.encapsulated(codestream)
    with pytest.raises(DicomLimitExceeded, match=declares):
        decode_bytes(data, salt="s", limits=LIMITS)
    assert calls == []
    grey = hostile.file_meta(syntax) + hostile.header(8, 8, bits=8) + hostile.encapsulated(_jpeg("L"))
    if syntax == hostile.JPEG_BASELINE:  # the same frame with the header's one grey sample decodes
        assert decode_bytes(grey, salt="s", limits=LIMITS).pixels.shape == (8, 8)

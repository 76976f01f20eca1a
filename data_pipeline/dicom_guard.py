"""The one guarded DICOM reader: every byte from outside is checked here before pydicom parses it.

pydicom trusts its input: it follows sequences as deep as the file nests them
(5,000 levels later ran the gateway out of memory while writing them back),
reads as many elements as the bytes hold, inflates Deflated Explicit VR Little
Endian with one unbounded ``zlib.decompress``, and lets a JPEG codestream
allocate whatever its own frame header declares. pydicom has no hook for any
of these limits, so a small iterative walk over the raw element headers
(hand-written for that reason; ~100 lines, no recursion, no value decoding)
measures the stream first:

- sequence nesting depth and the number of elements, at every level;
- element lengths that point past the end of the data (sizes that lie), and
  text values larger than any real header holds;
- the declared Rows x Columns x frames x samples x bytes, before any
  decompression, and for encapsulated pixel data the size the first
  codestream itself declares (JPEG/JPEG-LS SOF, JPEG 2000 SIZ), which must
  match the header;
- deflated datasets are inflated in a stream with a cap on the output.

The walk counts only what pydicom will build if it splits the bytes into
elements exactly where pydicom does, so it copies pydicom's encoding choices
(``pydicom.filereader``): an element whose VR bytes are not a VR is read as
implicit VR, and the file meta group, an inflated dataset and every sequence
item of an explicit-VR parent take the encoding their first element shows
(implicit items are allowed, PS3.5 6.2.2). A walk that kept the encoding it
was told could be steered by a fake header inside a value over elements
pydicom then parses (100,000 of them in 866 KB).

Only then does pydicom read the dataset. Each refusal is a
:class:`DicomLimitExceeded` naming the setting that bounds it, so the gateway
can answer a 4xx that tells an integrator which limit the file broke.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset, FileDataset
from pydicom.filereader import read_dataset, read_partial
from pydicom.tag import BaseTag

from data_pipeline.errors import CorruptImage, UnsupportedImage

_UNDEFINED = 0xFFFFFFFF
# Explicit VR with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2)
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_BULK_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"UN"})
_PIXEL_DATA = 0x7FE00010
_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_BE = "1.2.840.10008.1.2.2"
_DEFLATED = "1.2.840.10008.1.2.1.99"
_RLE = "1.2.840.10008.1.2.5"
# first-level attributes of the Image Pixel module, read from the raw stream
_PIXEL_MODULE = {
    0x00280002: "samples",
    0x00280008: "frames",
    0x00280010: "rows",
    0x00280011: "cols",
    0x00280100: "bits",
}


class DicomLimitExceeded(UnsupportedImage):
    """A DICOM refused by one of the reader's limits; ``limit`` is the setting's env name."""

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(f"{message} (limit {limit})")
        self.limit = limit


@dataclass(frozen=True)
class DicomLimits:
    """Bounds on one DICOM from outside; the defaults hold every real radiograph with room to spare.

    A chest CR/DX has one level of sequences (two with icon images or
    referenced series) and a few hundred elements; 3000x3000 16-bit is 18 MB.
    """

    max_depth: int = 8
    max_elements: int = 10_000
    max_text_bytes: int = 1 << 20
    max_pixels: int = 50_000_000
    max_pixel_bytes: int = 200 * 1024 * 1024
    max_inflated_bytes: int = 128 * 1024 * 1024
    max_frames: int = 1


@dataclass
class StreamFacts:
    """What the walk learned: counts, the Image Pixel values, where the pixel data starts."""

    elements: int = 0
    max_depth: int = 0
    pixel: dict[str, int] = field(default_factory=dict)
    pixel_offset: int | None = None
    pixel_length: int | None = None


@dataclass
class _Open:
    """One open sequence or item while walking: where it ends (None: delimited) and its encoding.

    For a sequence, ``explicit`` is the encoding pydicom hands to its items (each explicit
    item is re-checked, see :func:`_first_element_explicit`); for an item, the one it is read in.
    """

    is_sequence: bool
    end: int | None
    explicit: bool
    fragments: bool = False  # encapsulated pixel data: its items hold codestream bytes, not elements


def _u16(data: bytes, pos: int, little: bool) -> int:
    return int.from_bytes(data[pos : pos + 2], "little" if little else "big")


def _u32(data: bytes, pos: int, little: bool) -> int:
    return int.from_bytes(data[pos : pos + 4], "little" if little else "big")


def _first_element_explicit(data: bytes, pos: int, told: bool, *, item: bool = False) -> bool:
    """Whether pydicom reads the dataset (or sequence item) starting at ``pos`` as explicit VR.

    pydicom (``read_dataset`` -> ``_is_implicit_vr``) trusts the first
    element over the encoding it was told (the transfer syntax, explicit for
    the file meta, the parent's for an item): two bytes A-Z where the VR would
    be read as explicit, anything else as implicit. It keeps ``told`` with
    fewer than two such bytes, and never reads an implicit parent's item as explicit.
    """
    if (item and not told) or pos + 6 > len(data):
        return told
    return _looks_explicit(data, pos)


def _element_header(data: bytes, pos: int, explicit: bool, little: bool) -> tuple[bytes | None, int, int]:
    """(VR, value length, header size) of the element at ``pos``, split where pydicom splits it.

    In an explicit dataset pydicom (``data_element_generator``) reads a known
    VR, or any two bytes from "AA" to "ZZ" (with a 2-byte length), as explicit;
    two other bytes are no VR, and it reads that one element as implicit VR
    (``config.assume_implicit_vr_switch``): the VR is then None.
    """
    vr = data[pos + 4 : pos + 6] if explicit else None
    if vr is not None and vr in _LONG_VRS:
        return vr, _u32(data, pos + 8, little), 12
    if vr is not None and b"AA" <= vr <= b"ZZ":
        return vr, _u16(data, pos + 6, little), 8
    return None, _u32(data, pos + 4, little), 8


def _implicit_is_sequence(tag: int, length: int) -> bool:
    """Implicit VR has no VR on the wire: the data dictionary (or an undefined length) says SQ."""
    if length == _UNDEFINED:
        return True
    try:
        return str(dictionary_VR(tag)) == "SQ"
    except KeyError:
        return False


def walk(
    data: bytes,
    start: int,
    *,
    explicit: bool,
    little: bool,
    limits: DicomLimits,
    stop_at_group: int | None = None,
) -> tuple[StreamFacts, int]:
    """Walk element headers from ``start``; returns the facts and where the walk stopped.

    Stops at the end of the data, at a top-level command-group element (zero
    fill, where pydicom is told to stop too) or at the first top-level element
    of another group when ``stop_at_group`` is given (the file meta group).
    Pixel Data is stepped over (fragments by their item lengths).
    """
    facts = StreamFacts()
    stack: list[_Open] = []
    pos, size = start, len(data)
    while True:
        while stack and stack[-1].end is not None and pos >= stack[-1].end:
            stack.pop()
        if pos + 8 > size:
            return facts, pos
        enc_explicit = stack[-1].explicit if stack else explicit
        group = _u16(data, pos, little)
        element = _u16(data, pos + 2, little)
        tag = (group << 16) | element
        if not stack and stop_at_group is not None and group != stop_at_group:
            return facts, pos
        if not stack and group == 0 and pos > start:
            return facts, pos  # zero fill / command group: pydicom is told to stop here too
        facts.elements += 1
        if facts.elements > limits.max_elements:
            raise DicomLimitExceeded(
                "CXR_DICOM_MAX_ELEMENTS", f"DICOM holds more than {limits.max_elements} elements"
            )
        if group == 0xFFFE:  # item / delimiters: always tag + 4-byte length
            length = _u32(data, pos + 4, little)
            pos += 8
            if element == 0xE000:
                if not stack or not stack[-1].is_sequence:
                    raise CorruptImage("DICOM has an item outside any sequence: the file is garbled")
                end = None if length == _UNDEFINED else pos + length
                if end is not None and end > size:
                    raise CorruptImage(_lying_length(tag, length, size - pos))
                if stack[-1].fragments:
                    if end is None:
                        raise CorruptImage("encapsulated pixel data has a fragment of undefined length")
                    pos = end
                    continue
                item_explicit = _first_element_explicit(data, pos, stack[-1].explicit, item=True)
                stack.append(_Open(False, end, item_explicit))
            elif element == 0xE00D:
                if stack and not stack[-1].is_sequence:
                    stack.pop()
            elif element == 0xE0DD:
                if stack and not stack[-1].is_sequence:
                    stack.pop()  # an undelimited item closed by its sequence's delimiter
                if stack and stack[-1].is_sequence:
                    stack.pop()
            continue
        vr, length, header = _element_header(data, pos, enc_explicit, little)
        pos += header
        if not stack and tag == _PIXEL_DATA:
            facts.pixel_offset, facts.pixel_length = pos, length  # walked on: pydicom reads what follows too
        if tag == _PIXEL_DATA:
            is_sequence = False  # undefined length: encapsulated fragments, whatever the VR encoding
        else:
            is_sequence = vr == b"SQ" if vr is not None else _implicit_is_sequence(tag, length)
        if is_sequence or length == _UNDEFINED:
            # SQ, UN of undefined length (pydicom reads it as SQ) or nested encapsulated pixel data
            depth = sum(o.is_sequence for o in stack) + 1
            facts.max_depth = max(facts.max_depth, depth)
            if depth > limits.max_depth:
                raise DicomLimitExceeded(
                    "CXR_DICOM_MAX_DEPTH", f"DICOM sequences are nested deeper than {limits.max_depth} levels"
                )
            end = None if length == _UNDEFINED else pos + length
            if end is not None and end > size:
                raise CorruptImage(_lying_length(tag, length, size - pos))
            fragments = not is_sequence and (tag == _PIXEL_DATA or vr not in (None, b"UN"))
            # pydicom reads the items in the dataset's encoding and re-checks each (UN included)
            stack.append(_Open(True, end, enc_explicit, fragments))
            continue
        if pos + length > size:
            raise CorruptImage(_lying_length(tag, length, size - pos))
        if vr is not None and vr not in _BULK_VRS and length > limits.max_text_bytes:
            raise DicomLimitExceeded(
                "CXR_DICOM_MAX_TEXT_BYTES",
                f"DICOM element ({group:04X},{element:04X}) holds {length} bytes of text",
            )
        if not stack and tag in _PIXEL_MODULE:
            facts.pixel[_PIXEL_MODULE[tag]] = _pixel_value(data[pos : pos + length], tag, little)
        pos += length


def _pixel_value(raw: bytes, tag: int, little: bool) -> int:
    if tag == 0x00280008:  # NumberOfFrames is IS (text)
        try:
            return int(raw.decode("ascii", "replace").strip("\x00 ").split("\\")[0] or 1)
        except ValueError:
            return 1
    return _u16(raw, 0, little) if len(raw) >= 2 else 0


def _lying_length(tag: int, length: int, left: int) -> str:
    return (
        f"DICOM element ({tag >> 16:04X},{tag & 0xFFFF:04X}) says {length} bytes but only {max(left, 0)} "
        "remain: the file is truncated or its lengths are wrong"
    )


# ---------------------------------------------------------------------------- pixel size


def check_declared_size(facts: StreamFacts, limits: DicomLimits) -> None:
    """Refuse on the declared image size, before any decoder allocates anything."""
    p = facts.pixel
    rows, cols = p.get("rows", 0), p.get("cols", 0)
    frames, samples, bits = max(p.get("frames", 1), 1), max(p.get("samples", 1), 1), p.get("bits", 16) or 16
    if rows * cols > limits.max_pixels:
        raise DicomLimitExceeded(
            "CXR_DICOM_MAX_PIXELS", f"DICOM declares {cols}x{rows} pixels, more than {limits.max_pixels}"
        )
    if frames > limits.max_frames:
        raise DicomLimitExceeded(
            "CXR_DICOM_MAX_FRAMES",
            f"multi-frame image with {frames} frames: send one radiograph per file (single-frame DICOM)",
        )
    decoded = rows * cols * frames * samples * ((bits + 7) // 8)
    if decoded > limits.max_pixel_bytes:
        raise DicomLimitExceeded(
            "CXR_DICOM_MAX_PIXEL_BYTES",
            f"DICOM declares {decoded} bytes of decoded pixels, more than {limits.max_pixel_bytes}",
        )


def first_fragment(data: bytes, offset: int, cap: int = 1 << 16) -> bytes:
    """The start (at most ``cap`` bytes) of the first fragment of encapsulated pixel data."""
    pos = offset
    for _ in range(2):  # the Basic Offset Table item, then the first fragment
        if data[pos : pos + 4] != b"\xfe\xff\x00\xe0":
            return b""
        length = _u32(data, pos + 4, True)
        if _ == 1:
            return data[pos + 8 : pos + 8 + min(length, cap)]
        pos += 8 + length
    return b""


def codestream_size(fragment: bytes) -> tuple[int, int, int] | None:
    """(rows, cols, components) a JPEG, JPEG-LS or JPEG 2000 codestream declares; None if unreadable."""
    from pydicom.pixels.utils import _get_jpg_parameters  # pydicom's own SOF parser (private, pinned)

    if fragment[:2] == b"\xff\xd8":
        info: dict[str, Any] = _get_jpg_parameters(fragment)
        if "height" in info:
            return int(info["height"]), int(info["width"]), int(info["components"])
        return None
    start = fragment.find(b"\xff\x4f\xff\x51")  # J2K SOC + SIZ (raw codestream or inside a jp2c box)
    if start < 0 or len(fragment) < start + 42:
        return None
    width = (
        struct.unpack(">I", fragment[start + 8 : start + 12])[0]
        - struct.unpack(">I", fragment[start + 16 : start + 20])[0]
    )
    height = (
        struct.unpack(">I", fragment[start + 12 : start + 16])[0]
        - struct.unpack(">I", fragment[start + 20 : start + 24])[0]
    )
    components = struct.unpack(">H", fragment[start + 40 : start + 42])[0]
    return height, width, components


def check_codestream(data: bytes, facts: StreamFacts, transfer_syntax: str, limits: DicomLimits) -> None:
    """Encapsulated pixel data must declare the size the header declares (decoders allocate by it)."""
    if facts.pixel_offset is None or facts.pixel_length != _UNDEFINED or transfer_syntax == _RLE:
        return  # native pixels (size checked by pydicom against the header) or RLE (sized by the header)
    fragment = first_fragment(data, facts.pixel_offset)
    if not fragment:
        raise CorruptImage("encapsulated pixel data has no fragment: the file is truncated or garbled")
    size = codestream_size(fragment)
    if size is None:
        raise CorruptImage(
            f"compressed pixel data ({transfer_syntax}) has no readable JPEG / JPEG 2000 frame header"
        )
    rows, cols, components = size
    want = (facts.pixel.get("rows", 0), facts.pixel.get("cols", 0))
    if (rows, cols) != want or components > 4:
        raise DicomLimitExceeded(
            "CXR_DICOM_MAX_PIXELS",
            f"compressed frame declares {cols}x{rows}x{components}, the header {want[1]}x{want[0]}: "
            "refused before decoding",
        )


# ---------------------------------------------------------------------------- reading


@dataclass
class _Layout:
    """Where the dataset starts and how it is encoded, from the file meta (or a guess without one)."""

    start: int
    transfer_syntax: str
    explicit: bool
    little: bool


def _layout(data: bytes, sniffed: bool, limits: DicomLimits) -> _Layout:
    meta_start = 132 if sniffed else 0
    if data[meta_start : meta_start + 2] == b"\x02\x00":
        meta_explicit = _first_element_explicit(data, meta_start, True)
        meta, end = walk(
            data, meta_start, explicit=meta_explicit, little=True, limits=limits, stop_at_group=0x0002
        )
        del meta
        ts = _meta_transfer_syntax(data, meta_start, end, meta_explicit)
        if ts == _DEFLATED:
            return _Layout(end, ts, explicit=True, little=True)
        # pydicom trusts the first element over the meta when they disagree: so does the walk
        return _Layout(end, ts, explicit=_looks_explicit(data, end), little=ts != _EXPLICIT_BE)
    explicit = _looks_explicit(data, meta_start)
    return _Layout(meta_start, "1.2.840.10008.1.2.1" if explicit else _IMPLICIT_LE, explicit, True)


def _looks_explicit(data: bytes, pos: int) -> bool:
    """Whether the element at ``pos`` carries a VR (two upper-case letters after the tag)."""
    vr = data[pos + 4 : pos + 6]
    return len(vr) == 2 and vr.isalpha() and vr.isupper()


def _meta_transfer_syntax(data: bytes, start: int, end: int, explicit: bool) -> str:
    pos = start
    while pos + 8 <= end:
        element = _u16(data, pos + 2, True)
        _, length, header = _element_header(data, pos, explicit, True)
        if element == 0x0010:
            return data[pos + header : pos + header + length].decode("ascii", "replace").strip("\x00 ")
        pos += header + length
    return "1.2.840.10008.1.2.1"


def inflate(raw: bytes, limits: DicomLimits) -> bytes:
    """Raw-deflate data (PS3.5 A.5) inflated in a stream, refused beyond CXR_DICOM_MAX_INFLATED_BYTES."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        out = inflater.decompress(raw, limits.max_inflated_bytes + 1)
    except zlib.error as exc:
        raise CorruptImage(f"deflated DICOM dataset cannot be inflated ({exc})") from exc
    if len(out) > limits.max_inflated_bytes or inflater.unconsumed_tail:
        raise DicomLimitExceeded(
            "CXR_DICOM_MAX_INFLATED_BYTES",
            f"deflated DICOM dataset inflates to more than {limits.max_inflated_bytes} bytes",
        )
    return out


def _stop_at_command_group(tag: BaseTag, vr: str | None, length: int) -> bool:
    """Command elements never occur in a stored dataset: zero fill reads as (0000,0000)."""
    return tag.group == 0


def _stop_at_pixels(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag.group == 0 or tag == _PIXEL_DATA


@dataclass
class GuardedDataset:
    """A dataset that passed every limit, with the walk's facts (for metrics and tests)."""

    dataset: Dataset
    facts: StreamFacts
    transfer_syntax: str


def read_guarded(
    data: bytes, *, sniffed: bool, limits: DicomLimits, stop_before_pixels: bool = False
) -> GuardedDataset:
    """Check ``data`` against ``limits``, then parse it with pydicom.

    Raises :class:`DicomLimitExceeded` (a limit), :class:`CorruptImage` (the
    bytes lie about themselves) or lets pydicom's own errors through for the
    caller to classify (the walk already bounded what pydicom will do).
    """
    layout = _layout(data, sniffed, limits)
    if layout.transfer_syntax == _DEFLATED:
        body = inflate(data[layout.start :], limits)
        # pydicom trusts the first element over the transfer syntax here too (``_is_implicit_vr``)
        facts, _ = walk(body, 0, explicit=_first_element_explicit(body, 0, True), little=True, limits=limits)
        check_declared_size(facts, limits)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            meta = read_partial(
                io.BytesIO(data[: layout.start]), stop_when=_stop_at_command_group, force=True
            )
            inner = read_dataset(
                io.BytesIO(body),
                is_implicit_VR=False,
                is_little_endian=True,
                stop_when=_stop_at_command_group,
            )
        ds = FileDataset("", inner, preamble=data[:128] if sniffed else None, file_meta=meta.file_meta)
        return GuardedDataset(ds, facts, layout.transfer_syntax)
    facts, _ = walk(data, layout.start, explicit=layout.explicit, little=layout.little, limits=limits)
    check_declared_size(facts, limits)
    if not stop_before_pixels:
        check_codestream(data, facts, layout.transfer_syntax, limits)
    stop = _stop_at_pixels if stop_before_pixels else _stop_at_command_group
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = read_partial(io.BytesIO(data), stop_when=stop, force=True)
    return GuardedDataset(ds, facts, layout.transfer_syntax)

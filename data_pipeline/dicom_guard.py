"""The one guarded DICOM reader: every byte from outside is checked here before pydicom parses it.

pydicom trusts its input: it follows sequences as deep as the file nests them
(5,000 levels later ran the gateway out of memory while writing them back),
reads as many elements as the bytes hold, inflates Deflated Explicit VR Little
Endian with one unbounded ``zlib.decompress``, and lets a JPEG codestream
allocate whatever its own frame header declares. pydicom has no hook for any
of these limits, so an iterative walk over the raw element headers
(hand-written for that reason; no recursion, no value decoding) measures the
stream first:

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
pydicom then parses (100,000 of them in 866 KB). For the same reason it takes
an element for a sequence exactly where pydicom will parse one (an SQ, a UN
of undefined length, a UN shorter than 64 KiB or an implicit element that the
data dictionary, or the private dictionary through the element's creator,
calls SQ), bounds implicit-VR text by the dictionary's VR, lets pydicom's own
file meta reader give the transfer syntax, and guesses the byte order of a
file without one as pydicom does.

Some structures pydicom reads in ways no header walk can follow: a leading
command group (read whole, before the dataset), an undefined length on
anything but a sequence or Pixel Data (read as bytes up to the first
delimiter found by a byte scan, also the fallback for encapsulated pixel data
without its delimiter), anything but an item inside a sequence, a length
running past the end of the sequence or item holding it (pydicom reads a
defined-length sequence apart, from its own bytes). No real file has them, so
the walk refuses them as :class:`CorruptImage` with a message naming the
structure, rather than guessing.

Only then does pydicom read the dataset. Each refusal is a
:class:`DicomLimitExceeded` naming the setting that bounds it, so the gateway
can answer a 4xx that tells an integrator which limit the file broke.
"""

from __future__ import annotations

import functools
import io
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Any

import pydicom.uid
from pydicom.datadict import dictionary_VR, private_dictionaries, private_dictionary_VR
from pydicom.dataset import Dataset, FileDataset
from pydicom.filereader import _read_file_meta_info, read_dataset, read_partial
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.values import converters

from data_pipeline.errors import CorruptImage, UnsupportedImage

_UNDEFINED = 0xFFFFFFFF
# Explicit VR with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2)
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_PIXEL_DATA = 0x7FE00010
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
class _Creators:
    """The private creators of one dataset (the top level or one item), as pydicom looks private VRs up.

    pydicom (``hooks._private_vr_for_tag``) finds an implicit or UN private element's VR through its
    creator in the same dataset, wherever that creator stands; the walk meets the elements in file
    order, so an element met before its creator waits in ``waiting`` (tag, length) until it comes.
    A name of None is a creator value pydicom may decode otherwise than ASCII would.
    """

    names: dict[int, str | None] = field(default_factory=dict)
    waiting: dict[int, list[tuple[int, int]]] = field(default_factory=dict)


@dataclass
class _Open:
    """One open sequence, item or encapsulated value while walking.

    ``end`` is where it ends (None: delimited); ``bound`` the nearest end of it or of any enclosing
    one (None: the end of the data), which nothing inside may cross. For a sequence, ``explicit``
    is the encoding pydicom hands to its items (each explicit item is re-checked, see
    :func:`_first_element_explicit`); for an item, the one it is read in.
    """

    kind: str  # "sequence", "item" or "fragments" (encapsulated bytes: items hold no elements)
    end: int | None
    explicit: bool
    bound: int | None
    creators: _Creators | None = None  # items only


_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQUENCE_END = 0xFFFEE0DD
#: VRs whose values are bulk bytes, not text (pydicom's private dictionary spells one "OB_OW")
_BULK = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN", "OB_OW"})


def _u16(data: bytes, pos: int, little: bool) -> int:
    return int.from_bytes(data[pos : pos + 2], "little" if little else "big")


def _u32(data: bytes, pos: int, little: bool) -> int:
    return int.from_bytes(data[pos : pos + 4], "little" if little else "big")


def _first_element_explicit(data: bytes, pos: int, told: bool, *, item: bool = False, end: int = -1) -> bool:
    """Whether pydicom reads the dataset (or sequence item) starting at ``pos`` as explicit VR.

    pydicom (``read_dataset`` -> ``_is_implicit_vr``) trusts the first
    element over the encoding it was told (the transfer syntax, explicit for
    the file meta, the parent's for an item): two bytes A-Z where the VR would
    be read as explicit, anything else as implicit. It keeps ``told`` with
    fewer than two such bytes before ``end`` (the end of the bytes it reads from),
    and never reads an implicit parent's item as explicit.
    """
    if (item and not told) or pos + 6 > (len(data) if end < 0 else end):
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
        if vr.decode() not in converters:
            # pydicom reads the element, then raises NotImplementedError when its value is used
            # (a 500 wherever a header is read): refused here, where the message can say why
            raise CorruptImage(
                f"an element has the value representation {vr.decode()!r}, which DICOM does not define"
            )
        return vr, _u16(data, pos + 6, little), 8
    return None, _u32(data, pos + 4, little), 8


def _undefined_is_sequence(data: bytes, pos: int, tag: int, vr: bytes | None, little: bool) -> bool:
    """Whether pydicom reads an undefined-length value at ``pos`` as a sequence rather than as bytes.

    ``data_element_generator``: an explicit SQ, or UN (``infer_sq_for_un_vr``); with no VR, what the
    data dictionary says (``_dictionary_vr_fast``, the same table as ``dictionary_VR``), or for a
    tag it lacks, whether the value starts with an item tag.
    """
    if vr is not None:
        return vr in (b"SQ", b"UN")
    try:
        return str(dictionary_VR(tag)) == "SQ"
    except KeyError:
        return data[pos : pos + 4] == (b"\xfe\xff\x00\xe0" if little else b"\xff\xfe\xe0\x00")


def _read_as(tag: int, vr: bytes | None, length: int, creators: _Creators) -> str:
    """The VR pydicom converts a defined-length element with when it is accessed (``hooks.raw_element_vr``).

    No VR (implicit): the data dictionary's, a private element's through its creator, UL for a
    group length, else UN. An explicit UN: a private element's through its creator, a standard
    one's from the dictionary when shorter than 0xFFFF bytes (``replace_un_with_known_vr``), so an
    SQ sent as UN is a sequence pydicom parses when the element is read.
    """
    group, element = tag >> 16, tag & 0xFFFF
    if vr is None:
        try:
            return str(dictionary_VR(tag))
        except KeyError:
            if group % 2:
                return _private_vr(tag, length, creators)
            return "UL" if element == 0 else "UN"
    name = vr.decode("latin-1")
    if name == "UN":
        if group % 2:
            return _private_vr(tag, length, creators)
        if length < 0xFFFF:
            try:
                return str(dictionary_VR(tag))
            except KeyError:
                pass
    return name


def _private_vr(tag: int, length: int, creators: _Creators) -> str:
    """A private element's VR as pydicom finds it (``hooks._private_vr_for_tag``): through its creator."""
    element = tag & 0xFFFF
    if 0x0010 <= element < 0x0100:
        return "LO"
    if not element & 0xFF00:
        return "UN"
    owner = (tag & 0xFFFF0000) | (element >> 8)
    if owner not in creators.names:
        creators.waiting.setdefault(owner, []).append((tag, length))
        return "UN"
    return _private_dictionary_vr(tag, creators.names[owner])


def _private_dictionary_vr(tag: int, creator: str | None) -> str:
    """The private dictionary's VR for ``tag`` under ``creator`` (UN when it has none).

    A creator whose bytes pydicom may decode to another name (not plain ASCII, several values) is
    refused where some private dictionary would make the element a sequence: the walk cannot tell
    whether pydicom builds one.
    """
    if creator is not None:
        try:
            return str(private_dictionary_VR(tag, creator))
        except KeyError:
            return "UN"
    group, element = f"{tag >> 16:04X}", f"{tag & 0xFFFF:04X}"
    keys = {group + element, f"{group}xx{element[2:]}", f"{group[:2]}xxxx{element[2:]}"}  # get_private_entry
    if keys & _private_sequence_keys():
        raise CorruptImage(
            f"DICOM private element ({tag >> 16:04X},{tag & 0xFFFF:04X}) has a private creator that "
            "is not plain ASCII text, and pydicom's private dictionary reads it as a sequence for some "
            "creator"
        )
    return "UN"


@functools.cache
def _private_sequence_keys() -> frozenset[str]:
    """Every private dictionary key (tag pattern) that some creator's dictionary gives VR SQ."""
    return frozenset(
        key for entries in private_dictionaries.values() for key, e in entries.items() if e[0] == "SQ"
    )


def _creator_name(raw: bytes, vr: bytes | None) -> str | None:
    """The private creator pydicom looks up: LO text, trailing NULs and spaces stripped (``convert_text``).

    None for a value other decodings or VRs could turn into another name (or several values).
    """
    if vr not in (None, b"LO", b"UN"):
        return None
    text = raw.rstrip(b"\x00 ")
    if any(b < 0x20 or b > 0x7E or b == 0x5C for b in text):
        return None
    return text.decode("ascii")


def _check_text(tag: int, read_as: str, length: int, limits: DicomLimits) -> None:
    """Non-bulk values (text, numbers) over CXR_DICOM_MAX_TEXT_BYTES: explicit or implicit VR alike."""
    if length > limits.max_text_bytes and not any(part in _BULK for part in read_as.split(" or ")):
        raise DicomLimitExceeded(
            "CXR_DICOM_MAX_TEXT_BYTES",
            f"DICOM element ({tag >> 16:04X},{tag & 0xFFFF:04X}) holds {length} bytes of text",
        )


def _add_creator(tag: int, name: str | None, creators: _Creators, limits: DicomLimits) -> None:
    """Record a private creator; its elements met before it are checked now, as pydicom will read them."""
    if tag in creators.names and creators.names[tag] != name:
        raise CorruptImage(
            f"DICOM private creator ({tag >> 16:04X},{tag & 0xFFFF:04X}) is given twice with different values"
        )
    creators.names[tag] = name
    for element, length in creators.waiting.pop(tag, []):
        read_as = _private_dictionary_vr(element, name)
        if read_as == "SQ":
            raise CorruptImage(
                f"DICOM private element ({element >> 16:04X},{element & 0xFFFF:04X}) comes before its "
                "private creator, which makes pydicom read it as a sequence: the file is not in tag order"
            )
        _check_text(element, read_as, length, limits)


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

    Where pydicom's reading of a structure depends on more than its headers (a
    delimiter searched for byte by byte, a length crossing the end of the
    sequence or item holding it), the walk refuses the file with
    :class:`CorruptImage` instead of guessing: real files have none of these.
    """
    facts = StreamFacts()
    stack: list[_Open] = []
    top_creators = _Creators()
    pos, size = start, len(data)
    while True:
        while stack and stack[-1].end is not None and pos == stack[-1].end:
            stack.pop()
        bound = stack[-1].bound if stack else None
        if bound is not None and pos >= bound:
            raise CorruptImage(_past_end(stack[-1]))
        limit = size if bound is None else bound
        if pos + 8 > limit:
            if stack:
                raise CorruptImage(_past_end(stack[-1]) if bound is not None else _unclosed(stack[-1]))
            return facts, pos
        context = stack[-1].kind if stack else "item"
        group = _u16(data, pos, little)
        element = _u16(data, pos + 2, little)
        tag = (group << 16) | element
        if context != "item":  # a sequence or encapsulated value, not a dataset
            # pydicom reads a tag and a 4-byte length here, no VR (read_sequence_item, encapsulated values)
            _count(facts, limits)
            length = _u32(data, pos + 4, little)
            pos += 8
            if tag == _SEQUENCE_END:
                closed = stack.pop()
                # pydicom parses a defined-length sequence's bytes alone: the rest of them it never reads
                if closed.end is not None:
                    pos = closed.end
                continue
            if tag == _ITEM_END and length == 0 and context == "sequence":
                # a stray item delimiter after a defined-length item (a vendor quirk DCMTK warns of):
                # pydicom reads it as an empty item, and so does the walk
                continue
            if tag != _ITEM:
                raise CorruptImage(
                    f"DICOM {_NAMES[context]} holds ({group:04X},{element:04X}) where an item belongs: "
                    "pydicom would read it as an item (or scan for a delimiter) where the walk cannot follow"
                )
            end = None if length == _UNDEFINED else pos + length
            if end is not None and end > limit:
                raise CorruptImage(_crossing(tag, length, limit - pos, bound is None))
            if context == "fragments":
                if end is None:
                    raise CorruptImage("encapsulated pixel data has a fragment of undefined length")
                pos = end
                continue
            item_explicit = _first_element_explicit(data, pos, stack[-1].explicit, item=True, end=limit)
            stack.append(_Open("item", end, item_explicit, bound if end is None else end, _Creators()))
            continue
        if not stack and stop_at_group is not None and group != stop_at_group:
            return facts, pos
        if not stack and group == 0:
            if pos == start:
                # pydicom reads a leading command group (as a command set) before the dataset, with no
                # stop_when: a walk stopping here saw none of the dataset pydicom then reads whole
                raise CorruptImage(
                    f"DICOM has a command group ({group:04X},{element:04X}) in a stored instance: a network "
                    "message or zero fill, not a DICOM file (PS3.10)"
                )
            return facts, pos  # zero fill / command group: pydicom is told to stop here too
        _count(facts, limits)
        enc_explicit = stack[-1].explicit if stack else explicit
        vr, length, header = _element_header(data, pos, enc_explicit, little)
        if group == 0xFFFE:
            if tag == _ITEM_END and stack and pos + header <= limit:
                pos += header  # pydicom reads the delimiter's header like any element's and ends the item
                stack.pop()
                continue
            raise CorruptImage(
                f"DICOM has ({group:04X},{element:04X}) where a data element belongs: an item or delimiter "
                "outside any sequence, or a sequence delimiter inside an item"
            )
        pos += header
        if not stack and tag == _PIXEL_DATA:
            facts.pixel_offset, facts.pixel_length = pos, length  # walked on: pydicom reads what follows too
        creators = stack[-1].creators if stack and stack[-1].creators is not None else top_creators
        if length == _UNDEFINED:
            is_sequence = _undefined_is_sequence(data, pos, tag, vr, little)
            if tag == _PIXEL_DATA and is_sequence:
                raise CorruptImage("DICOM Pixel Data is encoded as a sequence (VR SQ or UN): not an image")
            if tag != _PIXEL_DATA and not is_sequence:
                # pydicom reads it as bytes up to the first sequence delimiter it finds, in an item or not
                raise CorruptImage(
                    f"DICOM element ({group:04X},{element:04X}) has an undefined length on a non-sequence "
                    "element other than Pixel Data"
                )
            _open(
                stack,
                facts,
                limits,
                _Open("sequence" if is_sequence else "fragments", None, enc_explicit, bound),
            )
            if group % 2 and 0x0010 <= element < 0x0100:
                _add_creator(tag, None, creators, limits)
            continue
        if pos + length > limit:
            raise CorruptImage(_crossing(tag, length, limit - pos, bound is None))
        read_as = _read_as(tag, vr, length, creators)
        if read_as == "SQ":
            if tag == _PIXEL_DATA:
                raise CorruptImage("DICOM Pixel Data is encoded as a sequence (VR SQ or UN): not an image")
            # pydicom parses it (an SQ, or a UN or implicit element its dictionaries call SQ) when it is
            # read, its items in this dataset's encoding, each re-checked
            _open(stack, facts, limits, _Open("sequence", pos + length, enc_explicit, pos + length))
            if group % 2 and 0x0010 <= element < 0x0100:
                _add_creator(tag, None, creators, limits)
            continue
        _check_text(tag, read_as, length, limits)
        if group % 2 and 0x0010 <= element < 0x0100:
            _add_creator(tag, _creator_name(data[pos : pos + length], vr), creators, limits)
        if not stack and tag in _PIXEL_MODULE:
            facts.pixel[_PIXEL_MODULE[tag]] = _pixel_value(data[pos : pos + length], tag, little)
        pos += length


_NAMES = {"sequence": "sequence", "fragments": "encapsulated pixel data"}


def _count(facts: StreamFacts, limits: DicomLimits) -> None:
    facts.elements += 1
    if facts.elements > limits.max_elements:
        raise DicomLimitExceeded(
            "CXR_DICOM_MAX_ELEMENTS", f"DICOM holds more than {limits.max_elements} elements"
        )


def _open(stack: list[_Open], facts: StreamFacts, limits: DicomLimits, opened: _Open) -> None:
    """Enter a sequence (or encapsulated value): one level deeper."""
    depth = sum(o.kind != "item" for o in stack) + 1
    facts.max_depth = max(facts.max_depth, depth)
    if depth > limits.max_depth:
        raise DicomLimitExceeded(
            "CXR_DICOM_MAX_DEPTH", f"DICOM sequences are nested deeper than {limits.max_depth} levels"
        )
    stack.append(opened)


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


def _crossing(tag: int, length: int, left: int, at_end_of_data: bool) -> str:
    """A length past the data (truncated) or past the sequence or item holding it (pydicom reads it apart)."""
    if at_end_of_data:
        return _lying_length(tag, length, left)
    return (
        f"DICOM element ({tag >> 16:04X},{tag & 0xFFFF:04X}) says {length} bytes but only {max(left, 0)} "
        "remain in the sequence or item holding it: an element's length runs past the end of its "
        "sequence item"
    )


def _past_end(opened: _Open) -> str:
    return (
        f"DICOM {opened.kind if opened.kind != 'fragments' else 'encapsulated value'} runs past the end of "
        "the sequence or item holding it: an element's length runs past the end of its sequence item"
    )


def _unclosed(opened: _Open) -> str:
    name = {"sequence": "a sequence", "item": "a sequence item", "fragments": "encapsulated pixel data"}
    return f"DICOM ends inside {name[opened.kind]} that has no delimiter: the file is truncated"


# ---------------------------------------------------------------------------- pixel size


def check_declared_size(facts: StreamFacts, limits: DicomLimits) -> None:
    """Refuse on the declared image size, before any decoder allocates anything."""
    p = facts.pixel
    rows, cols = p.get("rows", 0), p.get("cols", 0)
    frames, samples, bits = max(p.get("frames", 1), 1), max(p.get("samples", 1), 1), p.get("bits", 16) or 16
    _check_sizes(rows, cols, frames, samples, bits, limits)


def check_parsed_size(ds: Dataset, limits: DicomLimits) -> None:
    """The same limits on the values pydicom parsed, just before its pixel decoder runs.

    The walk reads Rows, Columns and NumberOfFrames from the raw bytes as their usual VRs; sent
    as others (NumberOfFrames as US 1024, Rows as UL 0x10001, NumberOfFrames "1e3") pydicom reads
    other numbers than the walk did, and would decode every frame it declares.
    """
    try:
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.get("BitsAllocated", 16) or 16)
    except (TypeError, ValueError, OverflowError) as exc:
        raise CorruptImage(
            f"the image size attributes are not single whole numbers ({type(exc).__name__})"
        ) from None
    _check_sizes(rows, cols, max(frames, 1), max(samples, 1), bits, limits)


def _check_sizes(rows: int, cols: int, frames: int, samples: int, bits: int, limits: DicomLimits) -> None:
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


_SOC_SIZ = b"\xff\x4f\xff\x51"
_JP2_MAGIC = (b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\r\n\x87\n")  # openjpeg's MAGIC_NUMBERS for JP2


def j2k_codestream(fragment: bytes) -> bytes | None:
    """The JPEG 2000 codestream a decoder reads from ``fragment``; None if it finds none there.

    openjpeg (and Pillow) tell the format by the first bytes: a raw codestream starts with SOC + SIZ,
    a JP2 file (non-conformant in DICOM, PS3.5 A.4.4, but written by some encoders) is read box by
    box up to its first top-level ``jp2c`` box. A SOC + SIZ found anywhere else (inside an XML or
    UUID box before ``jp2c``) is not the header the decoder sizes the image by: it was taken for it,
    so a decoy 8x8 SIZ let a 566-byte JP2 decode 6000x6000 pixels behind an 8x8 header.
    """
    if fragment[:4] == _SOC_SIZ:
        return fragment
    if not fragment.startswith(_JP2_MAGIC):
        return None
    pos = 0
    while pos + 8 <= len(fragment):
        length, head = int.from_bytes(fragment[pos : pos + 4], "big"), 8
        if length == 1:  # XLBox: an 8-byte length follows the type
            length, head = int.from_bytes(fragment[pos + 8 : pos + 16], "big"), 16
        if fragment[pos + 4 : pos + 8] == b"jp2c":
            stream = fragment[pos + head :]
            return stream if stream[:4] == _SOC_SIZ else None
        if length < head:  # 0 runs to the end of the file; less than a header never ends
            return None
        pos += length
    return None


def codestream_size(fragment: bytes) -> tuple[int, int, int, int] | None:
    """(rows, cols, components, bits per sample) a JPEG, JPEG-LS or JPEG 2000 codestream declares.

    None if unreadable. The bits are the largest precision of any component.
    """
    from pydicom.pixels.utils import _get_jpg_parameters  # pydicom's own SOF parser (private, pinned)

    if fragment[:2] == b"\xff\xd8":
        info: dict[str, Any] = _get_jpg_parameters(fragment)
        if "height" in info:
            return int(info["height"]), int(info["width"]), int(info["components"]), int(info["precision"])
        return None
    stream = j2k_codestream(fragment)
    if stream is None or len(stream) < 42:
        return None
    width = struct.unpack(">I", stream[8:12])[0] - struct.unpack(">I", stream[16:20])[0]
    height = struct.unpack(">I", stream[12:16])[0] - struct.unpack(">I", stream[20:24])[0]
    components = struct.unpack(">H", stream[40:42])[0]
    ssiz = stream[42 : 42 + 3 * components : 3]  # Ssiz of each component: precision - 1, sign in bit 7
    if len(ssiz) < components:
        return None
    return height, width, components, max(((b & 0x7F) + 1 for b in ssiz), default=0)


def _encapsulated_syntax(transfer_syntax: str) -> bool:
    try:
        return bool(pydicom.uid.UID(transfer_syntax).is_encapsulated)
    except ValueError:  # not a transfer syntax pydicom knows: it has no decoder for it either
        return False


def check_codestream(data: bytes, facts: StreamFacts, transfer_syntax: str, limits: DicomLimits) -> None:
    """Encapsulated pixel data must declare the image the header declares (decoders allocate by it).

    Its rows, columns and samples must be the header's, and no sample wider than Bits Allocated:
    a decoder allocates what the codestream says, so a 4-component 16-bit codestream behind an 8-bit
    grey header decoded 8x the bytes CXR_DICOM_MAX_PIXEL_BYTES had bounded.

    pydicom parses the items of a compressed syntax's Pixel Data whatever its length, so a
    defined-length value (PS3.5 A.4 requires undefined length) hid its codestream from this check:
    a 1 KB JPEG of 20000x20000 behind an 8x8 header decoded 400 MB (2 GB peak) before failing.
    """
    if facts.pixel_offset is None:
        return
    if facts.pixel_length != _UNDEFINED:
        if _encapsulated_syntax(transfer_syntax):
            raise CorruptImage(
                f"Pixel Data of compressed transfer syntax {transfer_syntax} has a defined length: "
                "compressed frames must be encapsulated in an undefined-length Pixel Data (PS3.5 A.4)"
            )
        return  # native pixels (size checked by pydicom against the header)
    if transfer_syntax == _RLE:
        return  # RLE: sized by the header
    fragment = first_fragment(data, facts.pixel_offset)
    if not fragment:
        raise CorruptImage("encapsulated pixel data has no fragment: the file is truncated or garbled")
    size = codestream_size(fragment)
    if size is None:
        raise CorruptImage(
            f"compressed pixel data ({transfer_syntax}) has no readable JPEG / JPEG 2000 frame header"
        )
    rows, cols, components, precision = size
    p = facts.pixel
    want = (p.get("rows", 0), p.get("cols", 0), max(p.get("samples", 1), 1))
    bits = p.get("bits", 16) or 16
    if (rows, cols, components) != want or precision > bits:
        raise DicomLimitExceeded(
            "CXR_DICOM_MAX_PIXELS",
            f"compressed frame declares {cols}x{rows}x{components} of {precision} bits, the header "
            f"{want[1]}x{want[0]}x{want[2]} of {bits} bits: refused before decoding",
        )


#: (7FE0,0001) Extended Offset Table: where pydicom's decoder starts each frame (PS3.3 C.7.6.3.1.8)
_EXTENDED_OFFSETS = 0x7FE00001


def check_extended_offsets(ds: Dataset) -> None:
    """pydicom's first decoded frame must start at the first fragment, the one :func:`check_codestream` read.

    With an Extended Offset Table pydicom reads frame 1 from the byte its first offset names,
    whichever fragment (or part of one) that is: a checked 8x8 JPEG first, a 20000x20000 one second
    and an offset to it decoded 400 MB (2 GB peak) behind an 8x8 header. The standard's first
    offset is 0, the first fragment; any other is refused.
    """
    if _EXTENDED_OFFSETS not in ds:
        return
    try:
        value = ds[_EXTENDED_OFFSETS].value
    except Exception as exc:  # a value pydicom cannot convert: its decoder cannot use it either
        raise CorruptImage(f"the Extended Offset Table cannot be read ({type(exc).__name__})") from None
    if isinstance(value, bytes | bytearray):
        first: object = int.from_bytes(value[:8], "little") if len(value) >= 8 else 0
    elif isinstance(value, list | tuple | MultiValue):
        first = value[0] if value else 0
    else:
        first = value
    if first not in (0, None):
        raise CorruptImage(
            "the Extended Offset Table's first frame does not start at the first fragment "
            "(PS3.3 C.7.6.3.1.8: its first offset is 0)"
        )


# ---------------------------------------------------------------------------- reading


@dataclass
class _Layout:
    """Where the dataset starts and how pydicom reads it, from the file meta (or its guess without one)."""

    start: int
    transfer_syntax: str
    explicit: bool
    little: bool
    deflated: bool = False


#: a non-group-0002 element header: pydicom's file meta reader stops at it without reading a value
_META_STOP = b"\x08\x00\x00\x00\x00\x00\x00\x00"


def _layout(data: bytes, limits: DicomLimits) -> _Layout:
    """Mirror ``read_partial``: the preamble, the file meta, then the transfer syntax pydicom acts on.

    The meta is walked (bounded like the dataset) and then read by pydicom's own file meta
    reader, on those bytes only: the Transfer Syntax UID it gives (the last of several, whitespace
    stripped from both ends but a leading NUL kept, bytes when its VR is OB, after the re-read it
    makes when the lowest meta element has an unknown VR) is the very value ``read_partial`` then
    compares, so the walk cannot disagree with pydicom on the dataset's encoding. A meta pydicom
    ends elsewhere than the walk, or with more elements than it counted, is refused.
    """
    meta_start = 132 if data[128:132] == b"DICM" else 0  # read_preamble(force=True)
    end, syntax = meta_start, None
    if data[meta_start : meta_start + 2] == b"\x02\x00":
        meta_explicit = _first_element_explicit(data, meta_start, True)
        meta, end = walk(
            data, meta_start, explicit=meta_explicit, little=True, limits=limits, stop_at_group=0x0002
        )
        fp = io.BytesIO(data[meta_start:end] + _META_STOP)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                file_meta = _read_file_meta_info(fp)
                syntax = file_meta.get("TransferSyntaxUID")
        except Exception as exc:
            raise CorruptImage(f"DICOM file meta cannot be read ({type(exc).__name__})") from exc
        if fp.tell() != end - meta_start or len(file_meta._dict) > meta.elements:
            raise CorruptImage("DICOM file meta group is not where its element lengths put it: garbled")
    return _dataset_layout(data, end, syntax)


def _dataset_layout(data: bytes, start: int, syntax: Any) -> _Layout:
    """The encoding ``read_partial`` picks for the dataset at ``start``, from the meta's transfer syntax.

    Without one it guesses from the first element: explicit VR if the VR bytes are a VR pydicom
    converts, and big endian then if the group read little endian is 0x0400 or more.
    """
    explicit, little = False, True
    if start + 8 > len(data):
        pass  # pydicom reads nothing: its command-set read takes the last bytes and finds no element
    elif syntax is None:
        if data[start + 4 : start + 6].decode("latin-1") in converters:
            explicit = True
            little = _u16(data, start, True) < 0x0400
    elif syntax == pydicom.uid.ImplicitVRLittleEndian:
        pass
    elif syntax == pydicom.uid.ExplicitVRBigEndian:
        explicit, little = True, False
    elif syntax == pydicom.uid.DeflatedExplicitVRLittleEndian:
        return _Layout(start, _DEFLATED, explicit=True, little=True, deflated=True)
    elif syntax in pydicom.uid.PrivateTransferSyntaxes:
        registered = pydicom.uid.PrivateTransferSyntaxes[pydicom.uid.PrivateTransferSyntaxes.index(syntax)]
        explicit, little = not registered.is_implicit_VR, registered.is_little_endian
    else:  # Explicit VR Little Endian and every other (encapsulated) syntax
        explicit = True
    name = str(syntax) if isinstance(syntax, str) else ""
    # pydicom trusts the first element over the meta when they disagree: so does the walk
    return _Layout(start, name, explicit=_first_element_explicit(data, start, explicit), little=little)


def _looks_explicit(data: bytes, pos: int) -> bool:
    """Whether the element at ``pos`` carries a VR (two upper-case letters after the tag)."""
    vr = data[pos + 4 : pos + 6]
    return len(vr) == 2 and vr.isalpha() and vr.isupper()


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
    ``sniffed`` is kept for callers; whether a preamble is there is decided
    as pydicom decides it ("DICM" at byte 128), so the two cannot disagree.
    """
    del sniffed
    layout = _layout(data, limits)
    if layout.deflated:
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
        preamble = data[:128] if data[128:132] == b"DICM" else None
        ds = FileDataset("", inner, preamble=preamble, file_meta=meta.file_meta)
        return GuardedDataset(ds, facts, layout.transfer_syntax)
    facts, _ = walk(data, layout.start, explicit=layout.explicit, little=layout.little, limits=limits)
    check_declared_size(facts, limits)
    if not stop_before_pixels:
        check_codestream(data, facts, layout.transfer_syntax, limits)
    stop = _stop_at_pixels if stop_before_pixels else _stop_at_command_group
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = read_partial(io.BytesIO(data), stop_when=stop, force=True)
    if not stop_before_pixels:
        check_extended_offsets(ds)
    return GuardedDataset(ds, facts, layout.transfer_syntax)

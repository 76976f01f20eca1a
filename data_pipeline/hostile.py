"""Hostile DICOM files, generated: the fuzz tests' and the ``hostile_corpus`` benchmark's input.

Each case is a small byte string that costs an unguarded reader a lot: deep
nesting, many elements, gigantic strings, lengths that lie, huge declared
sizes for native and every compressed syntax the decoder supports, deflate
bombs, truncations, invalid VRs and dates. They are written byte by byte
(not with pydicom, which refuses to write most of them) around one valid
64x64 image, so the hostile part is the only thing wrong with each file.
"""

from __future__ import annotations

import io
import random
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

_LONG = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
UNDEFINED = 0xFFFFFFFF
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED = "1.2.840.10008.1.2.1.99"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_LS = "1.2.840.10008.1.2.4.80"
J2K = "1.2.840.10008.1.2.4.90"
RLE = "1.2.840.10008.1.2.5"


@dataclass(frozen=True)
class HostileCase:
    name: str
    data: bytes


def element(group: int, elem: int, vr: bytes, value: bytes, *, length: int | None = None) -> bytes:
    """One Explicit VR Little Endian element; ``length`` overrides the true length (to lie)."""
    if len(value) % 2 and vr not in (b"SQ",):
        value += b"\x00" if vr in (b"UI", b"OB", b"UN") else b" "
    n = len(value) if length is None else length
    head = struct.pack("<HH", group, elem) + vr
    head += b"\x00\x00" + struct.pack("<I", n) if vr in _LONG else struct.pack("<H", n)
    return head + value


def _item(body: bytes, *, defined: bool) -> bytes:
    if defined:
        return struct.pack("<HHI", 0xFFFE, 0xE000, len(body)) + body
    return struct.pack("<HHI", 0xFFFE, 0xE000, UNDEFINED) + body + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)


def file_meta(transfer_syntax: str) -> bytes:
    """Preamble, "DICM" and a file meta group with its group length."""
    body = (
        element(0x0002, 0x0001, b"OB", b"\x00\x01")
        + element(0x0002, 0x0002, b"UI", b"1.2.840.10008.5.1.4.1.1.1.1")
        + element(0x0002, 0x0003, b"UI", b"1.2.826.0.1.3680043.10.1.1")
        + element(0x0002, 0x0010, b"UI", transfer_syntax.encode())
        + element(0x0002, 0x0012, b"UI", b"1.2.826.0.1.3680043.10.1")
    )
    return b"\x00" * 128 + b"DICM" + element(0x0002, 0x0000, b"UL", struct.pack("<I", len(body))) + body


def header(rows: int = 64, cols: int = 64, *, bits: int = 16, frames: int | None = None) -> bytes:
    """The SOP common + Image Pixel elements of a monochrome radiograph (no pixel data)."""
    out = (
        element(0x0008, 0x0016, b"UI", b"1.2.840.10008.5.1.4.1.1.1.1")
        + element(0x0008, 0x0018, b"UI", b"1.2.826.0.1.3680043.10.2.1")
        + element(0x0008, 0x0020, b"DA", b"20240101")
        + element(0x0008, 0x0060, b"CS", b"DX")
        + element(0x0010, 0x0010, b"PN", b"Hostile^Case")
        + element(0x0010, 0x0020, b"LO", b"HOSTILE-1")
        + element(0x0020, 0x000D, b"UI", b"1.2.826.0.1.3680043.10.3.1")
        + element(0x0020, 0x000E, b"UI", b"1.2.826.0.1.3680043.10.4.1")
        + element(0x0028, 0x0002, b"US", struct.pack("<H", 1))
        + element(0x0028, 0x0004, b"CS", b"MONOCHROME2")
    )
    if frames is not None:
        out += element(0x0028, 0x0008, b"IS", str(frames).encode())
    return out + (
        element(0x0028, 0x0010, b"US", struct.pack("<H", rows & 0xFFFF))
        + element(0x0028, 0x0011, b"US", struct.pack("<H", cols & 0xFFFF))
        + element(0x0028, 0x0100, b"US", struct.pack("<H", bits))
        + element(0x0028, 0x0101, b"US", struct.pack("<H", min(bits, 12)))
        + element(0x0028, 0x0102, b"US", struct.pack("<H", min(bits, 12) - 1))
        + element(0x0028, 0x0103, b"US", struct.pack("<H", 0))
    )


def native_pixels(rows: int = 64, cols: int = 64, seed: int = 0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 4096, (rows, cols), dtype=np.uint16)
    return element(0x7FE0, 0x0010, b"OW", arr.tobytes())


def valid(seed: int = 0) -> bytes:
    """A valid 64x64 12-bit DX: what each hostile case starts from."""
    return file_meta(EXPLICIT_LE) + header() + native_pixels(seed=seed)


def encapsulated(fragment: bytes) -> bytes:
    return (
        struct.pack("<HH", 0x7FE0, 0x0010)
        + b"OB\x00\x00"
        + struct.pack("<I", UNDEFINED)
        + struct.pack("<HHI", 0xFFFE, 0xE000, 0)
        + struct.pack("<HHI", 0xFFFE, 0xE000, len(fragment) + len(fragment) % 2)
        + fragment
        + b"\x00" * (len(fragment) % 2)
        + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    )


# ---------------------------------------------------------------------------- the cases


def deep_nesting(depth: int, *, defined: bool = False) -> bytes:
    """ContentSequence items nested ``depth`` deep (the gateway was OOM-killed at 5,000)."""
    inner = element(0x0040, 0xA160, b"UT", b"deepest")
    for _ in range(depth):
        item = _item(inner, defined=defined)
        if defined:
            inner = element(0x0040, 0xA730, b"SQ", item)
        else:
            inner = (
                struct.pack("<HH", 0x0040, 0xA730)
                + b"SQ\x00\x00"
                + struct.pack("<I", UNDEFINED)
                + item
                + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
            )
    return file_meta(EXPLICIT_LE) + header() + inner + native_pixels()


def many_elements(count: int) -> bytes:
    """``count`` tiny private elements: pydicom makes an object of each."""
    private = element(0x0009, 0x0010, b"LO", b"HOSTILE")
    private += b"".join(element(0x0009, 0x1000 + (i % 0xFF), b"SH", b"x") for i in range(count))
    return file_meta(EXPLICIT_LE) + header() + private + native_pixels()


def giant_text(nbytes: int) -> bytes:
    """One ImageComments-like UT value of ``nbytes``."""
    return file_meta(EXPLICIT_LE) + header() + element(0x0020, 0x4000, b"UT", b"A" * nbytes) + native_pixels()


def lying_length(claimed: int) -> bytes:
    """An element that says it holds ``claimed`` bytes in a small file."""
    return file_meta(EXPLICIT_LE) + header() + element(0x0020, 0x4000, b"UT", b"short", length=claimed)


def huge_native(rows: int, cols: int, *, frames: int | None = None) -> bytes:
    """Declared Rows x Columns far beyond any radiograph, 1 KiB of actual pixel bytes."""
    return (
        file_meta(EXPLICIT_LE)
        + header(rows, cols, frames=frames)
        + element(0x7FE0, 0x0010, b"OW", b"\x00" * 1024, length=min(rows * cols * 2, 0xFFFFFFFE))
    )


def tiny_jpeg(rows: int = 8, cols: int = 8) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((rows, cols), 128, np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def jpeg_bomb(sof_rows: int, sof_cols: int, *, header_rows: int = 8, header_cols: int = 8) -> bytes:
    """A ~800-byte baseline JPEG whose SOF (and optionally the DICOM header) declares a huge frame."""
    jpg = bytearray(tiny_jpeg())
    sof = jpg.find(b"\xff\xc0")
    struct.pack_into(">HH", jpg, sof + 5, sof_rows & 0xFFFF, sof_cols & 0xFFFF)
    return file_meta(JPEG_BASELINE) + header(header_rows, header_cols, bits=8) + encapsulated(bytes(jpg))


def j2k_bomb(width: int, height: int, *, header_rows: int = 8, header_cols: int = 8) -> bytes:
    """A JPEG 2000 codestream whose SIZ declares ``width`` x ``height``."""
    siz = struct.pack(">HHIIIIIIIIH", 41, 0, width, height, 0, 0, width, height, 0, 0, 1) + b"\x07\x01\x01"
    stream = b"\xff\x4f\xff\x51" + siz + b"\xff\x93" + b"\x00" * 64 + b"\xff\xd9"
    return file_meta(J2K) + header(header_rows, header_cols, bits=8) + encapsulated(stream)


def rle_lie(rows: int, cols: int) -> bytes:
    """An RLE header claiming 15 segments at offsets past the fragment, for a huge declared image."""
    head = struct.pack("<16I", 15, *[64 + i * 1_000_000 for i in range(15)])
    return file_meta(RLE) + header(rows, cols) + encapsulated(head + b"\x00" * 64)


def deflate_bomb(inflated: int) -> bytes:
    """Deflated Explicit VR LE whose dataset inflates to ``inflated`` bytes (mostly one UT of zeros)."""
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [
        comp.compress(
            header() + struct.pack("<HH", 0x0020, 0x4000) + b"UT\x00\x00" + struct.pack("<I", inflated)
        )
    ]
    chunk = b"\x00" * (1 << 20)
    for _ in range(inflated // len(chunk)):
        parts.append(comp.compress(chunk))
    parts.append(comp.compress(b"\x00" * (inflated % len(chunk))))
    parts.append(comp.flush())
    return file_meta(DEFLATED) + b"".join(parts)


def _jpeg_with_sof(rows: int, cols: int) -> bytes:
    jpg = bytearray(tiny_jpeg())
    sof = jpg.find(b"\xff\xc0")
    struct.pack_into(">HH", jpg, sof + 5, rows & 0xFFFF, cols & 0xFFFF)
    return bytes(jpg)


def _fragment_item(fragment: bytes) -> bytes:
    pad = b"\x00" * (len(fragment) % 2)
    return struct.pack("<HHI", 0xFFFE, 0xE000, len(fragment) + len(pad)) + fragment + pad


def defined_length_jpeg(sof_rows: int, sof_cols: int) -> bytes:
    """A JPEG bomb in Pixel Data of a defined length: pydicom parses its items as if undefined."""
    items = struct.pack("<HHI", 0xFFFE, 0xE000, 0) + _fragment_item(_jpeg_with_sof(sof_rows, sof_cols))
    return file_meta(JPEG_BASELINE) + header(8, 8, bits=8) + element(0x7FE0, 0x0010, b"OB", items)


def extended_offset_jpeg(sof_rows: int, sof_cols: int) -> bytes:
    """An honest 8x8 JPEG first, a huge one second, and an Extended Offset Table naming the second."""
    first = _fragment_item(tiny_jpeg())
    bomb = _jpeg_with_sof(sof_rows, sof_cols)
    table = element(0x7FE0, 0x0001, b"OV", struct.pack("<Q", len(first)))
    table += element(0x7FE0, 0x0002, b"OV", struct.pack("<Q", len(bomb)))
    pixels = (
        struct.pack("<HH", 0x7FE0, 0x0010)
        + b"OB\x00\x00"
        + struct.pack("<I", UNDEFINED)
        + struct.pack("<HHI", 0xFFFE, 0xE000, 0)
        + first
        + _fragment_item(bomb)
        + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    )
    return file_meta(JPEG_BASELINE) + header(8, 8, bits=8) + table + pixels


def jp2_decoy(width: int, height: int) -> bytes:
    """A JP2 file: an XML box holds an 8x8 SIZ before the codestream box declaring ``width`` x ``height``."""

    def box(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", 8 + len(body)) + kind + body

    def siz(w: int, h: int) -> bytes:
        return (
            b"\xff\x4f\xff\x51"
            + struct.pack(">HHIIIIIIIIH", 41, 0, w, h, 0, 0, w, h, 0, 0, 1)
            + b"\x07\x01\x01"
        )

    jp2 = (
        box(b"jP  ", b"\r\n\x87\n")
        + box(b"ftyp", b"jp2 \x00\x00\x00\x00jp2 ")
        + box(b"jp2h", box(b"ihdr", struct.pack(">IIHBBBB", 8, 8, 1, 7, 7, 0, 0)))
        + box(b"xml ", siz(8, 8))
        + box(b"jp2c", siz(width, height) + b"\xff\x93" + b"\x00" * 64 + b"\xff\xd9")
    )
    return file_meta(J2K) + header(8, 8, bits=8) + encapsulated(jp2)


def palette_segmented_bomb(segments: int) -> bytes:
    """PALETTE COLOR whose segmented LUTs (6 bytes a segment) expand to 65,535 entries a segment."""
    words = [0, 1, 0] + [1, 65535, 0xFFFF] * segments  # one discrete entry, then linear ramps
    lut = struct.pack(f"<{len(words)}H", *words)
    mono = element(0x0028, 0x0004, b"CS", b"MONOCHROME2")
    body = header(bits=8).replace(mono, element(0x0028, 0x0004, b"CS", b"PALETTE COLOR"))
    for elem in (0x1101, 0x1102, 0x1103):
        body += element(0x0028, elem, b"US", struct.pack("<HHH", 0, 0, 16))
    for elem in (0x1221, 0x1222, 0x1223):
        body += element(0x0028, elem, b"OW", lut)
    return file_meta(EXPLICIT_LE) + body + element(0x7FE0, 0x0010, b"OB", b"\x05" * 64 * 64)


def truncated(data: bytes, at: int) -> bytes:
    return data[: max(0, min(at, len(data)))]


def invalid_vr(seed: int = 0) -> bytes:
    """Elements with VRs that do not exist ("ZZ", "\\x00\\x01")."""
    bad = struct.pack("<HH", 0x0018, 0x1000) + b"ZZ" + struct.pack("<H", 4) + b"abcd"
    bad += struct.pack("<HH", 0x0018, 0x1020) + b"\x00\x01" + struct.pack("<H", 2) + b"xy"
    return file_meta(EXPLICIT_LE) + header()[:200] + bad + header()[200:] + native_pixels(seed=seed)


def invalid_dates() -> bytes:
    """StudyDate 20231399, a birth date of letters, a time of 99:99."""
    body = header().replace(b"20240101", b"20231399")
    body += element(0x0010, 0x0030, b"DA", b"ABCDEFGH") + element(0x0008, 0x0030, b"TM", b"999999")
    return file_meta(EXPLICIT_LE) + body + native_pixels()


def flipped(data: bytes, rng: random.Random, flips: int) -> bytes:
    """``flips`` random bytes of ``data`` replaced (headers mostly: the first 600 bytes)."""
    out = bytearray(data)
    for _ in range(flips):
        out[rng.randrange(0, min(len(out), 600))] = rng.randrange(256)
    return bytes(out)


def corpus(seed: int = 0, *, mutations: int = 40) -> list[HostileCase]:
    """The benchmark's and the fuzz test's fixed corpus: every family, plus seeded byte flips."""
    rng = random.Random(seed)
    base = valid(seed)
    fixed: list[tuple[str, Callable[[], bytes]]] = [
        ("nesting-5000-undefined", lambda: deep_nesting(5000)),
        ("nesting-200-defined", lambda: deep_nesting(200, defined=True)),
        ("elements-100k", lambda: many_elements(100_000)),
        ("text-8MiB", lambda: giant_text(8 << 20)),
        ("length-lies-1GiB", lambda: lying_length(1 << 30)),
        ("native-60000x60000", lambda: huge_native(60000, 60000)),
        ("native-multiframe-1000", lambda: huge_native(512, 512, frames=1000)),
        ("jpeg-sof-60000x60000", lambda: jpeg_bomb(60000, 60000)),
        (
            "jpeg-sof-and-header-10000x10000",
            lambda: jpeg_bomb(10000, 10000, header_rows=10000, header_cols=10000),
        ),
        ("jpeg-sof-7000x7000-header-8x8", lambda: jpeg_bomb(7000, 7000)),
        ("j2k-siz-60000x60000", lambda: j2k_bomb(60000, 60000)),
        ("rle-lying-segments", lambda: rle_lie(4096, 4096)),
        ("deflate-bomb-200MiB", lambda: deflate_bomb(200 << 20)),
        ("jpeg-defined-length-20000x20000", lambda: defined_length_jpeg(20000, 20000)),
        ("jpeg-extended-offset-20000x20000", lambda: extended_offset_jpeg(20000, 20000)),
        ("jp2-decoy-siz-60000x60000", lambda: jp2_decoy(60000, 60000)),
        ("palette-segmented-lut-1000", lambda: palette_segmented_bomb(1000)),
        ("invalid-vr", lambda: invalid_vr(seed)),
        ("invalid-dates", invalid_dates),
        ("zeros-after-dicm", lambda: b"\x00" * 128 + b"DICM" + b"\x00" * (1 << 20)),
    ]
    cases = [HostileCase(name, make()) for name, make in fixed]
    for i in range(8):
        cases.append(HostileCase(f"truncated-{i}", truncated(base, rng.randrange(132, len(base)))))
    for i in range(mutations):
        cases.append(HostileCase(f"flipped-{i}", flipped(base, rng, rng.randrange(1, 8))))
    return cases

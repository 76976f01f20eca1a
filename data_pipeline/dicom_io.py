"""Decode DICOM, PNG and JPEG radiographs into the image a radiologist would see.

The gateway and the dataset builder both call :func:`decode_bytes`, so a model
sees at serving time exactly the pixels it was trained on. The output is
float32 in 0..1 (not uint16) because after the VOI window the stored bit depth
no longer matters, and float keeps sigmoid windows and LUTs exact.

Pipeline for DICOM (PS3.3 C.11): stored values -> Modality LUT (Rescale
Slope/Intercept or Modality LUT Sequence) -> VOI LUT (first window by default,
or the VOI LUT Sequence) -> MONOCHROME1 inverted so bone is always bright.
Pixel data of every compressed transfer syntax is decoded by pydicom's plugins
(pylibjpeg-libjpeg, -openjpeg, -rle, pyjpegls). Anything that goes wrong
surfaces as :class:`~data_pipeline.errors.UnsupportedImage` or
:class:`~data_pipeline.errors.CorruptImage`, never a raw library exception.
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import math
import os
import re
import struct
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError
from pydicom.dataset import Dataset

from data_pipeline.dicom_guard import DicomLimits, check_parsed_size, read_guarded
from data_pipeline.errors import CorruptImage, ImageDecodeError, UnrecognisedImage, UnsupportedImage

log = logging.getLogger(__name__)

_MONO = ("MONOCHROME1", "MONOCHROME2")
_COLOR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "PALETTE COLOR")
# ITU-R BT.601 luma: the same weights Pillow's convert("L") uses, so color DICOM and color PNG agree.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)

SourceFormat = Literal["dicom", "png", "jpeg"]


@dataclass
class StageTimer:
    """Accumulates wall time per named stage; the benchmark prints the split."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


@contextmanager
def _maybe(timer: StageTimer | None, name: str) -> Iterator[None]:
    if timer is None:
        yield
    else:
        with timer.stage(name):
            yield


@dataclass
class DecodedImage:
    """A radiograph ready for display or a model.

    ``pixels`` is float32 (rows, cols) in 0..1, bone bright. ``patient_hash`` is a
    salted sha256 of PatientID (:func:`patient_key`): the raw ID never leaves this object (it remains
    only inside ``dataset``, which callers must not persist or log).
    """

    pixels: np.ndarray
    rows: int
    cols: int
    photometric: str
    source_format: SourceFormat
    pixel_spacing: tuple[float, float] | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    sop_uid: str | None = None
    patient_hash: str | None = None
    converted_from_color: bool = False
    bits_stored: int = 8
    dataset: Dataset | None = None

    def to_uint8(self) -> np.ndarray:
        """8-bit (rows, cols) image, rounded, as written to PNG datasets and fed to the model.

        ``cv2.convertScaleAbs`` scales, rounds and saturates in one pass: 1 ms
        instead of numpy's 19 ms for a 2048x2048 image (pixels are >= 0, so
        its absolute value changes nothing).
        """
        return np.asarray(cv2.convertScaleAbs(self.pixels, alpha=255.0))


# DeidentificationMethod (0012,0063) of the feedback images the gateway de-identifies
# (serving/dicom/deid.py writes this value; it is here because the pipeline reads it back)
GATEWAY_DEIDENTIFICATION_METHOD = "PS3.15 Annex E Basic Application Level Confidentiality Profile"
_PATIENT_KEY = re.compile(r"[0-9a-f]{16}")


def hash_patient_id(patient_id: str | None, salt: str) -> str | None:
    """The patient key of an identified PatientID: salted sha256 (first 16 hex), None when there is none.

    The gateway's feedback de-identification (``serving.dicom.deid``) writes this same
    key, made with the install's secret, as the de-identified PatientID, and
    :func:`patient_key` takes such an ID as it is. So a source image and the
    feedback image made from it fall into one patient group (one split, and the
    golden set's exclusion catches both) whether the pipeline reads the original
    or the de-identified copy, provided ``CXR_PATIENT_SALT`` and the gateway's
    ``CXR_DEID_SECRET`` are the same secret (both unset: the install's own).
    The key of an identified ID is unchanged by this, so pinned golden sets, dataset
    splits and the gateway's worklist keep theirs. Feedback de-identified before
    (PatientID then HMAC-SHA256(secret, PatientID)) cannot be linked to its source.
    """
    if patient_id is None or not str(patient_id).strip():
        return None
    return hashlib.sha256(f"{salt}\x00{str(patient_id).strip()}".encode()).hexdigest()[:16]


def patient_key(ds: Dataset, salt: str) -> str | None:
    """The group key of the patient in ``ds`` (None: no PatientID), the same identified or de-identified.

    A dataset the gateway de-identified (its DeidentificationMethod, and a PatientID of
    16 lowercase hex) already holds :func:`hash_patient_id` of the real PatientID:
    it is taken as it is. Any other PatientID, of identified sources and of files
    de-identified elsewhere (VinDr's), is hashed. PatientIdentityRemoved is not asked:
    an image kept with its burned-in annotation (the operator's choice) says NO.
    """
    patient_id = _str_or_none(ds.get("PatientID"))
    method = ds.get("DeidentificationMethod")
    if (
        patient_id is not None
        and isinstance(method, str)
        and method.strip() == GATEWAY_DEIDENTIFICATION_METHOD
        and _PATIENT_KEY.fullmatch(patient_id)
    ):
        return patient_id
    return hash_patient_id(patient_id, salt)


def sniff_format(data: bytes) -> SourceFormat | None:
    """Tell DICOM / PNG / JPEG apart by magic bytes (None: unknown, maybe headerless DICOM)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    return None


#: Bytes a file may have beyond its decoded pixels: the header and codecs that grow noisy pixels a little.
FILE_SLACK_BYTES = 16 * 1024 * 1024


def max_file_bytes(limits: DicomLimits) -> int:
    """The largest image file read at all: the decoded-pixel limit (``CXR_DICOM_MAX_PIXEL_BYTES``)
    plus a quarter (an encoding may be larger than raw noise) plus :data:`FILE_SLACK_BYTES`."""
    return limits.max_pixel_bytes + limits.max_pixel_bytes // 4 + FILE_SLACK_BYTES


def read_image_file(path: str | Path, max_bytes: int, *, follow_symlinks: bool = True) -> bytes:
    """A file's bytes, refused (:class:`UnsupportedImage`) above ``max_bytes`` before it is read whole.

    ``follow_symlinks=False``: a symbolic link is refused (:class:`UnsupportedImage`) when opened,
    not only when listed: one that replaced the listed file meanwhile is not followed either.
    """
    name = Path(path).name
    flags = os.O_RDONLY | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        with open(os.open(path, flags), "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > max_bytes:
                raise UnsupportedImage(f"{name}: file of {size} bytes exceeds the {max_bytes}-byte limit")
            data = handle.read(max_bytes + 1)  # a pipe or a growing file has no honest size
    except FileNotFoundError as exc:
        raise CorruptImage(f"{name}: file not found") from exc
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow_symlinks:
            raise UnsupportedImage(f"{name}: a symbolic link, not followed") from exc
        raise CorruptImage(f"{name}: cannot be read ({exc.strerror})") from exc
    if len(data) > max_bytes:
        raise UnsupportedImage(f"{name}: file exceeds the {max_bytes}-byte limit")
    return data


def decode_file(
    path: str | Path,
    *,
    salt: str | None = None,
    timer: StageTimer | None = None,
    limits: DicomLimits | None = None,
) -> DecodedImage:
    """Read (at most :func:`max_file_bytes`) and decode one file; see :func:`decode_bytes`."""
    if limits is None:
        from data_pipeline.config import get_settings

        limits = get_settings().dicom_limits()
    with _maybe(timer, "read"):
        data = read_image_file(path, max_file_bytes(limits))
    try:
        return decode_bytes(data, salt=salt, timer=timer, limits=limits)
    except ImageDecodeError as exc:
        exc.args = (f"{Path(path).name}: {exc}",)  # in place: subclasses keep their fields (limit)
        raise


def decode_bytes(
    data: bytes,
    *,
    salt: str | None = None,
    timer: StageTimer | None = None,
    limits: DicomLimits | None = None,
) -> DecodedImage:
    """Decode DICOM (any common transfer syntax), PNG or JPEG bytes.

    ``salt`` hashes PatientID; default: ``CXR_PATIENT_SALT`` from the settings.
    ``limits`` bound what a hostile file may cost (default: the ``CXR_DICOM_*``
    settings); DICOM is read only through :func:`~data_pipeline.dicom_guard.read_guarded`.
    Raises :class:`UnsupportedImage` or :class:`CorruptImage` only.
    """
    if limits is None:
        from data_pipeline.config import get_settings

        limits = get_settings().dicom_limits()
    if not data:
        raise CorruptImage("empty file: upload a DICOM, PNG or JPEG radiograph")
    kind = sniff_format(data)
    try:
        if kind in ("png", "jpeg"):
            return _decode_pillow(data, kind, timer, limits.max_pixels)
        return _decode_dicom(data, salt, timer, sniffed=kind == "dicom", limits=limits)
    except ImageDecodeError:
        raise
    except MemoryError as exc:
        raise UnsupportedImage("image too large to decode in memory") from exc
    except RecursionError as exc:
        raise CorruptImage("image structure is nested too deeply to decode") from exc
    except Exception as exc:  # the last line of defence: libraries raise anything on hostile input
        # the type only: library messages may quote element values (patient data)
        log.warning("event=decode_failed error_type=%s", type(exc).__name__)
        raise CorruptImage(f"could not decode image ({type(exc).__name__})") from exc


# ---------------------------------------------------------------------------- PNG / JPEG


def _decode_pillow(
    data: bytes, kind: SourceFormat, timer: StageTimer | None, max_pixels: int
) -> DecodedImage:
    with _maybe(timer, "decode"):
        try:
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise UnsupportedImage(
                    f"{width}x{height} exceeds the {max_pixels} pixel limit (CXR_DICOM_MAX_PIXELS)"
                )
            img.load()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise CorruptImage(f"broken {kind.upper()} file: {exc}") from exc
        except Image.DecompressionBombError as exc:
            raise UnsupportedImage(f"{kind.upper()} too large: {exc}") from exc
        mode = img.mode
        color = mode not in ("L", "I;16", "I;16B", "I;16L", "I", "F", "1")
        gray: Image.Image = img.convert("L") if color else img
        mode = "L" if color else mode
        arr = np.asarray(gray)
    with _maybe(timer, "voi"):
        if mode in ("L", "1"):
            pixels = arr.astype(np.float32) * np.float32(1 / 255) if mode == "L" else arr.astype(np.float32)
            bits = 8
        else:
            # 16-bit PNGs usually carry raw detector values with no window: stretch min..max,
            # which is what a viewer shows for an image without VOI.
            pixels = _minmax(arr.astype(np.float32))
            bits = 16
    return DecodedImage(
        pixels=pixels,
        rows=height,
        cols=width,
        photometric="MONOCHROME2",
        source_format=kind,
        converted_from_color=color,
        bits_stored=bits,
    )


def _minmax(arr: np.ndarray) -> np.ndarray:
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros_like(arr, dtype=np.float32)
    arr -= np.float32(lo)
    arr *= np.float32(1.0 / (hi - lo))
    return arr


# ---------------------------------------------------------------------------- DICOM


_NOT_AN_IMAGE = "not a DICOM, PNG or JPEG file (unrecognised content)"


def _starts_like_a_dataset(data: bytes) -> bool:
    """Whether bytes without the 128-byte preamble + "DICM" can be a DICOM stream at all.

    Such a stream (PS3.10 without file meta, or meta without preamble) begins
    with its lowest tag as little-endian group/element, and every image has
    SOP Common (0008,xxxx), so the first group is 0002 (file meta) or 0008.
    pydicom's ``force=True`` would otherwise "parse" anything: 8 MiB of zeros
    read as a million empty (0000,0000) elements took 3.1 s in the gateway
    before the 415 (measured), and memory grows with the body.
    """
    if len(data) < 8:
        return False
    group = int.from_bytes(data[:2], "little")
    return group in (0x0002, 0x0008)


def _check_stream_start(data: bytes, sniffed: bool) -> None:
    """Refuse from the first bytes what pydicom would otherwise read element by element.

    pydicom reads any leading run of command-group (0000) elements before the
    dataset, with no hook to stop it, so zero fill after "DICM" or after the
    file meta cost 3.7 s per 8 MiB in the gateway (measured) before the 422.
    PS3.10 7.1: "DICM" is followed by the file meta group, whose (0002,0000)
    group length says where the dataset starts.
    """
    if not sniffed:
        if not _starts_like_a_dataset(data):
            raise UnrecognisedImage(_NOT_AN_IMAGE)
        return
    if data[132:134] != b"\x02\x00":
        raise CorruptImage("DICOM file has no File Meta Information after 'DICM' (PS3.10 7.1)")
    if data[132:138] == b"\x02\x00\x00\x00UL" and len(data) >= 144:
        start = 144 + int.from_bytes(data[140:144], "little")
        if data[start : start + 2] == b"\x00\x00":
            raise CorruptImage(
                "DICOM dataset starts with command-group (0000) elements after its file meta: "
                "zero-filled or a network message, not a stored image"
            )


def _read_dataset(data: bytes, sniffed: bool, limits: DicomLimits) -> Dataset:
    _check_stream_start(data, sniffed)
    try:
        ds = read_guarded(data, sniffed=sniffed, limits=limits).dataset
    except ImageDecodeError:
        raise
    except Exception as exc:
        if not sniffed:
            raise UnrecognisedImage(_NOT_AN_IMAGE) from exc
        raise CorruptImage(
            f"DICOM header cannot be parsed ({type(exc).__name__}); the file is probably truncated"
        ) from exc
    if "PixelData" not in ds:
        looks_dicom = sniffed or any(k in ds for k in ("SOPClassUID", "Rows", "StudyInstanceUID"))
        if not looks_dicom:
            raise UnrecognisedImage(_NOT_AN_IMAGE)
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise UnsupportedImage("float pixel data (parametric maps) is not a radiograph")
        raise CorruptImage(
            "DICOM has no pixel data (Pixel Data element missing): send the image, not a report"
        )
    return ds


def _check_header(ds: Dataset) -> tuple[int, int, str]:
    """Rows, Columns and photometric; sizes and frame counts were bounded by the guarded reader."""
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError) as exc:
        raise CorruptImage("DICOM lacks valid Rows/Columns") from exc
    if rows <= 0 or cols <= 0:
        raise CorruptImage(f"DICOM says the image is {cols}x{rows} pixels")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric not in _MONO + _COLOR:
        raise UnsupportedImage(f"photometric interpretation {photometric!r} is not supported")
    return rows, cols, photometric


def _int_or(value: object, default: int) -> int:
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return default


def _decode_dicom(
    data: bytes, salt: str | None, timer: StageTimer | None, sniffed: bool, limits: DicomLimits
) -> DecodedImage:
    with _maybe(timer, "decode"):
        ds = _read_dataset(data, sniffed, limits)
        rows, cols, photometric = _check_header(ds)
        check_parsed_size(ds, limits)  # as pydicom read the sizes, not only as the walk did
        raw = _pixel_array(ds, photometric)
    with _maybe(timer, "voi"):
        color = photometric not in _MONO
        pixels = _color_to_gray(raw, ds, photometric) if color else _display_pipeline(raw, ds, photometric)
    if salt is None:
        from data_pipeline.config import get_settings

        salt = get_settings().resolved_patient_salt()
    spacing = _pixel_spacing(ds)
    bits_stored = _int_or(ds.get("BitsStored"), 8)
    del ds.PixelData  # the object keeps the header only; pixel bytes would double memory
    return DecodedImage(
        pixels=pixels,
        rows=rows,
        cols=cols,
        photometric=photometric,
        source_format="dicom",
        pixel_spacing=spacing,
        study_uid=_uid_or_none(ds, "StudyInstanceUID"),
        series_uid=_uid_or_none(ds, "SeriesInstanceUID"),
        sop_uid=_uid_or_none(ds, "SOPInstanceUID"),
        patient_hash=patient_key(ds, salt),
        converted_from_color=color,
        bits_stored=bits_stored,
        dataset=ds,
    )


#: a UID as the header gives it: digits and dots, 64 at most (PS3.5 9.1). Looser than pydicom's
#: ``UID.is_valid`` (which refuses a component with a leading zero, which modalities do write).
_UID_VALUE = re.compile(r"[0-9.]{1,64}")


def _uid_or_none(ds: Dataset, keyword: str) -> str | None:
    """A study, series or instance UID of the header, None when absent; anything else is refused.

    These UIDs key the worklist, the study's send-back and the objects derived from the image, and a
    hostile one (kilobytes, a NUL, a path) went into all of them unchecked.
    """
    value = _str_or_none(ds.get(keyword))
    if value is not None and not _UID_VALUE.fullmatch(value):
        raise CorruptImage(f"{keyword} is not a DICOM UID (digits and dots, at most 64 characters)")
    return value


def _str_or_none(value: object) -> str | None:
    return None if value is None or str(value).strip() == "" else str(value).strip()


def _pixel_spacing(ds: Dataset) -> tuple[float, float] | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        try:
            if value is not None and len(value) == 2:
                return float(value[0]), float(value[1])
        except (TypeError, ValueError):
            continue
    return None


def _pixel_array(ds: Dataset, photometric: str) -> np.ndarray:
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # as_rgb converts YBR to RGB; for monochrome it is a no-op
            arr = pydicom.pixels.pixel_array(ds, index=None, as_rgb=photometric.startswith("YBR"))
    except NotImplementedError as exc:
        raise UnsupportedImage(f"no decoder installed for transfer syntax {_ts_name(ts)}: {exc}") from exc
    except (RuntimeError, ValueError) as exc:
        msg = str(exc)
        if "plugin" in msg.lower() and ("missing" in msg.lower() or "available" in msg.lower()):
            raise UnsupportedImage(f"no decoder available for {_ts_name(ts)}: {msg}") from exc
        raise CorruptImage(f"pixel data cannot be decoded ({_ts_name(ts)}): {msg}") from exc
    except (AttributeError, KeyError, TypeError, IndexError, EOFError, OSError) as exc:
        raise CorruptImage(f"pixel data cannot be decoded ({_ts_name(ts)}): {exc}") from exc
    # a single image stored as one-frame multi-frame may still come back with a frame axis
    expect_ndim = 2 if photometric in (*_MONO, "PALETTE COLOR") else 3
    if arr.ndim == expect_ndim + 1 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != expect_ndim:
        raise UnsupportedImage(f"unexpected pixel array shape {arr.shape} for {photometric}")
    return arr


def _ts_name(ts: object) -> str:
    return getattr(ts, "name", None) or str(ts or "unknown transfer syntax")


#: entries a palette color LUT may have at most (PS3.3 C.7.6.3.1.5: a descriptor's 0 means 2^16)
_PALETTE_ENTRIES = 1 << 16
_SEGMENTED_LUTS = (
    "SegmentedRedPaletteColorLookupTableData",
    "SegmentedGreenPaletteColorLookupTableData",
    "SegmentedBluePaletteColorLookupTableData",
    "SegmentedAlphaPaletteColorLookupTableData",
)


def _check_segmented_palette(ds: Dataset) -> None:
    """Refuse segmented palette LUTs expanding past any palette's 65,536 entries, before pydicom expands them.

    pydicom (``_expand_segmented_lut``) builds a Python list of every entry with no bound: a linear
    segment is 6 bytes and 65,535 entries, so a 22 KB file took 5.6 s and 1.3 GB (measured), and
    an indirect segment re-expands earlier ones. The segments are counted here as pydicom walks
    them (opcode, length, then the segment's words); indirect segments, which no palette in
    pydicom's corpus uses, are refused rather than followed.
    """
    if _SEGMENTED_LUTS[0] not in ds:
        return
    try:
        depth = int(ds.RedPaletteColorLookupTableDescriptor[2])
        meta = getattr(ds, "file_meta", None)
        little = meta._tsyntax_encoding[1] if meta is not None else ds.original_encoding[1]
    except Exception:
        return  # pydicom refuses such a descriptor or encoding itself, before expanding anything
    size = 1 if depth == 8 else 2
    fmt = ("<" if little is not False else ">") + ("B" if size == 1 else "H")
    for keyword in _SEGMENTED_LUTS:
        data = ds.get(keyword)
        if not isinstance(data, bytes):
            continue
        words, pos, entries, segments = len(data) // size, 0, 0, 0
        while pos + 1 < words:
            opcode, length = (struct.unpack_from(fmt, data, (pos + i) * size)[0] for i in (0, 1))
            if opcode == 2:
                raise UnsupportedImage(
                    "palette color lookup table with indirect segments is not supported: send the image "
                    "as RGB or MONOCHROME2"
                )
            if opcode not in (0, 1):
                return  # pydicom raises on an unknown segment type
            entries, segments = entries + length, segments + 1
            if entries > _PALETTE_ENTRIES or segments > _PALETTE_ENTRIES:
                raise CorruptImage(
                    f"segmented palette color lookup table ({keyword}) expands past the "
                    f"{_PALETTE_ENTRIES} entries a palette holds (PS3.3 C.7.9.2): the table is corrupt"
                )
            pos += 2 + (length if opcode == 0 else 1)


def _color_to_gray(raw: np.ndarray, ds: Dataset, photometric: str) -> np.ndarray:
    if photometric == "PALETTE COLOR":
        _check_segmented_palette(ds)
        rgb = pydicom.pixels.apply_color_lut(raw, ds).astype(np.float32)
        scale = 65535.0 if rgb.max() > 255 else 255.0
    else:
        if raw.ndim != 3 or raw.shape[-1] != 3:
            raise UnsupportedImage(f"color image with {raw.shape[-1]} samples per pixel is not supported")
        rgb = raw.astype(np.float32)
        scale = float(2 ** _int_or(ds.get("BitsStored"), 8) - 1)
    gray = rgb @ _LUMA
    gray *= np.float32(1.0 / scale)
    np.clip(gray, 0.0, 1.0, out=gray)
    return gray


def _modality_values(raw: np.ndarray, ds: Dataset) -> np.ndarray:
    """Stored values through the Modality LUT (or Rescale Slope/Intercept), float32."""
    if "ModalityLUTSequence" in ds:
        return np.asarray(pydicom.pixels.apply_modality_lut(raw, ds).astype(np.float32))
    values = raw.astype(np.float32)
    slope = _float_or(ds.get("RescaleSlope"), 1.0)
    intercept = _float_or(ds.get("RescaleIntercept"), 0.0)
    _check_rescale(slope, intercept, raw.dtype)
    if slope != 1.0:
        values *= np.float32(slope)
    if intercept != 0.0:
        values += np.float32(intercept)
    return values


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _check_rescale(slope: float, intercept: float, dtype: np.dtype) -> None:
    """Refuse a Rescale Slope / Intercept that maps the stored values to no image at all.

    NaN or infinite values, or a product past float32, made every pixel NaN: the windowed image
    came out blank, and the detector answered 200 with no findings for a header error. A slope of
    0 maps every pixel to the intercept: the same blank image.
    """
    stored = float(max(abs(np.iinfo(dtype).min), np.iinfo(dtype).max)) if dtype.kind in "iu" else 0.0
    extreme = abs(slope) * stored + abs(intercept)
    if not (math.isfinite(slope) and math.isfinite(intercept)) or slope == 0 or extreme > _FLOAT32_MAX:
        raise CorruptImage(
            f"Rescale Slope {slope!r} and Intercept {intercept!r} (0028,1053/1052) map the stored pixel "
            "values to no finite image: the header is wrong (the slope must be a finite non-zero number)"
        )


def _display_pipeline(raw: np.ndarray, ds: Dataset, photometric: str) -> np.ndarray:
    """Modality LUT -> VOI LUT -> MONOCHROME1 inversion, to float32 0..1."""
    pixels = _apply_voi(_modality_values(raw, ds), ds)
    if photometric == "MONOCHROME1":
        np.subtract(np.float32(1.0), pixels, out=pixels)
    return pixels


def _float_or(value: object, default: float) -> float:
    try:
        if value is None:
            return default
        if isinstance(value, list | tuple | pydicom.multival.MultiValue):
            value = value[0]
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, IndexError):
        return default


def _apply_voi(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """VOI per PS3.3 C.11.2: LUT sequence, else the first window, else min..max of the image."""
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0:
        item = ds.VOILUTSequence[0]
        # LUTs are indexed by integer input values; pydicom mis-indexes float arrays
        indices = np.rint(values).astype(np.int64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = pydicom.pixels.apply_voi_lut(indices, ds, index=0, prefer_lut=True).astype(np.float32)
        bits = _int_or(item.LUTDescriptor[2] if "LUTDescriptor" in item else None, 16)
        out *= np.float32(1.0 / (2**bits - 1))
        np.clip(out, 0.0, 1.0, out=out)
        return out
    first = _first_window(ds)
    if first is not None:
        return window(values, first.center, first.width, first.function)
    return _minmax(values)


@dataclass(frozen=True)
class VoiWindow:
    """A DICOM VOI window (PS3.3 C.11.2.1.2): center, width and LINEAR / LINEAR_EXACT / SIGMOID."""

    center: float
    width: float
    function: str = "LINEAR"


def _first_window(ds: Dataset) -> VoiWindow | None:
    center = _float_or(ds.get("WindowCenter"), float("nan"))
    width = _float_or(ds.get("WindowWidth"), float("nan"))
    if np.isfinite(center) and np.isfinite(width) and width > 0:
        return VoiWindow(center, width, str(ds.get("VOILUTFunction", "LINEAR")).strip().upper())
    return None


def window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """Apply a DICOM window to float32 values in place, returning 0..1 (PS3.3 C.11.2.1.2).

    Written with numpy rather than ``pydicom.pixels.apply_windowing`` because
    that one works in float64 at the stored range and then needs a second
    rescale: 3x slower on a 2048x2500 image (it is the hot path of every request).
    """
    if function == "SIGMOID":
        out = np.exp(np.float32(-4.0 / width) * (values - np.float32(center)), dtype=np.float32)
        out += np.float32(1.0)
        np.reciprocal(out, out=out)
        return out
    if function == "LINEAR_EXACT":
        offset, scale = center - width / 2.0, 1.0 / width
    else:  # LINEAR; width 1 is a threshold at center - 0.5
        if width <= 1.0:
            return (values > np.float32(center - 0.5)).astype(np.float32)
        offset, scale = center - 0.5 - (width - 1.0) / 2.0, 1.0 / (width - 1.0)
    values -= np.float32(offset)
    values *= np.float32(scale)
    np.clip(values, 0.0, 1.0, out=values)
    return values


@dataclass
class WindowableImage:
    """What a viewer windows itself: values after the Modality LUT and the window the source asks for.

    ``values`` is float32 (rows, cols). ``window`` is the source's first VOI window, or its min..max
    when it has none (what :func:`decode_bytes` shows). A source that is not windowed linearly (a VOI
    LUT Sequence, colour, PNG or JPEG) gives the display values 0..1 of :func:`decode_bytes` with a
    window that shows them unchanged. ``invert``: MONOCHROME1, shown as 1 - windowed value.
    """

    values: np.ndarray
    window: VoiWindow
    invert: bool


_SHOW_AS_IS = VoiWindow(0.5, 1.0, "LINEAR_EXACT")


def decode_windowable(data: bytes, *, limits: DicomLimits | None = None) -> WindowableImage:
    """The values behind a radiograph and its own VOI, for window/level in a viewer.

    Read through the same guarded reader as :func:`decode_bytes`; raises its typed errors only.
    """
    if limits is None:
        from data_pipeline.config import get_settings

        limits = get_settings().dicom_limits()
    kind = sniff_format(data)
    if kind not in ("png", "jpeg"):
        try:
            ds = _read_dataset(data, kind == "dicom", limits)
            photometric = _check_header(ds)[2]
            has_lut = "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0
            if photometric in _MONO and not has_lut:
                values = _modality_values(_pixel_array(ds, photometric), ds)
                voi = _first_window(ds)
                if voi is None:
                    lo, hi = float(values.min()), float(values.max())
                    voi = VoiWindow((lo + hi) / 2.0, max(hi - lo, 1e-6), "LINEAR_EXACT")
                return WindowableImage(values, voi, invert=photometric == "MONOCHROME1")
        except ImageDecodeError:
            raise
        except MemoryError as exc:
            raise UnsupportedImage("image too large to decode in memory") from exc
        except Exception as exc:  # the type only: library messages may quote element values
            raise CorruptImage(f"could not decode image ({type(exc).__name__})") from exc
    return WindowableImage(decode_bytes(data, limits=limits).pixels, _SHOW_AS_IS, invert=False)


def read_header(data: bytes, limits: DicomLimits | None = None) -> Dataset:
    """The header of DICOM bytes (no pixel data), read through the guarded reader.

    For every caller that needs attributes and not pixels (SR references,
    STOW-RS status): the same limits as decoding, the same typed errors.
    """
    return read_dicom(data, limits, stop_before_pixels=True)


def read_dicom(
    data: bytes, limits: DicomLimits | None = None, *, stop_before_pixels: bool = False
) -> Dataset:
    """A whole DICOM dataset (pixel data left encoded) through the guarded reader.

    For callers that write the dataset back (de-identification): nothing from
    outside reaches pydicom but through :func:`~data_pipeline.dicom_guard.read_guarded`.
    """
    if limits is None:
        from data_pipeline.config import get_settings

        limits = get_settings().dicom_limits()
    sniffed = sniff_format(data[:132]) == "dicom"
    try:
        _check_stream_start(data, sniffed)
        return read_guarded(
            data, sniffed=sniffed, limits=limits, stop_before_pixels=stop_before_pixels
        ).dataset
    except ImageDecodeError:
        raise
    except RecursionError as exc:
        raise CorruptImage("DICOM structure is nested too deeply to read") from exc
    except Exception as exc:  # pydicom raises many types on garbage headers; the type only (values are PHI)
        raise CorruptImage(f"DICOM cannot be parsed ({type(exc).__name__})") from exc


def read_size(path: str | Path, limits: DicomLimits | None = None) -> tuple[int, int]:
    """(width, height) from the header only (DICOM Rows/Columns, PNG/JPEG header): no pixel decoding.

    DICOM goes through the guarded reader like every other entry point.
    """
    path = Path(path)
    if limits is None:
        from data_pipeline.config import get_settings

        limits = get_settings().dicom_limits()
    data = read_image_file(path, max_file_bytes(limits))  # its errors name the file already
    try:
        kind = sniff_format(data[:132])
        if kind in ("png", "jpeg"):
            with Image.open(io.BytesIO(data)) as img:
                return int(img.size[0]), int(img.size[1])
        _check_stream_start(data, kind == "dicom")
        ds = read_guarded(data, sniffed=kind == "dicom", limits=limits, stop_before_pixels=True).dataset
        return int(ds.Columns), int(ds.Rows)
    except ImageDecodeError as exc:
        exc.args = (f"{path.name}: {exc}",)
        raise
    except (OSError, AttributeError, TypeError, ValueError, UnidentifiedImageError) as exc:
        raise CorruptImage(f"{path.name}: cannot read image size ({type(exc).__name__})") from exc
    except Exception as exc:  # pydicom raises many types on garbage headers
        raise CorruptImage(f"{path.name}: cannot read image size ({type(exc).__name__})") from exc

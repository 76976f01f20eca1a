"""De-identification of feedback images: DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile.

Corrected images leave the clinical side for the training store, so the patient
must not travel with them. The profile is applied as written, with no option:

- **The table** is Table E.1-1 as the ``dicom-anonymizer`` package (Kitware)
  ships it, module :data:`TABLE_MODULE`. Only its data is used: its
  ``anonymize()`` applies other defaults (it keeps private tags on request,
  picks its own action for combined codes, writes its own dummies and
  DeidentificationMethod), and what we label must be exactly what we do.
- **Every attribute in the table, at every nesting level**: each sequence is
  walked and its items get the same treatment as the top level.
- **Actions**: X removes (a sequence whose action is X goes whole); Z empties
  (a sequence becomes one without items); D writes a dummy valid for the VR (a
  sequence becomes one empty item); U replaces each UID by ``2.25.<int>`` from
  HMAC-SHA256(secret, uid), so one UID maps to one new UID within an install
  (two images of a study stay one study) and to another in the next install.
  Combined codes take the strictest: X/Z, X/D, X/Z/D -> X; Z/D -> Z; X/Z/U*
  (Referenced/Source Image Sequence) -> X: the profile keeps such a sequence (Z, or
  U of its UIDs) only where the IOD requires it, which it is not in the images
  feedback keeps (a training image needs no reference to its siblings). C (clean)
  would count as X: no cleaning is implemented. K is not in the table (nothing is
  kept on purpose beyond what it leaves out).
- **PatientID and PatientName** become one pseudonym: the data pipeline's
  patient key of the PatientID made with the install's secret
  (:func:`data_pipeline.dicom_io.hash_patient_id`, 16 hex of a salted SHA-256).
  The same patient stays one patient within an install, the value is never
  guessable without the secret (:mod:`core.install_secret`), and the pipeline
  puts the feedback image into the patient group of its source
  (:func:`data_pipeline.dicom_io.patient_key`). An empty (or blank) or absent
  PatientID gives no pseudonym: both are left empty, since one pseudonym of
  "no ID" would make every anonymous patient the same patient.
- **Private attributes** (odd groups, their creators included) are removed:
  the safe-list of private tags is empty. Curve groups (50xx) and overlay
  data/comments (60xx,3000/4000) are removed, as the table says.
- **No options**: dates and times get their basic action (no shifting, no
  "Retain Longitudinal Temporal Information"), pixel data are not cleaned
  (no "Clean Pixel Data"). The labels say exactly that: PatientIdentityRemoved
  YES, DeidentificationMethodCodeSequence holding only 113100, a
  DeidentificationMethod naming the profile, and LongitudinalTemporalInformationModified
  REMOVED (PS3.15 E.2: "shall be added to the Dataset with a Value of REMOVED if
  none of the Retain Longitudinal Temporal Information Options is applied").
- **Pixels that may identify** are refused, since none are cleaned: a source
  whose BurnedInAnnotation or RecognizableVisualFeatures is YES, or a Secondary
  Capture (a screen capture by nature, SOP classes 1.2.840.10008.5.1.4.1.1.7*),
  raises :class:`PixelsMayIdentify` (422) unless the operator allows such images
  (``CXR_FEEDBACK_ALLOW_BURNED_IN``); one kept that way says PatientIdentityRemoved
  NO, since its pixels were not de-identified.
- Elements whose VR is UN (their content cannot be inspected), standard sequences
  sent under another VR than SQ (their items are opaque bytes, see :func:`_hides_items`)
  and the file meta beyond the transfer syntax and SOP class/instance are not
  carried over; the 128-byte preamble is zeroed.

Any failure raises :class:`DeidentificationFailed` (a 422 whose message names
no element value), never a 500. PNG/JPEG uploads are re-encoded from pixels,
which drops any text chunks or EXIF; their pixels are not cleaned either, and
nothing in a PNG/JPEG says whether text is burned in.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib
import io
import uuid
import warnings
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement, empty_value_for_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from data_pipeline.dicom_io import GATEWAY_DEIDENTIFICATION_METHOD, hash_patient_id, read_dicom
from serving.errors import InvalidImage

Action = Literal["X", "Z", "D", "U"]

TABLE_PACKAGE = "dicomanonymizer.dicom_anonymization_databases"
TABLE_MODULE = "dicomfields_2026c"
# the library's category lists -> the one action applied (the strictest the code allows)
RESOLVED_ACTIONS: dict[str, Action] = {
    "D_TAGS": "D",
    "Z_TAGS": "Z",
    "X_TAGS": "X",
    "U_TAGS": "U",
    "Z_D_TAGS": "Z",
    "X_Z_TAGS": "X",
    "X_D_TAGS": "X",
    "X_Z_D_TAGS": "X",
    "X_Z_U_STAR_TAGS": "X",
}
BASIC_PROFILE_CODE = ("113100", "DCM", "Basic Application Confidentiality Profile")
# the pipeline recognises this service's pseudonyms by it (data_pipeline.dicom_io.patient_key)
DEIDENTIFICATION_METHOD = GATEWAY_DEIDENTIFICATION_METHOD
MAX_DEPTH = 32

PATIENT_ID = 0x00100020
PATIENT_NAME = 0x00100010
SOP_INSTANCE_UID = 0x00080018
LONGITUDINAL_TEMPORAL_MODIFIED = 0x00280303
BURNED_IN_ANNOTATION = 0x00280301
RECOGNIZABLE_VISUAL_FEATURES = 0x00280302
SOP_CLASS_UID = 0x00080016
MEDIA_STORAGE_SOP_CLASS_UID = 0x00020002
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # and its multi-frame kinds, .7.1 to .7.4
DUMMY_TEXT = "ANONYMIZED"
_DUMMY_BY_VR: dict[str, Any] = {
    "DA": "19000101",
    "TM": "000000",
    "DT": "19000101000000",
    "AS": "000Y",
    "IS": "0",
    "DS": "0",
    "UR": "urn:anonymized",
    "US": 0,
    "SS": 0,
    "UL": 0,
    "SL": 0,
    "UV": 0,
    "SV": 0,
    "FL": 0.0,
    "FD": 0.0,
    "AT": 0,
}
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})


class DeidentificationFailed(InvalidImage):
    """422: the DICOM could not be de-identified (and so is not stored); the message holds no value."""


class PixelsMayIdentify(DeidentificationFailed):
    """422: the source's pixels may show who the patient is, and no pixel data are cleaned here.

    Raised for BurnedInAnnotation or RecognizableVisualFeatures YES and for Secondary
    Capture, unless the operator allows them (``CXR_FEEDBACK_ALLOW_BURNED_IN``).
    The message names the reason, never an element value.
    """

    code = "pixels_may_identify"


@dataclass(frozen=True)
class ActionTable:
    """Annex E actions by tag: exact tags, then the masked ranges (curves, overlays)."""

    exact: dict[int, Action]
    masked: tuple[tuple[int, int, Action], ...]  # (value, mask, action) over the 32-bit tag

    def action(self, tag: int) -> Action | None:
        found = self.exact.get(tag)
        if found is not None:
            return found
        for value, mask, action in self.masked:
            if tag & mask == value:
                return action
        return None


@cache
def action_table() -> ActionTable:
    """The table of :data:`TABLE_MODULE`, each combined code resolved to one action."""
    module = importlib.import_module(f"{TABLE_PACKAGE}.{TABLE_MODULE}")
    categories = {name for name in vars(module) if name.endswith("_TAGS")} - {"ALL_TAGS"}
    unknown = categories - set(RESOLVED_ACTIONS)
    if unknown:  # a new action code in a newer table: decide it here before using the table
        raise RuntimeError(f"{TABLE_MODULE} has action lists this code does not resolve: {sorted(unknown)}")
    exact: dict[int, Action] = {}
    masked: list[tuple[int, int, Action]] = []
    for category, action in RESOLVED_ACTIONS.items():
        for entry in getattr(module, category):
            if len(entry) == 4:
                group, element, group_mask, element_mask = entry
                mask = (group_mask << 16) | element_mask
                masked.append((((group << 16) | element) & mask, mask, action))
            else:
                exact[(entry[0] << 16) | entry[1]] = action
    return ActionTable(exact, tuple(masked))


def _hmac(secret: str, value: bytes) -> bytes:
    return hmac.new(secret.encode(), value, hashlib.sha256).digest()


def replace_uid(uid: str, secret: str) -> str:
    """``2.25.<int>`` of a UUID built from HMAC-SHA256(secret, uid): stable per install, not reversible."""
    return f"2.25.{uuid.UUID(bytes=_hmac(secret, uid.encode())[:16], version=4).int}"


def patient_pseudonym(patient_id: str, secret: str) -> str:
    """What PatientID and PatientName become: the pipeline's patient key made with the install's secret.

    "" for an empty or blank ID: no pseudonym is shared by every patient without one.
    """
    return hash_patient_id(patient_id, secret) or ""


def _raw_bytes(elem: DataElement | RawDataElement) -> bytes:
    """The element's value as bytes, without pydicom's value conversion (no validation, no warnings)."""
    value = elem.value
    if value is None:
        return b""
    if isinstance(value, bytes):
        return value
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value).encode()
    return str(value).encode()


def _vr_of(elem: DataElement | RawDataElement, tag: int) -> str:
    """The element's VR: as encoded, else the dictionary's (first of an ambiguous 'US or SS'), else UN."""
    vr = str(elem.VR) if elem.VR else ""
    if vr in ("", "UN") or " or " in vr:
        try:
            vr = str(dictionary_VR(tag))
        except KeyError:
            vr = vr or "UN"
    return vr.split(" or ")[0]


def _hides_items(tag: int, vr: str) -> bool:
    """A standard sequence encoded under another VR than SQ (UN aside, which :func:`_vr_of` reads as SQ).

    Its items are then bytes pydicom does not parse, so the walk cannot reach the attributes
    inside them (a PatientID, a name): like UN content, it cannot be inspected and is not kept.
    """
    if vr == "SQ":
        return False
    try:
        return str(dictionary_VR(tag)) == "SQ"
    except KeyError:
        return False


def _dummy(vr: str) -> Any:
    if vr == "SQ":
        return Sequence([Dataset()])
    if vr in _BINARY_VRS:
        return b"\x00" * 8
    return _DUMMY_BY_VR.get(vr, DUMMY_TEXT)


def _uids(elem: DataElement | RawDataElement) -> list[str]:
    text = _raw_bytes(elem).decode("ascii", errors="replace")
    return [part.strip(" \x00") for part in text.split("\\")]


def _patient_id(ds: Dataset) -> str:
    """PatientID as the data pipeline reads it (pydicom's value in the dataset's character set)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = ds.get("PatientID")
    except Exception:  # a value pydicom cannot convert: its bytes, as text
        value = _raw_bytes(ds.get_item(PATIENT_ID)).decode("latin-1")
    return "" if value is None else str(value)


def _says_yes(ds: Dataset, tag: int) -> bool:
    elem = ds.get_item(tag)
    return elem is not None and _raw_bytes(elem).strip(b" \x00").upper() == b"YES"


def _is_secondary_capture(ds: Dataset) -> bool:
    meta = getattr(ds, "file_meta", None)
    found = [ds.get_item(SOP_CLASS_UID), meta.get_item(MEDIA_STORAGE_SOP_CLASS_UID) if meta else None]
    uids = ["".join(_uids(elem)) for elem in found if elem is not None]
    return any(uid == SECONDARY_CAPTURE or uid.startswith(SECONDARY_CAPTURE + ".") for uid in uids)


def identifying_pixels(ds: Dataset) -> str | None:
    """Why the pixels of ``ds`` may show who the patient is (no element value), None when nothing says so.

    Only what the dataset declares is known: an image whose BurnedInAnnotation is
    absent or wrong is taken at its word.
    """
    if _says_yes(ds, BURNED_IN_ANNOTATION):
        return "the image declares burned-in annotation (text in its pixels)"
    if _says_yes(ds, RECOGNIZABLE_VISUAL_FEATURES):
        return "the image declares recognizable visual features"
    if _is_secondary_capture(ds):
        return "the image is a Secondary Capture (a screen capture, which may show text)"
    return None


class _Deidentifier:
    def __init__(self, secret: str) -> None:
        if not secret:
            raise ValueError("de-identification needs the install's secret")
        self.secret = secret
        self.table = action_table()

    def uid(self, value: str) -> str:
        return replace_uid(value, self.secret) if value else ""

    def dataset(self, ds: Dataset, pseudonym: str, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise DeidentificationFailed(f"sequences nest deeper than {MAX_DEPTH} levels")
        if ds.get_item(PATIENT_ID) is not None:
            pseudonym = patient_pseudonym(_patient_id(ds), self.secret)
        for tag in list(ds.keys()):
            self.element(ds, BaseTag(tag), pseudonym, depth)

    def element(self, ds: Dataset, tag: BaseTag, pseudonym: str, depth: int) -> None:
        if tag.group % 2 == 1 or tag.element == 0 or tag.group in (0x0000, 0x0002):
            # private (creators too), retired group lengths, command or file meta groups inside a dataset
            del ds[tag]
            return
        if tag in (PATIENT_ID, PATIENT_NAME):  # no pseudonym (no PatientID): emptied, as Z says
            ds[tag] = DataElement(tag, "LO" if tag == PATIENT_ID else "PN", pseudonym)
            return
        elem = ds.get_item(tag)
        if elem is None:
            return
        vr = _vr_of(elem, tag)
        action = self.table.action(int(tag))
        if action == "X":
            del ds[tag]
        elif action == "Z":
            ds[tag] = DataElement(tag, vr, Sequence([]) if vr == "SQ" else empty_value_for_VR(vr))
        elif action == "D":
            if vr == "UI":
                ds[tag] = DataElement(tag, vr, [self.uid(u) for u in _uids(elem)])
            else:
                ds[tag] = DataElement(tag, vr, _dummy(vr))
        elif vr == "UN" or _hides_items(int(tag), vr):
            del ds[tag]  # content that cannot be inspected (and U of an unknown VR)
        elif action == "U" and vr == "UI":
            ds[tag] = DataElement(tag, vr, [self.uid(u) for u in _uids(elem)])
        elif vr == "SQ":  # no action, or U of a sequence (X/Z/U*): walk its items
            self.sequence(ds, tag, pseudonym, depth)
        elif action == "U":
            del ds[tag]  # U of anything else is not a UID to replace: the strictest is X

    def sequence(self, ds: Dataset, tag: BaseTag, pseudonym: str, depth: int) -> None:
        value = ds[tag].value  # parses a raw sequence
        if not isinstance(value, Sequence):
            del ds[tag]
            return
        for item in value:
            self.dataset(item, pseudonym, depth + 1)


def _label(ds: Dataset, *, pixels_identify: bool) -> None:
    # YES says the identity is gone from the attributes and the pixels: not so for pixels kept as they are
    ds.PatientIdentityRemoved = "NO" if pixels_identify else "YES"
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = BASIC_PROFILE_CODE
    ds.DeidentificationMethodCodeSequence = Sequence([code])
    ds.DeidentificationMethod = DEIDENTIFICATION_METHOD
    # PS3.15 E.2: added as REMOVED when no Retain Longitudinal Temporal Information option is applied
    # (an earlier tool's MODIFIED or UNMODIFIED no longer holds: the dates got their basic action)
    ds[LONGITUDINAL_TEMPORAL_MODIFIED] = DataElement(LONGITUDINAL_TEMPORAL_MODIFIED, "CS", "REMOVED")


def _transfer_syntax(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get_item(0x00020010) is not None:
        found = "".join(_uids(meta.get_item(0x00020010)))
        try:
            known = UID(found).is_transfer_syntax
        except ValueError:  # a private UID
            known = False
        if not known:
            raise DeidentificationFailed("the DICOM's transfer syntax is not one this gateway can write")
        return found
    implicit, little = ds.original_encoding
    if implicit is None or implicit:
        return str(ImplicitVRLittleEndian)
    return str(ExplicitVRLittleEndian if little or little is None else ExplicitVRBigEndian)


def _file_meta(ds: Dataset, transfer_syntax: str) -> FileMetaDataset:
    """Only what a reader needs: SOP class and instance (replaced) and the transfer syntax.

    With the group length and version PS3.10 7.1 makes Type 1: the file is written without pydicom's
    enforced file format (which would add them), and without them a validator (dciodvfy) or a strict
    reader refused the file meta. pydicom sets the group length's value as it writes the group.
    """
    meta = FileMetaDataset()
    meta.FileMetaInformationGroupLength = 0
    meta.FileMetaInformationVersion = b"\x00\x01"
    old = getattr(ds, "file_meta", None)
    sop_class = old.get_item(0x00020002) if old is not None else None
    sop_class = sop_class if sop_class is not None else ds.get_item(0x00080016)
    if sop_class is not None:
        meta.MediaStorageSOPClassUID = UID("".join(_uids(sop_class)))
    meta.MediaStorageSOPInstanceUID = UID(str(ds.get("SOPInstanceUID", "")))
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def deidentify_dataset(ds: Dataset, secret: str, *, allow_burned_in: bool = False) -> Dataset:
    """Apply the profile to ``ds`` in place (see the module docstring) and return it.

    Raises :class:`PixelsMayIdentify` when :func:`identifying_pixels` finds a reason
    and ``allow_burned_in`` (``CXR_FEEDBACK_ALLOW_BURNED_IN``) is not set.
    """
    reason = identifying_pixels(ds)
    if reason is not None and not allow_burned_in:
        raise PixelsMayIdentify(
            f"{reason}: its pixels may show who the patient is and this gateway does not clean pixel "
            "data, so the feedback was not kept (an operator may allow such images: "
            "CXR_FEEDBACK_ALLOW_BURNED_IN)"
        )
    transfer_syntax = _transfer_syntax(ds)
    worker = _Deidentifier(secret)
    worker.dataset(ds, "", 0)  # the top level's PatientID sets the pseudonym; none: names are emptied
    _label(ds, pixels_identify=reason is not None)
    ds.file_meta = _file_meta(ds, transfer_syntax)
    return ds


def _without_values(exc: BaseException) -> str:
    return type(exc).__name__


def deidentify_dicom(data: bytes, secret: str, *, allow_burned_in: bool = False) -> tuple[bytes, str]:
    """De-identified DICOM bytes and the new SOPInstanceUID (used as the feedback image id).

    Raises :class:`DeidentificationFailed` for anything that cannot be read,
    de-identified or written back, :class:`PixelsMayIdentify` (one of them) for pixels
    that may identify unless ``allow_burned_in``; the message names no element value.
    """
    if not secret:
        raise ValueError("de-identification needs the install's secret")
    try:
        ds = read_dicom(data)  # the one guarded reader, as every entry point
        if SOP_INSTANCE_UID not in ds:  # an id of its own, stable for the same bytes (replaced again as U)
            ds[SOP_INSTANCE_UID] = DataElement(
                SOP_INSTANCE_UID, "UI", replace_uid(hashlib.sha256(data).hexdigest(), secret)
            )
        deidentify_dataset(ds, secret, allow_burned_in=allow_burned_in)
        ds.preamble = b"\x00" * 128
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=False)
        new_uid = str(ds.SOPInstanceUID)
    except DeidentificationFailed:
        raise
    except Exception as exc:  # pydicom's read/convert/write errors quote values: keep only the type
        raise DeidentificationFailed(
            f"the DICOM could not be de-identified ({_without_values(exc)})"
        ) from None
    return buf.getvalue(), new_uid


def reencode_png(gray_uint8: np.ndarray) -> bytes:
    """PNG of pixels only: no metadata from the original upload survives."""
    buf = io.BytesIO()
    Image.fromarray(gray_uint8).save(buf, format="PNG")
    return buf.getvalue()

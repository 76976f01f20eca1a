"""Subgroup attributes of one radiograph (sex, age band, manufacturer, view), as the manifest keeps them.

A model can be good on average and poor for one kind of patient or one scanner; evaluation
reports AP per subgroup and a promotion gate compares each with the overall figure. The
attributes come from the header the one guarded reader (:mod:`data_pipeline.dicom_io`) already
parsed, never from a second read of the file.

Patient data: what leaves the decoder must not identify anyone. DICOM PS3.15 Annex E's basic
de-identification profile removes PatientSex and PatientAge, and keeps them only under its
"Retain Patient Characteristics" option; this is that option, narrowed further: sex as coded,
age only as a decade band with everyone of 90 or over in one band (an exact high age singles a
person out; HIPAA's Safe Harbor draws the same line), never the birth date. Manufacturer and
ViewPosition describe the device and the projection, not the person. Anything missing, malformed
or implausible becomes ``"unknown"``, so a bad header never fails an ingest.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only a type here: delivery's policy imports the defaults without loading pydicom
    from pydicom.dataset import Dataset

#: attribute names in the manifest, the evaluation report and the registry tag, in this order
ATTRIBUTES = ("sex", "age_band", "manufacturer", "view")
UNKNOWN = "unknown"

_SEXES = {"M": "M", "F": "F", "O": "O"}
_AGE = re.compile(r"^(\d{3})([DWMY])$")
_PER_YEAR = {"D": 365.25, "W": 52.18, "M": 12.0, "Y": 1.0}
_VIEW = re.compile(r"^[A-Z]{2,4}$")  # PA, AP, LL, RL, LLD, ... (ViewPosition is a code string)
_MAX_TEXT = 64  # the LO value representation's limit: longer is not a manufacturer's name


def _text(ds: Dataset, keyword: str) -> str:
    try:
        value = ds.get(keyword)
    except Exception:  # a malformed element raises on access; it is just unknown here
        return ""
    return "" if value is None else str(value).strip()


def sex(raw: str) -> str:
    """PatientSex as coded (M, F, O), else unknown."""
    return _SEXES.get(raw.strip().upper(), UNKNOWN)


def age_band(raw: str) -> str:
    """PatientAge ("045Y", "018M", ...) as a decade band ("40-49"), "90+" from 90, else unknown."""
    match = _AGE.match(raw.strip().upper())
    if not match:
        return UNKNOWN
    years = int(match.group(1)) / _PER_YEAR[match.group(2)]
    if years >= 90:
        return "90+"
    decade = int(years // 10) * 10
    return f"{decade}-{decade + 9}"


def manufacturer(raw: str) -> str:
    """The device vendor, whitespace collapsed; empty, overlong or non-printable text is unknown."""
    name = " ".join(raw.split())
    if not name or len(name) > _MAX_TEXT or not name.isprintable():
        return UNKNOWN
    return name


def view(raw: str) -> str:
    """ViewPosition code (PA, AP, LL, ...), else unknown."""
    code = raw.strip().upper()
    return code if _VIEW.match(code) else UNKNOWN


def subgroup_attributes(ds: Dataset | None) -> dict[str, str]:
    """The four attributes of a parsed header; a PNG or JPEG (no header) is unknown in all four."""
    if ds is None:
        return dict.fromkeys(ATTRIBUTES, UNKNOWN)
    return {
        "sex": sex(_text(ds, "PatientSex")),
        "age_band": age_band(_text(ds, "PatientAge")),
        "manufacturer": manufacturer(_text(ds, "Manufacturer")),
        "view": view(_text(ds, "ViewPosition")),
    }

"""De-identification of feedback images (DICOM PS3.15 Annex E, basic profile).

Corrected images leave the clinical network's PACS for the training store, so
the patient must not travel with them. dicognito implements the basic profile
(names, IDs, dates, addresses, institution replaced; UIDs remapped
consistently for one seed, so two images of a study stay one study).
PNG/JPEG uploads are re-encoded from pixels, which drops any text chunks or EXIF.
"""

from __future__ import annotations

import io

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

BASIC_PROFILE_CODE = ("113100", "DCM", "Basic Application Confidentiality Profile")


def deidentify_dicom(data: bytes, seed: str) -> tuple[bytes, str]:
    """De-identified DICOM bytes and the new SOPInstanceUID (used as the feedback image id)."""
    from dicognito.anonymizer import Anonymizer

    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    Anonymizer(seed=seed).anonymize(ds)
    ds.PatientIdentityRemoved = "YES"
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = BASIC_PROFILE_CODE
    ds.DeidentificationMethodCodeSequence = Sequence([code])
    ds.DeidentificationMethod = "PS3.15 E.1 basic profile (dicognito)"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=False)
    return buf.getvalue(), str(ds.get("SOPInstanceUID", ""))


def reencode_png(gray_uint8: np.ndarray) -> bytes:
    """PNG of pixels only: no metadata from the original upload survives."""
    buf = io.BytesIO()
    Image.fromarray(gray_uint8).save(buf, format="PNG")
    return buf.getvalue()

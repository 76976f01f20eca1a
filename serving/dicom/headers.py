"""The UIDs of a received instance, read by the one guarded reader: STOW-RS and the DIMSE SCP.

A module of its own so that the SCP, which needs only this, does not import the detector
(ONNX Runtime, SciPy: ~2.5 s by ``python -X importtime``) with ``serving.dicom.stow``; it
did so lazily on its first C-STORE, which then waited those seconds for its status.
"""

from __future__ import annotations

import json

from data_pipeline.dicom_io import read_header
from data_pipeline.errors import ImageDecodeError


def instance_header(data: bytes) -> tuple[str, str, str, str]:
    """SOP Class, SOP Instance and Study UIDs, and the patient, through the guarded reader (blocking).

    The patient is PatientID and IssuerOfPatientID as one JSON text: what the SCP's spool keeps two
    instances apart by when they share a SOP Instance UID (serving/dimse/spool.py). Empty strings when
    the header cannot be read: the caller refuses the instance with its own status, naming no UID.
    """
    try:
        ds = read_header(data)
        sop_class, sop_uid, study = (
            str(ds.get(k, "")) for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID")
        )
        patient = json.dumps([str(ds.get("PatientID", "")), str(ds.get("IssuerOfPatientID", ""))])
    except ImageDecodeError:
        return "", "", "", ""
    except Exception:  # a value pydicom converts only when read (a UI of a wrong length...): unreadable
        return "", "", "", ""
    return sop_class, sop_uid, study, patient


def instance_uids(data: bytes) -> tuple[str, str, str]:
    """SOP Class, SOP Instance and Study UIDs (:func:`instance_header` without the patient)."""
    return instance_header(data)[:3]

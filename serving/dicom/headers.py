"""The UIDs of a received instance, read by the one guarded reader: STOW-RS and the DIMSE SCP.

A module of its own so that the SCP, which needs only this, does not import the detector
(ONNX Runtime, SciPy: ~2.5 s by ``python -X importtime``) with ``serving.dicom.stow``; it
did so lazily on its first C-STORE, which then waited those seconds for its status.
"""

from __future__ import annotations

from data_pipeline.dicom_io import read_header
from data_pipeline.errors import ImageDecodeError


def instance_uids(data: bytes) -> tuple[str, str, str]:
    """SOP Class, SOP Instance and Study UIDs through the guarded reader (blocking: run in the pool).

    Empty strings when the header cannot be read: the caller refuses the instance with its
    own status, naming no UID.
    """
    try:
        ds = read_header(data)
        return (
            str(ds.get("SOPClassUID", "")),
            str(ds.get("SOPInstanceUID", "")),
            str(ds.get("StudyInstanceUID", "")),
        )
    except ImageDecodeError:
        return "", "", ""
    except Exception:  # a value pydicom converts only when read (a UI of a wrong length...): unreadable
        return "", "", ""

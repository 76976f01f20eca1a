"""Deterministic DICOM UIDs for the objects the service sends back to a PACS.

A PACS keys what it stores on SOP Instance UID: when the same source image is
analysed by the same model version and the result sent again (a retried STOW,
a re-run of ``cxr pacs analyze``), the objects must carry the same UIDs so the
PACS replaces them instead of filing duplicates. So every UID of a result object
is a hash of what it was made from, never a random one.

What it was made from includes the source's patient and study (:func:`source_parts`), not its
SOP Instance UID alone: a UID from outside is not trusted to be unique (a modality bug or a forged
instance can reuse one), and an object of patient B derived from a SOP UID patient A's image
also carries would have the UID of A's object: the outbox would take it for A's, already queued,
and drop it, or the PACS would replace A's object with B's. (Objects sent before this rule got
other UIDs: a study sent again after the upgrade reaches the PACS as new objects, once.)
"""

from __future__ import annotations

import json

from pydicom.dataset import Dataset
from pydicom.uid import UID, generate_uid


def derived_uid(*parts: str) -> str:
    """A valid DICOM UID (<= 64 chars) that is a pure function of ``parts``.

    pydicom's ``generate_uid(entropy_srcs=...)`` hashes the sources joined
    without a separator, so ``("ab", "c")`` and ``("a", "bc")`` would collide;
    the parts are JSON-encoded into one source to keep their boundaries.
    """
    if not parts:
        raise ValueError("derived_uid needs at least one part")
    uid: UID = generate_uid(entropy_srcs=[json.dumps([str(p) for p in parts])])
    return str(uid)


def source_parts(source: Dataset) -> tuple[str, str, str]:
    """What names a source image for the UIDs derived from it: PatientID, study and SOP Instance UIDs."""
    return (patient_id(source), str(source.StudyInstanceUID), str(source.SOPInstanceUID))


def patient_id(source: Dataset) -> str:
    """The source's PatientID as the worklist compares it (``hash_patient_id`` strips it too)."""
    return str(source.get("PatientID", "") or "").strip()

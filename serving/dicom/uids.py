"""Deterministic DICOM UIDs for the objects the service sends back to a PACS.

A PACS keys what it stores on SOP Instance UID: when the same source image is
analysed by the same model version and the result sent again (a retried STOW,
a re-run of ``cxr pacs analyze``), the objects must carry the same UIDs so the
PACS replaces them instead of filing duplicates. So every UID of a result object
is a hash of what it was made from, never a random one.
"""

from __future__ import annotations

import json

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

"""The storage SOP classes a chest radiograph arrives in (PS3.4 B.5): what we accept and analyse.

One list for the DIMSE SCP (anything else gets status 0x0122) and the DICOMweb pull
(only these are fetched from a study: not our own SRs and presentation states).
"""

from __future__ import annotations

RADIOGRAPH_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "CR",
    "1.2.840.10008.5.1.4.1.1.1.1": "DX for presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "DX for processing",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture",
}

"""C-ECHO (the DICOM ping): how ``make status`` and the fixtures tell a DIMSE peer is up."""

from __future__ import annotations

import logging

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]


def c_echo(
    host: str, port: int, called_ae: str, *, calling_ae: str = "CXR-ECHO", timeout: float = 3.0
) -> bool:
    """True when ``called_ae`` at host:port accepts an association and answers C-ECHO with Success."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # a refused probe is an answer, not an error
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and int(status.Status) == 0x0000
    finally:
        assoc.release()

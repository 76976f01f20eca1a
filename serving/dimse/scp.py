"""The storage SCP: C-STORE and C-ECHO for the radiographs a modality or PACS pushes to us.

pynetdicom does the protocol. What this module decides:

- which calling AEs may associate (``CXR_DIMSE_ALLOWED_AES``; empty: any, as on the
  one-machine stack) and that the called AE must be ours: both refused at association;
- which SOP classes we analyse (CR, DX for presentation and for processing, single-frame
  Secondary Capture). Every storage context is *accepted* at negotiation so that a sender
  of anything else gets a DIMSE status it can log (0x0122 "SOP class not supported")
  instead of an association it cannot use;
- that an instance is only acknowledged once the guarded reader has parsed its header,
  its UIDs match the request, and it is fsync'd in the spool (``spool.py``): Success means
  "it cannot be lost". An instance the forwarder could not hand to the gateway (over
  ``max_instance_bytes``: the gateway's body limit less the multipart framing, ``service.py``)
  or a new instance of a study that already has the spool's maximum waiting is refused with
  0xA700 instead: acknowledged, it would wait in the spool for ever. So is any instance while the
  spool is full (its disk's byte or inode reserve, or its maximum of instances or studies): that
  is logged once when the spell of refusals begins and once when the spool takes instances again,
  not per instance (a sender retrying at once would write a line per try). The forwarder
  (``forwarder.py``) then hands it to the gateway at once, and the study's results are sent
  back once it settled.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from pydicom.uid import UID
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    DEFAULT_TRANSFER_SYNTAXES,
    StoragePresentationContexts,
    evt,
)
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from serving.dicom.headers import instance_header  # the one guarded header read STOW-RS uses too
from serving.dicom.sop_classes import RADIOGRAPH_SOP_CLASSES
from serving.dimse.spool import InstanceSpool, SpoolFull, StudyFull
from serving.dimse.transport import BoundedAssociationServer, BoundedRequestHandler

log = logging.getLogger("cxr.dimse")


# PS3.4 Annex B.2.3 / PS3.7 Annex C statuses
SUCCESS = 0x0000
SOP_CLASS_NOT_SUPPORTED = 0x0122
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000


@dataclass(frozen=True)
class ScpConfig:
    ae_title: str
    host: str
    port: int
    allowed_aes: tuple[str, ...] = ()
    max_associations: int = 8
    # the largest instance acknowledged: one the forwarder can post to the gateway in one body
    # (service.py sets it from CXR_MAX_BODY_BYTES with forwarder.largest_instance)
    max_instance_bytes: int = 64 * 1024 * 1024
    # our maximum PDU receive length, advertised at association: pynetdicom's default (16 KiB)
    # makes a 2 MiB radiograph 128 PDUs, each costing the sender and us a round of the state
    # machine; 1 MiB is also the longest PDU the socket reads from any peer (transport.py)
    max_pdu_bytes: int = 1024 * 1024


def check_instance(data: bytes, sop_class: str, sop_uid: str) -> tuple[int, str, str]:
    """(status, study UID, patient): the guarded reader's verdict on one received instance (blocking).

    The patient (PatientID, IssuerOfPatientID) is what the spool keeps apart: two patients'
    instances under one SOP Instance UID (:meth:`InstanceSpool.write`).
    """
    read_class, read_uid, study, patient = instance_header(data)
    if not (read_class or read_uid or study):
        log.info("dimse_store_refused reason=unreadable")
        return CANNOT_UNDERSTAND, "", ""
    if read_class != sop_class or read_uid != sop_uid:
        log.info("dimse_store_refused reason=uids_do_not_match_request")
        return DOES_NOT_MATCH_SOP_CLASS, "", ""
    if not study or not UID(study).is_valid:
        log.info("dimse_store_refused reason=no_valid_study_uid")
        return DOES_NOT_MATCH_SOP_CLASS, "", ""
    return SUCCESS, study, patient


class StorageScp:
    """The SCP bound to one spool; :meth:`start` serves in background threads until :meth:`stop`."""

    def __init__(self, config: ScpConfig, spool: InstanceSpool) -> None:
        self.config = config
        self.spool = spool
        self.ae = AE(ae_title=config.ae_title)
        self.ae.maximum_associations = config.max_associations
        self.ae.maximum_pdu_size = config.max_pdu_bytes
        self.ae.require_called_aet = True
        if config.allowed_aes:
            self.ae.require_calling_aet = list(config.allowed_aes)
        self.ae.add_supported_context(Verification)
        for context in StoragePresentationContexts:
            assert context.abstract_syntax is not None
            # every transfer syntax for what we analyse; the uncompressed ones (every sender has
            # Implicit VR Little Endian, PS3.5 10.1) for the rest, which only ever gets 0x0122.
            # pynetdicom deep-copies this table for every association: all syntaxes for all
            # 121 classes made it 5,404 entries, 648 this way
            syntaxes = (
                ALL_TRANSFER_SYNTAXES
                if context.abstract_syntax in RADIOGRAPH_SOP_CLASSES
                else DEFAULT_TRANSFER_SYNTAXES
            )
            self.ae.add_supported_context(context.abstract_syntax, syntaxes)
        self._server: Any = None
        # instances refused since the spool was found full (0: it has room); one log line per spell
        self._spell_lock = threading.Lock()
        self._refused = 0

    def _refuse_full(self, exc: SpoolFull) -> int:
        """0xA700 for an instance the spool has no room for; the spell's first refusal is logged."""
        with self._spell_lock:
            self._refused += 1
            first = self._refused == 1
        if first:  # counts only: nothing of the instance or its sender
            log.warning("dimse_spool_full reason=%s held=%d limit=%d", exc.reason, exc.held, exc.limit)
        return OUT_OF_RESOURCES

    def _end_spell(self) -> None:
        """After an instance was stored: the spell of refusals ends once the spool has room again.

        For a new study, the strictest case: an instance sent again, or one more of a study already
        waiting, can be stored while new studies are still refused, and ended no spell.
        """
        if not self._refused or self.spool.full() is not None:
            return
        with self._spell_lock:
            refused, self._refused = self._refused, 0
        if refused:
            log.info("dimse_spool_has_room refused=%d", refused)

    def handle_store(self, event: Any) -> int:
        """One C-STORE: refuse with a status, or spool durably and answer Success."""
        try:
            request = event.request
            sop_class = str(request.AffectedSOPClassUID)
            sop_uid = str(request.AffectedSOPInstanceUID)
            if sop_class not in RADIOGRAPH_SOP_CLASSES:
                log.info("dimse_store_refused reason=sop_class_not_supported sop_class=%s", sop_class[:64])
                return SOP_CLASS_NOT_SUPPORTED
            # measured as received first: encoding copies the dataset (the join with the file meta), so
            # refusing one of up to twice the limit (the transport's) held it twice, in every association
            with request.DataSet.getbuffer() as received:
                size = received.nbytes
            data = b"" if size > self.config.max_instance_bytes else event.encoded_dataset(include_meta=True)
            if size > self.config.max_instance_bytes or len(data) > self.config.max_instance_bytes:
                log.info("dimse_store_refused reason=too_large bytes=%d", max(size, len(data)))
                return OUT_OF_RESOURCES
            status, study, patient = check_instance(data, sop_class, sop_uid)
            if status != SUCCESS:
                return status
            self.spool.write(study, sop_uid, data, patient=patient)
        except StudyFull as exc:  # counts only: the study's UID stays out of the log
            log.warning(
                "dimse_store_refused reason=study_full instances=%d limit=%d", exc.instances, exc.limit
            )
            return OUT_OF_RESOURCES
        except SpoolFull as exc:
            return self._refuse_full(exc)
        except OSError as exc:
            log.warning("dimse_store_failed reason=spool_write error_type=%s", type(exc).__name__)
            return OUT_OF_RESOURCES
        except Exception as exc:  # a hostile dataset must cost one status, never the SCP
            log.warning("dimse_store_failed reason=unexpected error_type=%s", type(exc).__name__)
            return CANNOT_UNDERSTAND
        log.info(
            "dimse_store_ok calling_ae=%s sop_class=%s bytes=%d",
            str(event.assoc.requestor.ae_title)[:16],
            RADIOGRAPH_SOP_CLASSES[sop_class].replace(" ", "_"),
            len(data),
        )
        self._end_spell()
        return SUCCESS

    def start(self) -> None:
        handlers: list[Any] = [(evt.EVT_C_STORE, self.handle_store)]
        # AE.start_server with our request handler, whose sockets bound what a peer can send
        server = self.ae.make_server(
            (self.config.host, self.config.port),
            evt_handlers=handlers,
            server_class=BoundedAssociationServer,
            request_handler=BoundedRequestHandler,
        )
        assert isinstance(server, BoundedAssociationServer)
        server.max_pdu_bytes = self.config.max_pdu_bytes
        # up to twice the instance limit, an instance is received whole and refused with a status
        # its sender logs (handle_store); a peer sending more loses its connection mid-message
        server.max_message_bytes = 2 * self.config.max_instance_bytes + self.config.max_pdu_bytes
        self.ae._servers.append(server)  # as start_server does: the server's shutdown() removes it
        threading.Thread(target=server.serve_forever, name="dimse-acceptor", daemon=True).start()
        self._server = server
        log.info(
            "dimse_scp_listening ae_title=%s host=%s port=%d allowed_aes=%s",
            self.config.ae_title,
            self.config.host,
            self.config.port,
            ",".join(self.config.allowed_aes) or "any",
        )

    def stop(self) -> None:
        """No new association from now on; those in progress go on (:meth:`end_associations`)."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def end_associations(self, grace_s: float) -> int:
        """Give the associations in progress ``grace_s`` to end, then abort the rest; how many were aborted.

        A stopped server only stops accepting: an association a modality held open went on storing
        (and answering Success) after the SCP said it had stopped, and its thread kept the process
        alive until the modality let go, past any stop timeout, to be killed. An aborted sender has no
        Success for the instance it was sending, so it sends it again; what was answered is spooled.
        """
        deadline = time.monotonic() + grace_s
        while self.ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        left = self.ae.active_associations
        for assoc in left:
            assoc.abort()
        return len(left)

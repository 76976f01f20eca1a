"""Sending result objects to one PACS: DICOMweb STOW-RS (dicomweb-client) or DIMSE C-STORE (pynetdicom).

A sender takes a batch of outbox items for its destination and says, per item, which the
PACS accepted and which it refused for good (:class:`Sent`); everything else stays in the
outbox for the next attempt. Warnings (e.g. Orthanc's "already stored", B000-B0FF "coercion
of data elements") count as delivered: the PACS has the object, and so does 0x0111 "duplicate SOP
instance" (:func:`already_stored`). A refusal for good is one
that sending the same object again cannot change: no accepted presentation context for its
SOP class, or a failure status saying the PACS does not store that SOP class or cannot
understand the object (:func:`refused_for_good`). A PACS that is down, out of resources or
aborts is not that: its items are retried.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import pydicom
import requests

from serving.pacs.outbox import OutboxItem
from serving.pacs_destinations import PacsDestination

log = logging.getLogger(__name__)


@dataclass
class Sent:
    """What a PACS made of one batch, per item id; an item in neither is retried later."""

    accepted: set[str] = field(default_factory=set)
    # item id -> why, for the log and the dead letter's meta: never an instance UID or patient data
    refused: dict[str, str] = field(default_factory=dict)


class Sender(Protocol):
    def send(self, items: list[OutboxItem]) -> Sent:
        """What the PACS accepted and refused for good (blocking)."""
        ...


def refused_for_good(code: int) -> bool:
    """A C-STORE / STOW-RS failure status that sending the same object again cannot change.

    0x0117 invalid SOP instance, 0x0122 SOP class not supported, A9xx data set does not match
    the SOP class, Cxxx cannot understand (C122: transfer syntax not supported). Not A7xx
    (out of resources), 0x0110 (processing failure), 0x0124 (not authorized: a setting the PACS
    administrator can change), nor anything unknown: those are retried.
    """
    return code in (0x0117, 0x0122) or 0xA900 <= code <= 0xA9FF or 0xC000 <= code <= 0xCFFF


DUPLICATE_SOP_INSTANCE = 0x0111


def already_stored(code: int) -> bool:
    """0x0111 (PS3.7 "duplicate SOP instance"): the PACS holds an object under this SOP Instance UID.

    Ours are derived from the source and the model version (serving/dicom/uids.py: the same UID is
    the same object), so the PACS holds what we sent: an answer lost on the way, or an object sent
    twice after a replica handed its outbox on (serving/pacs/handoff.py). Some PACS refuse a resent
    instance with it instead of storing it again; retrying it would never end in anything else.
    """
    return code == DUPLICATE_SOP_INSTANCE


class _TimeoutSession(requests.Session):
    """dicomweb-client takes a requests session but no timeout: a hung PACS must not hang the outbox."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__()
        self._timeout_s = timeout_s

    def request(self, *args: Any, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self._timeout_s)
        return super().request(*args, **kwargs)


def dicomweb_session(timeout_s: float) -> requests.Session:
    """A session for dicomweb-client that never proxies nor follows a redirect (closed network), and
    times out.

    A PACS answering a STOW-RS with a redirect would have had the results, with the patient's
    identity and the destination's auth header, sent on to whatever host it named; with no
    redirect allowed, requests raises before sending anything, and the objects wait in the
    outbox (the destination's URL is the setting to correct).
    """
    session = _TimeoutSession(timeout_s)
    session.trust_env = False  # HTTP(S)_PROXY must not route a hospital's images off site
    session.max_redirects = 0
    return session


def dicomweb_client(url: str, headers: dict[str, str], timeout_s: float) -> Any:
    """A ``DICOMwebClient`` that fails fast: no proxy, a timeout, and no retries of its own.

    dicomweb-client retries a failed call itself (5 attempts, waits doubling from 1 s), which
    would hold the outbox's one delivery loop on a PACS that is down for half a minute per
    batch. The outbox already retries durably with its own backoff, and a pull's caller gets a
    clear error at once.
    """
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url=url, headers=headers, session=dicomweb_session(timeout_s))
    client.set_http_retry_params(retry=False)
    return client


class StowSender:
    def __init__(self, destination: PacsDestination) -> None:
        self.destination = destination
        self.client = dicomweb_client(destination.url, dict(destination.headers), destination.timeout_s)

    def send(self, items: list[OutboxItem]) -> Sent:
        name = self.destination.name
        datasets, offered = [], []
        unreadable: dict[str, str] = {}
        for item in items:  # our own objects; one unreadable on disk must not cost the others
            try:
                datasets.append(pydicom.dcmread(item.folder / "object.dcm"))
                offered.append(item)
            except Exception as exc:
                # set aside: reading it again gives the same, so it was retried for ever, and a batch
                # of nothing else answered as "PACS down" held the whole destination
                log.warning("pacs_send_error destination=%s error_type=%s", name, type(exc).__name__)
                unreadable[item.item_id] = f"object_unreadable={type(exc).__name__}"
        if not offered:
            return Sent(refused=unreadable)
        sent = self._store(offered, datasets)
        sent.refused.update(unreadable)
        return sent

    def _store(self, offered: list[OutboxItem], datasets: list[Any]) -> Sent:
        """One STOW-RS request of ``datasets`` (those of ``offered``), and what the PACS made of each."""
        name = self.destination.name
        stored: set[str] | None = None  # 200 / 202: every instance not listed as failed was stored
        try:
            response = self.client.store_instances(datasets)
        except requests.HTTPError as exc:
            # 409 (nothing stored) or another 4xx may say per instance why (FailedSOPSequence); a 5xx
            # is a PACS that is down, whatever its body says
            status = exc.response.status_code if exc.response is not None else 0
            response = _stow_body(exc.response) if 400 <= status < 500 else None
            if status == 413 or (status == 400 and response is None):
                return self._split(offered, datasets, status)
            if response is None:
                log.info("pacs_send_failed destination=%s status=%d", name, status)
                return Sent()
            stored = {
                str(r.get("ReferencedSOPInstanceUID")) for r in response.get("ReferencedSOPSequence", [])
            }
        except (requests.RequestException, OSError) as exc:
            log.info("pacs_send_failed destination=%s error_type=%s", name, type(exc).__name__)
            return Sent()
        failed: dict[str, int] = {}
        for f in response.get("FailedSOPSequence", []):
            reason = f.get("FailureReason")
            failed[str(f.get("ReferencedSOPInstanceUID"))] = int(reason) if reason is not None else -1
        sent = Sent()
        for item in offered:
            code = failed.get(item.sop_instance_uid)
            if code is None:
                if stored is None or item.sop_instance_uid in stored:
                    sent.accepted.add(item.item_id)
            elif already_stored(code):
                sent.accepted.add(item.item_id)
                log.info("pacs_send_duplicate destination=%s", name)
            elif refused_for_good(code):
                sent.refused[item.item_id] = f"failure_reason=0x{code:04X}"
            else:
                log.info("pacs_send_refused destination=%s status=0x%04X", name, code & 0xFFFF)
        return sent

    def _split(self, offered: list[OutboxItem], datasets: list[Any], status: int) -> Sent:
        """A 413 or a bare 400: each half of the batch again, one object at last.

        413 (the PACS's or its proxy's body limit): a batch of 32 objects is refused whole by a limit
        (nginx's default is 1 MiB) that each of them fits. 400 without a Store Instances Response: the
        PACS could not read the request, which one object it cannot parse is enough for. Answered as a
        PACS that is down, the same batch was offered again and the destination held, for ever, every
        other study's results with it. An object refused alone is what the PACS refuses, which
        resending cannot change: set aside (an operator moves it back once the PACS is fixed). A 404,
        401 or 403 is a setting an admin fixes, for every object alike: held, as before.
        """
        if len(offered) == 1:
            return Sent(refused={offered[0].item_id: f"http_status={status}"})
        log.info(
            "pacs_send_split destination=%s status=%d objects=%d", self.destination.name, status, len(offered)
        )
        half = len(offered) // 2
        first = self._store(offered[:half], datasets[:half])
        second = self._store(offered[half:], datasets[half:])
        return Sent(accepted=first.accepted | second.accepted, refused=first.refused | second.refused)


def _stow_body(response: requests.Response | None) -> Any:
    """The Store Instances Response of a refused STOW-RS request, or None when it carries none."""
    if response is None or "json" not in response.headers.get("Content-Type", ""):
        return None
    try:
        return pydicom.Dataset.from_json(response.json())
    except Exception:  # not DICOM JSON: an error page
        return None


_EXPLICIT_LE = "1.2.840.10008.1.2.1"
_IMPLICIT_LE = "1.2.840.10008.1.2"


def _ok(status: Any) -> bool:
    if not status or "Status" not in status:
        return False
    code = int(status.Status)
    return code == 0x0000 or 0xB000 <= code <= 0xB0FF


class DimseSender:
    def __init__(self, destination: PacsDestination) -> None:
        self.destination = destination

    def send(self, items: list[OutboxItem]) -> Sent:
        from pynetdicom import AE

        d = self.destination
        ae = AE(ae_title=d.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = d.timeout_s
        for sop_class in sorted({i.sop_class_uid for i in items}):
            # Implicit VR Little Endian too: the one syntax every SCP must take (PS3.5 10.1). Offered
            # Explicit only, a PACS without it accepted no context and was held for ever. pynetdicom
            # re-encodes our Explicit VR objects for whichever of the two the PACS accepts
            ae.add_requested_context(sop_class, [_EXPLICIT_LE, _IMPLICIT_LE])
        assoc = ae.associate(d.host, d.port, ae_title=d.ae_title)
        if not assoc.is_established:
            log.info("pacs_send_failed destination=%s reason=association_refused", d.name)
            return Sent()
        sent = Sent()
        try:
            # a SOP class whose context the PACS rejected (e.g. no Comprehensive SR): send_c_store
            # would raise ValueError for each of its objects, whatever the next association offers
            takes = {str(c.abstract_syntax) for c in assoc.accepted_contexts}
            for item in items:
                if item.sop_class_uid not in takes:
                    sent.refused[item.item_id] = "no_presentation_context"
                    continue
                if not assoc.is_established:  # aborted mid-batch: the rest is retried
                    log.info("pacs_send_failed destination=%s reason=association_aborted", d.name)
                    break
                try:
                    status = assoc.send_c_store(item.folder / "object.dcm")
                except Exception as exc:  # this object only: what the PACS said of the others stands
                    log.warning("pacs_send_error destination=%s error_type=%s", d.name, type(exc).__name__)
                    if not assoc.is_established:  # pynetdicom raises once the association is gone
                        break
                    # on a live association, this object (pynetdicom reads and encodes the file:
                    # unreadable, no context for its transfer syntax): retried, the same object
                    # raised the same, for ever. Set aside for an operator
                    sent.refused[item.item_id] = f"send_error={type(exc).__name__}"
                    continue
                if not status or "Status" not in status:
                    # no answer (timeout, abort, an invalid response): pynetdicom is ending the
                    # association, so the rest waits for the next one instead of its own timeout
                    log.info("pacs_send_failed destination=%s reason=no_response", d.name)
                    break
                code = int(status.Status)
                if _ok(status):
                    sent.accepted.add(item.item_id)
                elif already_stored(code):
                    sent.accepted.add(item.item_id)
                    log.info("pacs_send_duplicate destination=%s", d.name)
                elif refused_for_good(code):
                    sent.refused[item.item_id] = f"status=0x{code:04X}"
                else:  # e.g. out of resources: worth another try
                    log.info("pacs_send_refused destination=%s status=0x%04X", d.name, code & 0xFFFF)
        finally:
            if assoc.is_established:
                assoc.release()
        return sent


def make_sender(destination: PacsDestination) -> Sender:
    return StowSender(destination) if destination.kind == "stow" else DimseSender(destination)


def group(items: Iterable[OutboxItem]) -> dict[str, list[OutboxItem]]:
    out: dict[str, list[OutboxItem]] = {}
    for item in items:
        out.setdefault(item.destination, []).append(item)
    return out

"""Sending result objects to one PACS: DICOMweb STOW-RS (dicomweb-client) or DIMSE C-STORE (pynetdicom).

A sender takes a batch of outbox items for its destination and says which were
accepted; everything else stays in the outbox for the next attempt. Warnings
(e.g. Orthanc's "already stored", B000-B0FF "coercion of data elements") count as
delivered: the PACS has the object.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Protocol

import pydicom
import requests

from serving.pacs.outbox import OutboxItem
from serving.pacs_destinations import PacsDestination

log = logging.getLogger(__name__)


class Sender(Protocol):
    def send(self, items: list[OutboxItem]) -> set[str]:
        """Item ids the PACS accepted (blocking)."""
        ...


class _TimeoutSession(requests.Session):
    """dicomweb-client takes a requests session but no timeout: a hung PACS must not hang the outbox."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__()
        self._timeout_s = timeout_s

    def request(self, *args: Any, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self._timeout_s)
        return super().request(*args, **kwargs)


def dicomweb_session(timeout_s: float) -> requests.Session:
    """A session for dicomweb-client that never proxies (closed network) and times out."""
    session = _TimeoutSession(timeout_s)
    session.trust_env = False  # HTTP(S)_PROXY must not route a hospital's images off site
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

    def send(self, items: list[OutboxItem]) -> set[str]:
        datasets = [pydicom.dcmread(i.folder / "object.dcm") for i in items]  # our own objects
        try:
            response = self.client.store_instances(datasets)
        except (requests.RequestException, OSError) as exc:
            log.info(
                "pacs_send_failed destination=%s error_type=%s", self.destination.name, type(exc).__name__
            )
            return set()
        failed = {str(f.ReferencedSOPInstanceUID) for f in response.get("FailedSOPSequence", [])}
        return {i.item_id for i in items if i.sop_instance_uid not in failed}


_EXPLICIT_LE = "1.2.840.10008.1.2.1"


def _ok(status: Any) -> bool:
    if not status or "Status" not in status:
        return False
    code = int(status.Status)
    return code == 0x0000 or 0xB000 <= code <= 0xB0FF


class DimseSender:
    def __init__(self, destination: PacsDestination) -> None:
        self.destination = destination

    def send(self, items: list[OutboxItem]) -> set[str]:
        from pynetdicom import AE

        d = self.destination
        ae = AE(ae_title=d.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = d.timeout_s
        for sop_class in sorted({i.sop_class_uid for i in items}):
            ae.add_requested_context(sop_class, [_EXPLICIT_LE])
        assoc = ae.associate(d.host, d.port, ae_title=d.ae_title)
        if not assoc.is_established:
            log.info("pacs_send_failed destination=%s reason=association_refused", d.name)
            return set()
        accepted: set[str] = set()
        try:
            for item in items:
                status = assoc.send_c_store(item.folder / "object.dcm")
                if _ok(status):
                    accepted.add(item.item_id)
                else:
                    code = int(status.Status) if status and "Status" in status else -1
                    log.info("pacs_send_refused destination=%s status=0x%04X", d.name, code & 0xFFFF)
        finally:
            assoc.release()
        return accepted


def make_sender(destination: PacsDestination) -> Sender:
    return StowSender(destination) if destination.kind == "stow" else DimseSender(destination)


def group(items: Iterable[OutboxItem]) -> dict[str, list[OutboxItem]]:
    out: dict[str, list[OutboxItem]] = {}
    for item in items:
        out.setdefault(item.destination, []).append(item)
    return out

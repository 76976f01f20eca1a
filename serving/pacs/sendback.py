"""Results back to the PACS: build a study's SR + presentation states, queue them, deliver them.

Called by every path that analyses a study for a PACS (STOW-RS with ``send_back``, or a
destination configured for the caller; the DIMSE SCP through STOW-RS; the DICOMweb pull).
The objects are built and written to the outbox BEFORE the caller gets its answer, so an
answered study always reaches its PACS eventually; delivery runs in the background
(:meth:`SendBack.run`), woken as soon as something is queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from core.backoff import backoff, still_waiting
from serving.config import ServingSettings
from serving.errors import Conflict, ServingError, StudyPatientMismatch
from serving.inference.cpu_pool import CpuPool
from serving.inference.detector import DetectionReply, study_triage
from serving.metrics import GatewayMetrics
from serving.pacs.outbox import UNREADABLE, Outbox, OutboxItem
from serving.pacs.senders import Sender, Sent, group, make_sender
from serving.pacs_destinations import PacsDestination
from serving.results import ResultRecord, ResultStore
from serving.triage.worklist import StudyTriage

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

log = logging.getLogger(__name__)

_BATCH = 32  # objects per STOW-RS request / association


class SendBack:
    def __init__(
        self,
        settings: ServingSettings,
        metrics: GatewayMetrics,
        cpu: CpuPool,
        *,
        sender_factory: Callable[[PacsDestination], Sender] = make_sender,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.cpu = cpu
        self.destinations = {d.name: d for d in settings.pacs_destinations}
        self.outbox = Outbox(
            settings.resolved_outbox_dir,
            retry_s=settings.outbox_retry_s,
            max_backoff_s=settings.outbox_max_backoff_s,
        )
        self._sender_factory = sender_factory
        self._senders: dict[str, Sender] = {}
        self._wake: asyncio.Event | None = None
        # destination -> (held until, refused passes in a row): a PACS that took nothing waits as a whole
        self._hold: dict[str, tuple[float, int]] = {}
        # destinations whose gauges the last listing set from objects (_set_depth)
        self._gauged: set[str] = set()
        self._gauged_dead: set[str] = set()

    # ----------------------------------------------------------------- choosing and queueing

    def choose(self, tenant: str, send_back: bool | None) -> list[PacsDestination]:
        """Destinations for one upload of ``tenant``: none when refused, else those serving the tenant.

        Asked for (``send_back=true``), every destination serving the tenant; not said, those of
        them that take its uploads without asking (``auto``). Never a PACS of another tenant: the
        objects carry the patient's identity.
        """
        if send_back is False:
            return []
        serving = [d for d in self.destinations.values() if d.serves(tenant)]
        return serving if send_back else [d for d in serving if d.auto]

    def build(
        self,
        records: list[ResultRecord],
        triage: dict[str, Any] | None,
        headers: dict[str, Dataset] | None = None,
    ) -> list[Any]:
        """The study's objects (blocking): SR, one GSPS per image, burned-in captures when configured.

        ``headers``: source headers read already, by request id (:meth:`_fetch_header_only`); the
        other records' sources are read here.
        """
        from serving.dicom.sr import source_header
        from serving.dicom.study_objects import study_objects
        from serving.dicom.uids import patient_id

        items = []
        pixels = []
        for record in records:
            header = (headers or {}).get(record.request_id)
            if header is None:
                if record.source is None or record.source_format != "dicom":
                    continue  # past source retention, or not a DICOM: nothing a PACS object can reference
                try:
                    header = source_header(record.source)
                except Conflict as exc:  # e.g. no SeriesInstanceUID: no object can reference this image
                    log.warning("pacs_sendback_image_left_out code=%s", exc.code)  # the others still go
                    continue
            items.append((header, record.response))
            if patient_id(items[-1][0]) != patient_id(items[0][0]):
                # the worklist refuses such images (StudyPatientMismatch); rows of an older gateway
                # may still hold them: one SR must never carry two patients' findings
                raise StudyPatientMismatch()
            if self.settings.pacs_secondary_capture:  # then no header was read ahead: the source is whole
                from serving.inference.pipeline import decode_upload

                assert record.source is not None
                image, _ = decode_upload(record.source)
                pixels.append(image.to_uint8())
        if not items:
            return []
        return study_objects(items, triage, capture_pixels=pixels or None)

    def warm_up(self) -> None:
        """Build (not queue) a one-image study's SR and presentation state from a made-up header.

        highdicom loads its tables of the standard (IODs, modules, attributes) on the first
        object it builds, and the modules it needs are imported then: without this, the first
        study sent back after a start paid for both on top of its own objects. Run by the
        gateway's startup, before it is ready.
        """
        from pydicom.dataset import Dataset
        from pydicom.uid import generate_uid

        from serving.dicom.sr import with_study_attributes
        from serving.dicom.study_objects import dataset_bytes, study_objects

        header = Dataset()
        header.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR
        header.SOPInstanceUID, header.StudyInstanceUID, header.SeriesInstanceUID = (
            generate_uid() for _ in range(3)
        )
        header.Modality, header.Rows, header.Columns, header.SamplesPerPixel = "CR", 8, 8, 1
        header.PhotometricInterpretation, header.PixelRepresentation = "MONOCHROME2", 0
        header.BitsAllocated, header.BitsStored, header.HighBit = 16, 12, 11
        header = with_study_attributes(header)  # the patient and study attributes, present and empty
        response = {
            "request_id": "warm-up",
            "model": {"name": "warm-up", "version": "0", "stage": "none", "variant": "fp32"},
            "image": {"width": 8, "height": 8},
            "detections": [
                {"class_id": 0, "class_name": "warm-up", "confidence": 0.5, "box": [1.0, 1.0, 4.0, 4.0]}
            ],
        }
        for ds in study_objects([(header, response)], {"score": 0.5, "priority": False, "threshold": 0.5}):
            dataset_bytes(ds)

    def _queue(self, objects: list[Any], destinations: list[PacsDestination]) -> int:
        from serving.dicom.study_objects import dataset_bytes

        queued = 0
        for ds in objects:
            data = dataset_bytes(ds)
            for dest in destinations:
                if self.outbox.put(dest.name, str(ds.SOPClassUID), str(ds.SOPInstanceUID), data):
                    # counted, not re-read: listing the whole outbox per request grows with a backlog
                    self.metrics.outbox_depth.labels(dest.name).inc()
                    queued += 1
        return queued

    async def study(
        self,
        records: list[ResultRecord],
        triage: dict[str, Any] | None,
        destinations: list[PacsDestination],
        headers: dict[str, Dataset] | None = None,
    ) -> int:
        """Build and queue one study's objects for each destination; returns the objects queued."""
        if not destinations or not records:
            return 0
        try:
            objects = await self.cpu.run(self.build, records, triage, headers)
        except ServingError as exc:  # e.g. a source an SR cannot reference: the caller still gets its JSON
            log.warning("pacs_sendback_skipped code=%s", exc.code)
            return 0
        queued = await self.cpu.run(self._queue, objects, destinations)
        log.info("pacs_sendback_queued objects=%d destinations=%d", len(objects), len(destinations))
        self.wake()
        return queued

    async def replies(
        self,
        replies: list[DetectionReply],
        destinations: list[PacsDestination],
        results: ResultStore,
        tenant: str,
    ) -> int:
        """Send back what one request analysed, study by study.

        The study's SR covers every image of it the worklist knows (earlier uploads of the
        same study included, while their sources are retained), so the PACS gets one SR that
        agrees with the study's triage score.
        """
        if not destinations:
            return 0
        by_study: dict[str, list[DetectionReply]] = {}
        for reply in replies:
            if reply.study_uid and reply.record.source_format == "dicom":
                by_study.setdefault(reply.study_uid, []).append(reply)
        queued = 0
        for study_replies in by_study.values():
            records = {r.record.request_id: r.record for r in study_replies}
            objects, _ = await self._known_study(
                records, study_triage(study_replies), destinations, results, tenant
            )
            queued += objects
        return queued

    async def settled_study(
        self, triage: StudyTriage, destinations: list[PacsDestination], results: ResultStore, tenant: str
    ) -> tuple[int, int]:
        """Send back a study analysed earlier, image by image (the DIMSE SCP's study once it settled).

        The same objects :meth:`replies` would build for the study's last upload: every image
        the worklist holds for it, with the worklist's triage. Returns (objects queued, images
        they cover: those whose result and source are still held); an image analysed twice (sent
        again) counts once, with its latest result.
        """
        if not destinations:
            return 0, 0
        return await self._known_study({}, triage, destinations, results, tenant)

    def _fetch_header_only(
        self, results: ResultStore, rid: str, tenant: str
    ) -> tuple[ResultRecord, Dataset | None]:
        """A stored result without its source, and the source's header the objects are built from
        (blocking); (the result, None) when the source is gone, not a DICOM, or needed whole.

        A study's row names up to CXR_PACS_MAX_STUDY_INSTANCES results, each source up to
        CXR_MAX_BODY_BYTES: held whole, one send-back could hold gigabytes of pixels it never
        reads. Kept whole only when burned-in captures are configured (they draw on the pixels).
        The header is handed to :meth:`build` parsed (it was read twice, ~3.5 ms an image).
        """
        record = results.get(rid, tenant)
        if record.source is None or record.source_format != "dicom" or self.settings.pacs_secondary_capture:
            return record, None
        from serving.dicom.sr import source_header

        try:
            header = source_header(record.source)
        except Conflict:
            return record, None  # build() leaves it out and says why
        return dataclasses.replace(record, source=None), header

    async def _known_study(
        self,
        records: dict[str, ResultRecord],
        triage: StudyTriage | None,
        destinations: list[PacsDestination],
        results: ResultStore,
        tenant: str,
    ) -> tuple[int, int]:
        """:meth:`study` of ``records`` and the study's other images the worklist knows: (objects, images)."""
        headers: dict[str, Dataset] = {}
        if triage is not None:
            for rid in triage.result_ids:
                if rid not in records:
                    try:
                        record, header = await self.cpu.run(self._fetch_header_only, results, rid, tenant)
                    except ServingError:
                        continue  # expired: the SR covers the images still held
                    records[rid] = record
                    if header is not None:
                        headers[rid] = header
        # an instance sent again (a PACS resend) has a newer result: one image, the latest answer,
        # so the SR is the same object as before and the PACS keeps one copy
        latest: dict[str, ResultRecord] = {}
        for record in sorted(records.values(), key=lambda r: r.created):
            latest[str(record.response.get("image", {}).get("sop_instance_uid") or record.request_id)] = (
                record
            )
        queued = await self.study(
            list(latest.values()), triage.as_dict() if triage else None, destinations, headers
        )
        # the images the objects can cover: a record past source retention is left out by build()
        buildable = sum(
            r.request_id in headers or (r.source is not None and r.source_format == "dicom")
            for r in latest.values()
        )
        return queued, buildable

    # ----------------------------------------------------------------- delivery

    def _sender(self, name: str) -> Sender | None:
        if name not in self._senders and name in self.destinations:
            self._senders[name] = self._sender_factory(self.destinations[name])
        return self._senders.get(name)

    def _set_depth(self, items: list[OutboxItem], dead: list[OutboxItem] | None = None) -> None:
        """The gauges from a listing: every configured destination, and every one that had objects.

        A destination removed from the settings is gauged while it has objects, and set to 0 once they
        are gone (an operator deleted them): left at its last value, its alert fired until a restart.
        """
        depth = self.outbox.depth(items)
        for name in set(self.destinations) | set(depth) | self._gauged:
            self.metrics.outbox_depth.labels(name).set(depth.get(name, 0))
        self._gauged = set(depth)
        if dead is not None:
            refused = self.outbox.depth(dead)
            if unreadable := self.outbox.unreadable_count():  # no destination to name: an operator's
                refused[UNREADABLE] = unreadable
            for name in set(self.destinations) | set(refused) | self._gauged_dead:
                self.metrics.outbox_dead_letters.labels(name).set(refused.get(name, 0))
            self._gauged_dead = set(refused)

    def _listing(self) -> tuple[list[OutboxItem], list[OutboxItem]]:
        """The items waiting and the dead letters (blocking: off the event loop)."""
        return self.outbox.items(), self.outbox.dead_letters()

    def _held(self, name: str, now: float) -> bool:
        """Whether ``name``'s hold lasts past ``now`` (:func:`still_waiting`)."""
        return still_waiting(self._hold.get(name, (0.0, 0))[0], now, self.settings.outbox_max_backoff_s)

    def deliver_due(self, now: float | None = None, items: list[OutboxItem] | None = None) -> int:
        """One pass over the items due (of ``items``, else listed now; blocking); returns the delivered.

        Per item: what the PACS accepted is removed, what it refused for good (a SOP class it does
        not store, an object it cannot understand) moves to the outbox's dead letters, the rest is
        retried with backoff. A destination whose PACS answered nothing of a batch (down, aborted,
        out of resources) is held: its other items wait, unsent and untouched, until the hold ends
        (``CXR_OUTBOX_RETRY_S`` doubling up to ``CXR_OUTBOX_MAX_BACKOFF_S``, per destination),
        instead of every waiting object being offered to a PACS that is down on each pass, each
        refusal rewriting its item. A refusal for good does not hold it: its other objects go.
        """
        now = time.time() if now is None else now
        listed = self.outbox.items() if items is None else items
        due = [i for i in listed if i.next_attempt <= now and not self._held(i.destination, now)]
        delivered = 0
        for name, batch_items in group(due).items():
            sender = self._sender(name)
            if sender is None:  # a destination removed from the settings: keep its items, say so now and then
                log.warning("pacs_outbox_orphaned destination=%s items=%d", name, len(batch_items))
                self._hold[name] = (now + self.settings.outbox_max_backoff_s, 0)
                continue
            for start in range(0, len(batch_items), _BATCH):
                batch = batch_items[start : start + _BATCH]
                try:
                    sent = sender.send(batch)
                except Exception as exc:  # a sender bug must not stop delivery to other PACS
                    log.warning("pacs_send_error destination=%s error_type=%s", name, type(exc).__name__)
                    sent = Sent()
                for item in batch:
                    try:
                        delivered += self._settle(name, item, sent, now)
                    except OSError as exc:  # this item's bookkeeping: the others' outcomes still count
                        log.warning(
                            "pacs_outbox_error destination=%s error_type=%s", name, type(exc).__name__
                        )
                if sent.accepted or sent.refused:  # the PACS answered: not down
                    self._hold.pop(name, None)
                    continue
                failures = self._hold.get(name, (0.0, 0))[1] + 1
                delay = backoff(self.settings.outbox_retry_s, failures, self.settings.outbox_max_backoff_s)
                self._hold[name] = (now + delay, failures)
                log.info("pacs_destination_held destination=%s seconds=%.1f", name, delay)
                break  # its other items wait for the hold: not offered to a PACS that is down
        return delivered

    def _settle(self, name: str, item: OutboxItem, sent: Sent, now: float) -> int:
        """Record what the PACS made of one item; 1 when delivered."""
        if item.item_id in sent.accepted:
            self.outbox.delivered(item)
            self.metrics.outbox_sent.labels(name, "delivered").inc()
            return 1
        if item.item_id in sent.refused:
            self.outbox.refused(item, sent.refused[item.item_id], now)
            self.metrics.outbox_sent.labels(name, "refused").inc()
            # the SOP class and why only: an instance UID is patient data's key
            log.warning(
                "pacs_outbox_dead_letter destination=%s sop_class=%s reason=%s",
                name,
                item.sop_class_uid,
                sent.refused[item.item_id],
            )
            return 0
        self.outbox.failed(item, now)
        self.metrics.outbox_sent.labels(name, "retry").inc()
        return 0

    def next_pass_in(self, items: list[OutboxItem], now: float) -> float | None:
        """Seconds until something is due: an item's retry time, or a held destination's end of hold."""
        times = [
            self._hold[i.destination][0] if self._held(i.destination, now) else i.next_attempt for i in items
        ]
        return max(0.0, min(times) - now) if times else None

    def wake(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def run(self) -> None:
        """The delivery loop: woken by :meth:`study`, else when something is next due (at most 1 s)."""
        self._wake = asyncio.Event()
        while True:
            try:
                items, dead = await asyncio.to_thread(self._listing)  # one listing per pass, off the loop
                self._set_depth(items, dead)  # what is left after the last pass, also when nothing is due
                now = time.time()
                wait = self.next_pass_in(items, now)
                if wait == 0.0:  # then look again at once: what failed has its time, a refusing PACS its hold
                    await asyncio.to_thread(self.deliver_due, now, items)
            except Exception as exc:  # keep the loop alive whatever the disk or a PACS does
                log.warning("pacs_outbox_error error_type=%s", type(exc).__name__)
                wait = 1.0
            timeout = 1.0 if wait is None else min(1.0, max(wait, 0.05))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=timeout)
            self._wake.clear()

"""Hands spooled studies to the gateway: each image as it arrives, the study's results once it settles.

Two steps per study, both through the gateway's own routes, so routing by StudyInstanceUID,
metrics, audit, the worklist and the send-back to the PACS are exactly those of a STOW-RS
upload: there is no second code path.

1. **Analysis, on arrival.** Instances the gateway has not answered for are POSTed to
   ``/dicomweb/studies/{study}?send_back=false`` as ``multipart/related`` as soon as they are
   spooled (the SCP's write wakes the forwarder), in as few requests as the gateway's limits
   allow (64 parts, ``CXR_MAX_BODY_BYTES``). An image's detections do not depend on the rest of
   its study, so the gateway need not sit idle while a modality is still sending.
2. **Results, on settling.** Once no instance of the study has arrived for
   ``CXR_STUDY_SETTLE_SECONDS`` and every one has been answered for,
   ``POST /v1/studies/{study}/send-back`` builds the study's SR and presentation states from
   every image the gateway analysed for it and queues them for the PACS. The study-level
   outputs (the SR, its triage) therefore always cover the whole study, while the images'
   inference does not wait for the settle time (waiting left the gateway idle for the first
   settle time of every burst of studies: docs/benchmarks.md, "PACS round trip").
   A study that never settles (a sender resending an instance within the settle time, forever)
   is sent back all the same once its first arrival is ``CXR_STUDY_MAX_WAIT_SECONDS`` old: what
   arrived so far is analysed and its results queued in one step. Instances arriving after the
   send-back was asked for stay in the spool as the study's next round (as do late instances of a
   settled study): analysed at once, and the study's results sent again once that round settles
   or is as old, each time over every image of the study the gateway analysed.

The spool keeps a study until the gateway has queued its results for the PACS. The gateway down,
overloaded or refusing our key: the study stays and is retried with backoff (an operator sees it
in ``make status``). Instances the gateway answered for (200, 202, or 409 when none could be
analysed, with its Store Instances Response: a proxy's 409 is retried) are not sent again;
refused ones are named by count in the log, never by UID. A 413 for a request of one instance is
the gateway's last word on that instance (it is over ``CXR_MAX_BODY_BYTES`` with the multipart
framing: the SCP refuses such instances, but one may have been spooled under a larger limit): it
counts as failed, never retried. A send-back answered ``study_not_analysed`` (404: the gateway
knows no analysed image of the study) or ``study_results_missing`` (409: it no longer holds
their results) sends the images once more, in case the gateway lost them; the same answer again
means none of them can be analysed, and the study leaves the spool. Any other refusal (a proxy's
404, an older gateway without the route) is retried with backoff: an acknowledged image is never
dropped on a guess. The SCP must reach one gateway, or gateways sharing their worklist and
results: the send-back is built from what the gateway that answers it has analysed.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from core.backoff import backoff, still_waiting
from serving.dimse.spool import InstanceSpool, SpooledStudy

log = logging.getLogger("cxr.dimse")

_MAX_PARTS = 64  # the gateway's STOW-RS parser takes at most this many parts per request


def related_body(parts: list[bytes]) -> tuple[bytes, str]:
    """A ``multipart/related; type="application/dicom"`` body and its content type.

    Hand-written (a dozen lines): httpx and dicomweb-client only build this from parsed
    pydicom datasets, and the spooled bytes must reach the gateway exactly as received.
    """
    boundary = uuid.uuid4().hex
    chunks = []
    for data in parts:
        chunks.append(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
        chunks.append(data)
        chunks.append(b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f'multipart/related; type="application/dicom"; boundary={boundary}'


def largest_instance(max_body_bytes: int) -> int:
    """The largest instance one request can carry to a gateway taking ``max_body_bytes`` bodies.

    Measured on :func:`related_body` itself (its boundary has a fixed length): 111 bytes of
    framing for one part. The SCP refuses larger instances before answering Success, since the
    gateway would refuse every request carrying them (413).
    """
    return max_body_bytes - len(related_body([b""])[0])


def _stow_answer(response: httpx.Response) -> dict[str, Any] | None:
    """The gateway's Store Instances Response (DICOM JSON), or None when the body is not one.

    A 409 counts as the gateway's answer only with its FailedSOPSequence: a proxy's or a load
    balancer's 409 (an error page, or JSON of its own) would otherwise mark the images analysed
    unanalysed, and the study would leave the spool with them.
    """
    try:
        body = response.json()
    except ValueError:
        return None
    if not isinstance(body, dict) or (response.status_code == 409 and "00081198" not in body):
        return None
    return body


def _error_code(response: httpx.Response) -> str:
    """The gateway's error code (``{"error": {"code"}}``); empty for any other body (a proxy's 404)."""
    try:
        return str(response.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return ""


def batches(files: tuple[Path, ...], max_bytes: int, max_parts: int = _MAX_PARTS) -> list[list[Path]]:
    """Files grouped into requests under the part and byte limits (one file per request at worst)."""
    out: list[list[Path]] = []
    current: list[Path] = []
    size = 0
    budget = max_bytes - 4096  # boundaries and part headers
    for f in files:
        n = f.stat().st_size
        if current and (len(current) >= max_parts or size + n > budget):
            out.append(current)
            current, size = [], 0
        current.append(f)
        size += n + 128
    if current:
        out.append(current)
    return out


@dataclass
class Forwarder:
    spool: InstanceSpool
    gateway_url: str
    api_key: str
    settle_s: float
    # a study that never settles is sent back once its first arrival is this old (what arrived so far)
    max_wait_s: float = 300.0
    max_body_bytes: int = 64 * 1024 * 1024
    retry_s: float = 2.0
    max_backoff_s: float = 60.0
    timeout_s: float = 120.0
    # studies handed over at once: the gateway analyses them side by side as it does STOW-RS clients
    concurrency: int = 4
    _failures: dict[str, int] = field(default_factory=dict)
    _next_try: dict[str, float] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None
    # studies with a step in flight now: the next step starts as soon as a slot frees, not when the
    # slowest of a batch is done (a batch would hold three idle slots behind one big study)
    _inflight: set[str] = field(default_factory=set)
    _pool: ThreadPoolExecutor | None = None

    def _post(self, client: httpx.Client, study: SpooledStudy, files: list[Path]) -> httpx.Response:
        body, content_type = related_body([f.read_bytes() for f in files])
        return client.post(
            f"/dicomweb/studies/{study.study_uid}",
            params={"send_back": "false"},  # the study's results go back once it settles (send_back)
            content=body,
            headers={"Content-Type": content_type},
        )

    def analyse(self, client: httpx.Client, study: SpooledStudy) -> bool:
        """Hand the study's pending instances to the gateway; True when it answered for all of them."""
        stored = failed = too_large = 0
        for files in batches(study.pending, self.max_body_bytes):
            try:
                response = self._post(client, study, files)
            except httpx.HTTPError as exc:
                log.warning("dimse_forward_retry reason=unreachable error_type=%s", type(exc).__name__)
                return False
            if response.status_code == 413 and len(files) == 1:
                # one instance over the gateway's body limit: refused the same way every time
                too_large += 1
                self.spool.mark_analysed(study, files)
                continue
            if response.status_code not in (200, 202, 409):
                log.warning("dimse_forward_retry reason=gateway_status status=%d", response.status_code)
                return False
            body = _stow_answer(response)
            if body is None:  # a proxy's 409 or error page: not the gateway's word on these images
                log.warning("dimse_forward_retry reason=not_a_stow_answer status=%d", response.status_code)
                return False
            stored += len(body.get("00081199", {}).get("Value", []))  # ReferencedSOPSequence
            failed += len(body.get("00081198", {}).get("Value", []))  # FailedSOPSequence
            self.spool.mark_analysed(study, files)
        if too_large:
            log.warning("dimse_instances_refused reason=too_large status=413 instances=%d", too_large)
        log.info(
            "dimse_instances_analysed instances=%d stored=%d failed=%d",
            len(study.pending),
            stored,
            failed + too_large,
        )
        return True

    def send_back(self, client: httpx.Client, study: SpooledStudy) -> bool:
        """Ask the gateway to send the settled study's results back; True when the spool may drop it."""
        try:
            response = client.post(f"/v1/studies/{study.study_uid}/send-back")
        except httpx.HTTPError as exc:
            log.warning("dimse_forward_retry reason=unreachable error_type=%s", type(exc).__name__)
            return False
        code = _error_code(response) if response.status_code in (404, 409) else ""
        if code in ("study_not_analysed", "study_results_missing"):  # it holds nothing to send back
            if self.spool.forget_analysed(study):  # once: send the images again (it may have lost them)
                log.warning(
                    "dimse_study_unknown code=%s action=analyse_again instances=%d", code, len(study.files)
                )
                return False
            log.info(
                "dimse_study_forwarded instances=%d analysed=0 objects_queued=0 code=%s",
                len(study.files),
                code,
            )
            return True
        if response.status_code != 200:
            log.warning("dimse_forward_retry reason=gateway_status status=%d", response.status_code)
            return False
        body = response.json()
        log.info(
            "dimse_study_forwarded instances=%d analysed=%d objects_queued=%d",
            len(study.files),
            int(body.get("images") or 0),
            int(body.get("objects_queued") or 0),
        )
        return True

    def forward(self, client: httpx.Client, study: SpooledStudy, now: float | None = None) -> bool:
        """One step for ``study``: analyse what is pending, else send its results back.

        A study waiting longer than ``max_wait_s`` (:meth:`overdue`) has both in one step: a
        sender resending its instances would otherwise keep one pending at every look.
        True when the step succeeded: the pending instances were answered for, or the study's
        results were queued and the study left the spool. False when it is to be retried (after a
        backoff), e.g. its images are to be analysed again.
        """
        now = time.time() if now is None else now
        if study.pending:
            if not self.analyse(client, study):
                return False
            if not self.overdue(study, now):
                return True  # its results go back once it settles
        if self.send_back(client, study):
            self.spool.remove(study)
            return True
        return False

    def _attempt(self, client: httpx.Client, study: SpooledStudy, now: float) -> bool:
        key = study.folder.name
        try:
            try:
                forwarded = self.forward(client, study, now)
            except Exception as exc:  # in the pool nobody would see it: say it, and retry later
                log.warning("dimse_forward_error error_type=%s", type(exc).__name__)
                forwarded = False
            if forwarded:
                with self._lock:
                    self._failures.pop(key, None)
                    self._next_try.pop(key, None)
                return True
            with self._lock:
                n = self._failures[key] = self._failures.get(key, 0) + 1
                # bounded: ``retry_s * 2 ** (n - 1)`` overflowed past ~1024 failures (17 h of a gateway
                # down), no next try was set, and the study was retried at once, over and over
                self._next_try[key] = now + backoff(self.retry_s, n, self.max_backoff_s)
            return False
        finally:
            with self._lock:
                self._inflight.discard(key)
            self.spool.changed.set()  # a slot is free: look again now, not at the next poll

    def due(self, now: float) -> list[SpooledStudy]:
        """Studies with a step to take: pending instances at once, a settled or overdue study's send-back.

        Settled studies first (each finishes a study: its results reach the PACS sooner), then
        by first arrival.
        """
        due = [s for s in self.spool.studies() if self._is_due(s, now)]
        return sorted(due, key=lambda s: bool(s.pending))  # stable: by first arrival within each

    def overdue(self, study: SpooledStudy, now: float) -> bool:
        """The study (its current round) began ``max_wait_s`` ago: sent back even if it never settles.

        Also when it "began" more than ``max_wait_s`` ahead of ``now``: arrivals are file mtimes, and a
        study spooled while the clock was ahead (a wrong RTC at boot, stepped back by NTP) neither
        settled nor was overdue until the clock caught up with them, hours or days later.
        """
        return not -self.max_wait_s <= now - study.first_arrival < self.max_wait_s

    def _is_due(self, study: SpooledStudy, now: float) -> bool:
        """Pending instances are due at once; a study with none, once it settled or is overdue."""
        return bool(study.pending) or now - study.last_arrival >= self.settle_s or self.overdue(study, now)

    def _backing_off(self, key: str, now: float) -> bool:
        """Whether the study's retry time is still ahead (under ``_lock``; :func:`still_waiting`)."""
        return still_waiting(self._next_try.get(key, 0.0), now, self.max_backoff_s)

    def run_once(self, client: httpx.Client, now: float | None = None) -> int:
        """Start the due steps (:meth:`due`) into free slots (at most ``concurrency`` in flight).

        Returns how many were started; they finish in the pool, each freeing its slot (and waking
        the loop) for the next step at once. One step per study at a time.
        """
        now = time.time() if now is None else now
        if self._pool is None:
            workers = max(1, self.concurrency)
            self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dimse-fwd")
        with self._lock:
            if len(self._inflight) >= self.concurrency:
                return 0  # every slot busy: a store woke us, the next freed slot will look again
        started = 0
        for study in self.due(now):
            key = study.folder.name
            with self._lock:
                if len(self._inflight) >= self.concurrency:
                    break
                if key in self._inflight or self._backing_off(key, now):
                    continue
                self._inflight.add(key)
            # the listing may predate a step that finished since: act on the study as it is now
            fresh = self.spool.study(study.folder)
            if fresh is None or not self._is_due(fresh, now):
                with self._lock:
                    self._inflight.discard(key)
                continue
            self._pool.submit(self._attempt, client, fresh, now)
            started += 1
        return started

    def _loop(self) -> None:
        headers = {"Authorization": f"Bearer {self.api_key}"}
        limits = httpx.Limits(max_connections=self.concurrency)
        with httpx.Client(
            base_url=self.gateway_url, headers=headers, timeout=self.timeout_s, limits=limits, trust_env=False
        ) as client:
            wake = self.spool.changed
            while not self._stop.is_set():
                wake.clear()  # before looking: a write or a freed slot from now on wakes the next look
                try:
                    self.run_once(client)
                except Exception as exc:  # the loop must outlive any one study
                    log.warning("dimse_forward_error error_type=%s", type(exc).__name__)
                wake.wait(min(0.2, self.settle_s / 4))  # else the settle clock's resolution
            if self._pool is not None:  # let forwards in flight finish before the client closes
                self._pool.shutdown(wait=True)
                self._pool = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="dimse-forwarder", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> int:
        """Start no new step; wait up to ``timeout_s`` for those in flight; how many are still running.

        One still running is cut when the process ends: its study stays in the spool, whole, and is
        handed over again at the next start (an image the gateway answered for meanwhile is analysed
        once more; a send-back asked twice queues the same objects, which the PACS stores once).
        """
        self._stop.set()
        self.spool.changed.set()
        if self._thread is not None:
            self._thread.join(timeout=max(0.0, timeout_s))
            if self._thread.is_alive():
                with self._lock:
                    return max(1, len(self._inflight))
        return 0

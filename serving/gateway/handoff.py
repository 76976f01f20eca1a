"""What a gateway replica whose disk dies with it hands on when it stops (``CXR_EPHEMERAL_DISK``).

In the cluster the gateway's ``CXR_STACK_DIR`` is its pod's emptyDir and the HPA scales replicas
in and out; the worklist is shared (serving/triage/worklist_db.py) and results are copied to the
object store after each answer (the journal keeps a result only until that copy is made:
serving/results.py ``local_until_stored``), but these lived only on the pod's disk:

- **results whose copy failed** (the store was down): copied now;
- **PACS objects waiting for their PACS**: handed to the object store and adopted by a running
  replica (serving/pacs/handoff.py), which delivers them;
- **spooled feedback** (the object store was down when it came): its home is that store, so one
  more delivery is tried; what the store still refuses stays, and is lost with the pod (logged);
- **the audit log**: each rotated file goes to ``audit/<pod>/`` in the object store as it rotates
  (:func:`ship_audit`, every housekeeping pass), and the current one when the gateway stops, where an
  operator's audit trail collects every replica's (no identifier is in it: serving/gateway/audit.py).

On one machine the disk outlives the gateway, so nothing of this runs (the setting's default).
A pod killed without its grace period (a node lost) still loses what it held: the Deployment's
``terminationGracePeriodSeconds`` bounds the handing on, and each step logs what it moved.
"""

from __future__ import annotations

import logging
import socket
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from serving.pacs import handoff as pacs_handoff

if TYPE_CHECKING:
    from serving.gateway.state import GatewayState

log = logging.getLogger("cxr.gateway")


def hand_on(state: GatewayState) -> None:
    """Everything the replica's disk holds that must outlive it, to the object store (blocking).

    Called once the gateway has stopped taking requests and its delivery task is cancelled, after
    the audit log is closed (its last line written). A delivery still running in its thread may send
    an object this also hands on: the PACS stores its SOP Instance UID once. Each step runs even
    when an earlier one failed.
    """
    store = state.store
    if not state.settings.ephemeral_disk:
        return
    if store is None:
        log.warning("handoff_impossible reason=no_object_store")
        return
    # the PACS objects first: nothing else holds them, and the grace period may not cover a long
    # journal copied again against a slow store
    if state.sendback is not None:
        try:
            pacs_handoff.hand_off(state.sendback.outbox, store)
        except Exception as exc:
            log.warning("pacs_outbox_handoff_error error_type=%s", type(exc).__name__)
    try:  # results whose copy the store missed (it was down): the journal holds only those here
        state.results.persist_journal()
    except Exception as exc:
        log.warning("results_handoff_error error_type=%s", type(exc).__name__)
    try:
        if state.feedback.spool.depth():
            delivered = state.feedback.deliver_spooled()
            left = state.feedback.spool.depth()
            log.log(
                logging.WARNING if left else logging.INFO,
                "feedback_spool_flushed delivered=%d left=%d",
                delivered,
                left,
            )
    except Exception as exc:
        log.warning("feedback_spool_flush_error error_type=%s", type(exc).__name__)
    ship_audit(state, final=True)


def ship_audit(state: GatewayState, *, final: bool = False) -> int:
    """Rotated audit files to ``audit/<pod>/`` in the object store, each deleted here once stored
    (blocking); with ``final``, the current file too (the gateway has stopped writing it). How many.

    Each housekeeping pass ships what rotated since the last: on a disk that dies with the pod the
    rotation would otherwise delete the oldest lines after ``CXR_AUDIT_BACKUPS`` rotations, and a pod
    evicted without its grace period would take every line with it.
    """
    store = state.store
    if not state.settings.ephemeral_disk or store is None:
        return 0
    host = socket.gethostname()
    shipped = 0
    files = [(p, p.name) for p in state.audit.take_rotated()]
    if final and state.audit.path is not None and state.audit.path.exists():
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
        files.append((state.audit.path, f"{state.audit.path.name}.final-{stamp}"))
    for path, name in files:
        try:
            store.put_bytes(f"audit/{host}/{name}", path.read_bytes(), "application/x-ndjson")
        except Exception as exc:  # kept here: the next pass (or the stop) tries it again
            log.warning("audit_ship_failed file=%s error_type=%s", name, type(exc).__name__)
            continue
        if path != state.audit.path:
            path.unlink(missing_ok=True)
        shipped += 1
    return shipped


def adopt(state: GatewayState) -> int:
    """PACS objects other replicas handed off, into this replica's outbox (blocking); how many.

    The caller wakes the delivery loop (on the event loop: its event is not thread-safe)."""
    if not state.settings.ephemeral_disk or state.store is None or state.sendback is None:
        return 0
    return pacs_handoff.adopt(state.sendback.outbox, state.store, unclaimed=state.handoff_unclaimed)


def purge_rejected(state: GatewayState, max_age_s: float, now: float) -> int:
    """Handed-off PACS items no replica could adopt, set aside more than ``max_age_s`` ago, deleted
    (blocking; the retention job's, as for dead letters: they may carry the patient's identity)."""
    if not state.settings.ephemeral_disk or state.store is None:
        return 0
    try:
        days = pacs_handoff.purge_rejected(state.store, max_age_s, now)
    except Exception as exc:  # the store down: the next run tries again
        log.warning("pacs_handoff_purge_error error_type=%s", type(exc).__name__)
        return 0
    if days:
        log.info("pacs_handoff_rejected_purged folders=%d", days)
    return days

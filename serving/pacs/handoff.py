"""Queued PACS objects outlive their gateway replica: handed to S3 when it stops, adopted by another.

Why: in the cluster each replica's outbox is on its pod's emptyDir, and the HPA scales replicas
in; an object still waiting for its PACS (the PACS down, or slow) went with the pod. With
``CXR_EPHEMERAL_DISK`` the gateway, when it stops, moves every waiting object and dead letter to
``handoff/outbox/`` in the object store (object first, its meta last: an item without its meta is
not whole yet), and every running replica adopts what it finds there into its own outbox, durably,
before deleting the handed-off copy. Two replicas adopting one item at once both deliver it; the
PACS gets the same SOP Instance UID twice, which it stores once (the outbox's own idempotency, see
serving/pacs/outbox.py). The objects carry the patient's identity, as the results already in the
same store do; adopted dead letters keep their ``created`` time, so the retention job purges them
as it would have on their first replica.

What cannot be adopted is set aside once, not warned about on every pass for ever: an item whose
meta is not an outbox item's (not JSON, a forged id, fields missing), and an item still missing one
of its two files (its replica killed between the two writes) once :data:`UNCLAIMED_AFTER_S` have passed, are
moved to ``handoff/rejected/<when>/`` for an operator, and deleted with the results of their day by
the retention job (:func:`purge_rejected`): they may carry the patient's identity too.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime

from serving.pacs.outbox import DEAD_LETTER, Outbox
from serving.results import BlobStore

log = logging.getLogger("cxr.pacs")

PREFIX = "handoff/outbox/"
REJECTED = "handoff/rejected/"
# a hand-off writes an object and its meta one after the other: an object alone for this long has
# lost its writer, not waiting for it
UNCLAIMED_AFTER_S = 900.0
_STAMP = "%Y%m%dT%H%M%SZ"
_WHOLE = {"object.dcm", "meta.json"}


def _base(iid: str, dead: bool) -> str:
    return f"{PREFIX}{DEAD_LETTER + '/' if dead else ''}{iid}"


def hand_off(outbox: Outbox, store: BlobStore) -> int:
    """Move every waiting object and dead letter of ``outbox`` to the store (blocking); how many.

    Adoption into ``outbox`` ends first (one in progress is waited for). An item is removed here
    only once both its files are stored; one the store refuses stays (and is logged). The outbox is
    listed again until a pass finds nothing left to move: a delivery pass still running in its
    thread may have moved an item to the dead letters meanwhile.
    """
    outbox.close_adoption()
    moved, failed = 0, 0
    tried: set[tuple[str, bool]] = set()
    while True:
        todo = [
            (dead, item)
            for dead, items in ((False, outbox.items()), (True, outbox.dead_letters()))
            for item in items
            if (item.item_id, dead) not in tried
        ]
        if not todo:
            break
        for dead, item in todo:
            tried.add((item.item_id, dead))
            base = _base(item.item_id, dead)
            try:
                meta = (item.folder / "meta.json").read_bytes()
                store.put_bytes(f"{base}/object.dcm", item.data(), "application/dicom")
                store.put_bytes(f"{base}/meta.json", meta, "application/json")  # last: the item is whole
            except Exception as exc:
                failed += 1
                log.warning("pacs_outbox_handoff_failed error_type=%s", type(exc).__name__)
                continue
            outbox.delivered(item)
            moved += 1
    log.info("pacs_outbox_handed_off objects=%d failed=%d", moved, failed)
    return moved


def _groups(keys: list[str]) -> dict[tuple[str, bool], set[str]]:
    """The handed-off keys by item (id, dead letter) -> the file names found under it."""
    groups: dict[tuple[str, bool], set[str]] = {}
    for key in keys:
        parts = key[len(PREFIX) :].split("/")
        dead = parts[0] == DEAD_LETTER and len(parts) > 1
        if dead:
            parts = parts[1:]
        # an item is <id>/<file>; anything else is foreign and set aside as a whole
        name = parts[1] if len(parts) == 2 else ""
        groups.setdefault((parts[0], dead), set()).add(name)
    return groups


def adopt(
    outbox: Outbox, store: BlobStore, *, unclaimed: dict[str, float] | None = None, now: float | None = None
) -> int:
    """Take every whole handed-off item into ``outbox``, then delete it from the store; how many.

    ``unclaimed`` (kept by the caller between passes) remembers when each item missing a file was
    first seen; one still incomplete after :data:`UNCLAIMED_AFTER_S` is set aside, as is an item
    whose meta is not an outbox item's.
    """
    now = time.time() if now is None else now
    groups = _groups(store.list_prefix(PREFIX))
    partial = {_base(iid, dead) for (iid, dead), names in groups.items() if not names >= _WHOLE}
    if unclaimed is not None:
        for base in set(unclaimed) - partial:
            del unclaimed[base]  # made whole, adopted, or set aside by another replica
    adopted = 0
    for iid, dead in sorted(groups):
        base = _base(iid, dead)
        if base in partial:
            if unclaimed is not None and now - unclaimed.setdefault(base, now) >= UNCLAIMED_AFTER_S:
                _reject(store, base, "incomplete", now)
                unclaimed.pop(base, None)
            continue
        try:
            raw = store.get_bytes(f"{base}/meta.json")
            data = store.get_bytes(f"{base}/object.dcm")
        except Exception as exc:
            # adopted by another replica meanwhile (gone), or the store failing (tried again next pass)
            log.warning("pacs_outbox_adopt_skipped error_type=%s", type(exc).__name__)
            continue
        try:
            meta = json.loads(raw)
            if not isinstance(meta, dict):
                raise ValueError("the meta is not an object")
        except ValueError:
            _reject(store, base, "meta_not_json", now)
            continue
        # taken in and its stored copy deleted as one against this replica's own hand-off
        with outbox.adoption() as open_:
            if not open_:  # this replica is stopping: the item stays in the store for another
                break
            try:
                if outbox.adopt(iid, data, meta, dead=dead):
                    adopted += 1
            except (ValueError, KeyError, TypeError):
                _reject(store, base, "not_an_outbox_item", now)  # never half taken in
                continue
            except Exception as exc:  # this replica's disk failing: left for the next pass, or another
                log.warning("pacs_outbox_adopt_skipped error_type=%s", type(exc).__name__)
                continue
            store.delete_prefix(f"{base}/")
    if adopted:
        log.info("pacs_outbox_adopted objects=%d", adopted)
    return adopted


def _reject(store: BlobStore, base: str, reason: str, now: float) -> None:
    """Move what is under ``base`` to ``handoff/rejected/<when>/`` (copied, then deleted)."""
    stamp = datetime.fromtimestamp(now, UTC).strftime(_STAMP)
    try:
        keys = [k for k in store.list_prefix(base) if k == base or k.startswith(f"{base}/")]
        for key in keys:
            store.put_bytes(f"{REJECTED}{stamp}/{key[len(PREFIX) :]}", store.get_bytes(key))
        if any(k != base for k in keys):
            store.delete_prefix(f"{base}/")
        # a key with no folder: deleted by its own name only when no other key begins with it
        if base in keys and store.list_prefix(base) == [base]:
            store.delete_prefix(base)
    except Exception as exc:  # the store failing, or another replica moved it first: next pass
        log.warning("pacs_outbox_reject_failed error_type=%s", type(exc).__name__)
        return
    log.warning("pacs_outbox_handoff_rejected reason=%s objects=%d", reason, len(keys))


def purge_rejected(store: BlobStore, max_age_s: float, now: float | None = None) -> int:
    """Delete the items set aside more than ``max_age_s`` ago (blocking); how many days' folders."""
    now = time.time() if now is None else now
    purged = 0
    for stamp in sorted({k[len(REJECTED) :].split("/")[0] for k in store.list_prefix(REJECTED)}):
        try:
            when = datetime.strptime(stamp, _STAMP).replace(tzinfo=UTC).timestamp()
        except ValueError:  # not ours: left for a person
            continue
        if now - when > max_age_s:
            store.delete_prefix(f"{REJECTED}{stamp}/")
            purged += 1
    return purged

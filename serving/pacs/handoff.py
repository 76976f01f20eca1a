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
"""

from __future__ import annotations

import json
import logging

from serving.pacs.outbox import DEAD_LETTER, Outbox
from serving.results import BlobStore

log = logging.getLogger("cxr.pacs")

PREFIX = "handoff/outbox/"


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


def adopt(outbox: Outbox, store: BlobStore) -> int:
    """Take every whole handed-off item into ``outbox``, then delete it from the store; how many."""
    whole: set[tuple[str, bool]] = set()
    for key in store.list_prefix(PREFIX):
        parts = key[len(PREFIX) :].split("/")
        dead = parts[0] == DEAD_LETTER
        if dead:
            parts = parts[1:]
        if len(parts) == 2 and parts[1] == "meta.json":
            whole.add((parts[0], dead))
    adopted = 0
    for iid, dead in sorted(whole):
        base = _base(iid, dead)
        try:
            meta = json.loads(store.get_bytes(f"{base}/meta.json"))
            data = store.get_bytes(f"{base}/object.dcm")
        except Exception as exc:
            # adopted by another replica meanwhile (gone), or the store failing (tried again next pass)
            log.warning("pacs_outbox_adopt_skipped error_type=%s", type(exc).__name__)
            continue
        # taken in and its stored copy deleted as one against this replica's own hand-off
        with outbox.adoption() as open_:
            if not open_:  # this replica is stopping: the item stays in the store for another
                break
            try:
                if outbox.adopt(iid, data, meta, dead=dead):
                    adopted += 1
            except Exception as exc:
                # not an outbox item (left where it is for an operator, never half taken in)
                log.warning("pacs_outbox_adopt_skipped error_type=%s", type(exc).__name__)
                continue
            store.delete_prefix(f"{base}/")
    if adopted:
        log.info("pacs_outbox_adopted objects=%d", adopted)
    return adopted

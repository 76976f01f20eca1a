"""The durable outbox: result objects wait on disk until their PACS has them.

The same pattern as the feedback spool (``serving/feedback/service.py``): an item is a
folder (``object.dcm`` + ``meta.json``) written under a temp name, fsync'd and renamed into
place durably (``core.durable``) before the caller is answered, so a crash, a power cut or a
PACS outage loses nothing. An item's id is a
hash of (destination, SOP Instance UID); the objects' UIDs are derived from their source
and model version (``serving/dicom/uids.py``), so analysing the same study again, or a
retry after a send whose answer was lost, never makes a second copy at the PACS.

Delivery retries with exponential backoff per item (``CXR_OUTBOX_RETRY_S`` doubling up to
``CXR_OUTBOX_MAX_BACKOFF_S``); nothing is ever dropped, and the depth per destination is a
metric with an alert (``CXRPacsOutboxBacklog``). An object its PACS refused for good (a SOP
class it does not store, an object it cannot understand: ``serving/pacs/senders.py``) is
moved whole to the ``dead-letter/`` folder beside the items, out of delivery but kept for an
operator, who moves it back to retry it or deletes it (docs/pacs.md). A dead letter carries the
patient's name, ID and birth date, so it is kept no longer than the result it was built from: the
gateway's retention job deletes those queued more than ``CXR_RESULTS_RETENTION_DAYS`` ago
(:meth:`Outbox.purge_dead_letters`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from core.backoff import backoff
from core.durable import discard_dir, discard_leftovers, fsync_dir, make_dirs, publish_files, replace_durably

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutboxItem:
    item_id: str
    folder: Path
    destination: str
    sop_class_uid: str
    sop_instance_uid: str
    attempts: int
    next_attempt: float
    created: float

    def data(self) -> bytes:
        return (self.folder / "object.dcm").read_bytes()


def item_id(destination: str, sop_instance_uid: str) -> str:
    return hashlib.sha256(f"{destination}\0{sop_instance_uid}".encode()).hexdigest()[:40]


DEAD_LETTER = "dead-letter"  # under the outbox root: item ids are hex, never this name
UNREADABLE = "(unreadable)"  # the destination gauged for items whose meta cannot be read: no name has "("
_ITEM_ID = re.compile(r"[0-9a-f]{40}")


class Outbox:
    def __init__(self, root: Path, *, retry_s: float = 2.0, max_backoff_s: float = 300.0) -> None:
        self.root = root
        self.retry_s = retry_s
        self.max_backoff_s = max_backoff_s
        make_dirs(self.root)
        self.dead_letter = root / DEAD_LETTER  # made on the first refusal
        self._lock = threading.Lock()
        # one adoption at a time against the hand-off (serving/pacs/handoff.py): once handed off, none
        self._adoption = threading.Lock()
        self._handed_off = False
        # folders under the root and under dead-letter/ whose meta the last listing could not read
        self.unreadable: dict[Path, set[str]] = {}
        # what a crash cut short: puts never answered, items being removed, a retry's new meta
        discard_leftovers(self.root, ".tmp-*", "*/.tmp-*", f"{DEAD_LETTER}/*/.tmp-*")

    def put(self, destination: str, sop_class_uid: str, sop_instance_uid: str, data: bytes) -> bool:
        """Queue one object for one destination (blocking); False when it is already queued."""
        iid = item_id(destination, sop_instance_uid)
        final = self.root / iid
        if final.exists():  # its writer may not have made the rename durable yet: before answering
            fsync_dir(self.root)
            return False
        now = time.time()
        meta = {
            "destination": destination,
            "sop_class_uid": sop_class_uid,
            "sop_instance_uid": sop_instance_uid,
            "attempts": 0,
            "next_attempt": now,
            "created": now,
        }
        # durable before the caller answers: the SCP drops its copy of a study once its send-back
        # is answered. False: queued meanwhile by another request, the same object; keep one
        return publish_files(final, {"object.dcm": data, "meta.json": json.dumps(meta).encode()})

    def adopt(self, iid: str, data: bytes, meta: dict[str, Any], *, dead: bool = False) -> bool:
        """Take in an item another gateway replica handed off (serving/pacs/handoff.py), under its id.

        Durable before the caller deletes the handed-off copy. A waiting item is due at once (its
        attempts kept), a dead letter stays out of delivery. False when this outbox already holds
        it (adopted before, or the same object queued here): one copy per object and destination.
        """
        if not _ITEM_ID.fullmatch(iid):
            raise ValueError("not an outbox item id")
        destination, sop_instance_uid = str(meta["destination"]), str(meta["sop_instance_uid"])
        if item_id(destination, sop_instance_uid) != iid:
            raise ValueError("the item id does not name its destination and SOP Instance UID")
        record: dict[str, Any] = {
            "destination": destination,
            "sop_class_uid": str(meta["sop_class_uid"]),
            "sop_instance_uid": sop_instance_uid,
            "attempts": int(meta.get("attempts", 0)),
            "next_attempt": float(meta.get("next_attempt", time.time())) if dead else time.time(),
            "created": float(meta.get("created", time.time())),
        }
        if dead and isinstance(meta.get("refused"), dict):
            record["refused"] = meta["refused"]
        root = self.dead_letter if dead else self.root
        make_dirs(root)
        if (self.root / iid).exists() or (self.dead_letter / iid).exists():
            return False
        return publish_files(root / iid, {"object.dcm": data, "meta.json": json.dumps(record).encode()})

    @contextmanager
    def adoption(self) -> Iterator[bool]:
        """Held while one handed-off item is taken in and its copy in the store deleted; yields False
        once this outbox is being handed off itself (the item is left in the store for another).

        A replica's housekeeping adopts in a thread that cancelling it does not stop: without this,
        an item it took in after the hand-off had listed the outbox, its stored copy then deleted,
        stayed only on the disk that dies with the pod.
        """
        with self._adoption:
            yield not self._handed_off

    def close_adoption(self) -> None:
        """No adoption from now on; returns once the one in progress (if any) has finished."""
        with self._adoption:
            self._handed_off = True

    @staticmethod
    def _write_meta(folder: Path, meta: dict[str, Any]) -> None:
        """A retry's new meta, replacing the old whole (not fsync'd in its folder: a crash costs an
        earlier retry time, never the item)."""
        replace_durably(folder / "meta.json", json.dumps(meta).encode())

    def items(self) -> list[OutboxItem]:
        """The items waiting for delivery (not the dead letters).

        A retry time further ahead than the longest backoff was written by a clock since stepped back
        (e.g. a wrong RTC at boot, corrected by NTP): retry times are wall-clock, to outlive a restart,
        so without this such an item waited as long as the step, days or years. It is due within
        ``max_backoff_s`` instead, as no retry was ever scheduled later than that.
        """
        latest = time.time() + self.max_backoff_s
        return [
            i if i.next_attempt <= latest else replace(i, next_attempt=latest) for i in self._list(self.root)
        ]

    def dead_letters(self) -> list[OutboxItem]:
        """The items a PACS refused for good, kept for an operator in ``dead-letter/``."""
        if not self.dead_letter.is_dir():
            self.unreadable.pop(self.dead_letter, None)
            return []
        return self._list(self.dead_letter)

    def unreadable_count(self) -> int:
        """Folders, waiting or dead letters, whose meta the last listings could not read."""
        return sum(len(names) for names in self.unreadable.values())

    def _list(self, root: Path) -> list[OutboxItem]:
        """The items under ``root``; the folders whose meta is unreadable go to :attr:`unreadable`.

        Such a folder cannot be delivered (its destination is in the meta) nor dated: it stays for an
        operator, gauged as a dead letter of destination :data:`UNREADABLE` (alert
        ``CxrPacsOutboxDeadLetter``) and logged once. Before, it was skipped without a word, for ever.
        """
        out, unreadable = [], set()
        for folder in sorted(root.iterdir()):
            if folder.name.startswith(".tmp-") or folder.name == DEAD_LETTER or not folder.is_dir():
                continue
            # a meta that is JSON but not an item's (``null``, a field missing) is skipped as an unreadable
            # one is: raised from here, it failed every delivery pass and hand-off, for every destination
            try:
                meta = json.loads((folder / "meta.json").read_text())
                item = OutboxItem(
                    folder.name,
                    folder,
                    str(meta["destination"]),
                    str(meta["sop_class_uid"]),
                    str(meta["sop_instance_uid"]),
                    int(meta["attempts"]),
                    float(meta["next_attempt"]),
                    float(meta["created"]),
                )
            except (OSError, ValueError, KeyError, TypeError) as exc:
                unreadable.add(folder.name)
                if folder.name not in self.unreadable.get(root, set()):
                    log.warning(
                        "pacs_outbox_unreadable folder=%s item=%s error_type=%s",
                        "dead-letter" if root == self.dead_letter else "outbox",
                        folder.name[:40] if _ITEM_ID.fullmatch(folder.name) else "(not an item id)",
                        type(exc).__name__,
                    )
                continue
            out.append(item)
        self.unreadable[root] = unreadable
        return out

    def due(self, now: float | None = None) -> list[OutboxItem]:
        now = time.time() if now is None else now
        return [i for i in self.items() if i.next_attempt <= now]

    def delivered(self, item: OutboxItem) -> None:
        with self._lock:
            discard_dir(item.folder)

    def failed(self, item: OutboxItem, now: float | None = None) -> float:
        """Record a failed attempt; returns the delay before the next one."""
        now = time.time() if now is None else now
        delay = backoff(self.retry_s, item.attempts + 1, self.max_backoff_s)
        meta = {
            "destination": item.destination,
            "sop_class_uid": item.sop_class_uid,
            "sop_instance_uid": item.sop_instance_uid,
            "attempts": item.attempts + 1,
            "next_attempt": now + delay,
            "created": item.created,
        }
        with self._lock:
            if item.folder.exists():
                self._write_meta(item.folder, meta)
        return delay

    def refused(self, item: OutboxItem, reason: str, now: float | None = None) -> None:
        """Move an item its PACS refused for good to ``dead-letter/``, whole, with why and when in its meta.

        Out of delivery (its destination's other items keep flowing), kept on disk: an operator
        moves the folder back into the outbox to send it again (e.g. once the PACS stores that SOP
        class), or deletes it. A dead letter of the same object from an earlier refusal is replaced.
        """
        now = time.time() if now is None else now
        meta = {
            "destination": item.destination,
            "sop_class_uid": item.sop_class_uid,
            "sop_instance_uid": item.sop_instance_uid,
            "attempts": item.attempts + 1,
            "next_attempt": now,  # moved back by an operator: due at once
            "created": item.created,
            "refused": {"reason": reason, "at": now},
        }
        target = self.dead_letter / item.item_id
        with self._lock:
            if not item.folder.exists():  # delivered or moved meanwhile
                return
            self._write_meta(item.folder, meta)
            make_dirs(self.dead_letter)
            if target.exists():
                discard_dir(target)
            os.rename(item.folder, target)
            fsync_dir(self.dead_letter)  # the new name first: a crash between leaves it in one place
            fsync_dir(self.root)

    def purge_dead_letters(self, max_age_s: float, now: float | None = None) -> int:
        """Delete the dead letters queued more than ``max_age_s`` ago (blocking); returns how many.

        Out of delivery, a dead letter would otherwise stay until an operator acts: identified
        patient data (the SR's and presentation states' patient module) kept for ever. Dated by
        when the object was first queued (``created``), as its result is; one whose meta cannot be
        read is dated by its folder's mtime, which is never earlier. Items waiting for delivery are
        never touched here: nothing a PACS may still take is dropped.
        """
        now = time.time() if now is None else now
        if not self.dead_letter.is_dir():
            return 0
        purged = 0
        for folder in sorted(self.dead_letter.iterdir()):
            if folder.name.startswith(".tmp-") or not folder.is_dir():
                continue
            with self._lock:  # read and removed as one: a refusal may replace it with a newer object
                try:
                    created = float(json.loads((folder / "meta.json").read_text())["created"])
                except (OSError, ValueError, KeyError, TypeError):
                    try:
                        created = folder.stat().st_mtime
                    except OSError:  # moved back or deleted meanwhile by an operator
                        continue
                if now - created > max_age_s:
                    discard_dir(folder)
                    purged += 1
        return purged

    def depth(self, items: list[OutboxItem] | None = None) -> dict[str, int]:
        """Items per destination, of ``items`` (a listing in hand), else listed now."""
        counts: dict[str, int] = {}
        for item in self.items() if items is None else items:
            counts[item.destination] = counts.get(item.destination, 0) + 1
        return counts

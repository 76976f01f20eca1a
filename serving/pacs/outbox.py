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
metric with an alert (``CXRPacsOutboxBacklog``).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.durable import discard_dir, discard_leftovers, fsync_dir, make_dirs, publish_files, replace_durably


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


class Outbox:
    def __init__(self, root: Path, *, retry_s: float = 2.0, max_backoff_s: float = 300.0) -> None:
        self.root = root
        self.retry_s = retry_s
        self.max_backoff_s = max_backoff_s
        make_dirs(self.root)
        self._lock = threading.Lock()
        # what a crash cut short: puts never answered, items being removed, a retry's new meta
        discard_leftovers(self.root, ".tmp-*", "*/.tmp-*")

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

    @staticmethod
    def _write_meta(folder: Path, meta: dict[str, Any]) -> None:
        """A retry's new meta, replacing the old whole (not fsync'd in its folder: a crash costs an
        earlier retry time, never the item)."""
        replace_durably(folder / "meta.json", json.dumps(meta).encode())

    def items(self) -> list[OutboxItem]:
        out = []
        for folder in sorted(self.root.iterdir()):
            if folder.name.startswith(".tmp-") or not folder.is_dir():
                continue
            try:
                meta = json.loads((folder / "meta.json").read_text())
            except (OSError, ValueError):
                continue
            out.append(
                OutboxItem(
                    folder.name,
                    folder,
                    str(meta["destination"]),
                    str(meta["sop_class_uid"]),
                    str(meta["sop_instance_uid"]),
                    int(meta["attempts"]),
                    float(meta["next_attempt"]),
                    float(meta["created"]),
                )
            )
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
        delay = min(self.retry_s * 2**item.attempts, self.max_backoff_s)
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

    def depth(self, items: list[OutboxItem] | None = None) -> dict[str, int]:
        """Items per destination, of ``items`` (a listing in hand), else listed now."""
        counts: dict[str, int] = {}
        for item in self.items() if items is None else items:
            counts[item.destination] = counts.get(item.destination, 0) + 1
        return counts

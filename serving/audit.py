"""Audit log: one JSON line per request, never PHI.

Hospitals must show who sent what to the model and what came back. Study and
SOP UIDs are identifiers of a patient's exam, so only salted hashes of them are
written; the key id (not the key) names the caller.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

log = logging.getLogger("cxr.audit")


@dataclass
class AuditEntry:
    time: str
    request_id: str
    key_id: str | None
    role: str | None
    route: str
    method: str
    status: int
    study_hash: str | None = None
    sop_hash: str | None = None
    model_version: str | None = None
    stage: str | None = None
    detections: int | None = None
    duration_ms: float | None = None


def uid_hash(uid: str | None, salt: str) -> str | None:
    if not uid:
        return None
    return hashlib.sha256(f"{salt}\x00{uid}".encode()).hexdigest()[:16]


class AuditLog:
    """Appends JSON lines to a file (if configured) and to the ``cxr.audit`` logger."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, entry: AuditEntry) -> None:
        line = json.dumps(asdict(entry), separators=(",", ":"))
        log.info(line)
        if self.path is not None:
            with self._lock, self.path.open("a", encoding="utf-8") as handle:
                handle.write(line + "\n")


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")

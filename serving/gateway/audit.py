"""Audit log: one JSON line per request, never PHI.

Hospitals must show who sent what to the model and what came back. Study and
SOP UIDs are identifiers of a patient's exam, so only salted hashes of them are
written; the key id (not the key) names the caller.

Every access to a result names it: ``result_ids`` lists every result a request
created, read, listed or sent to a PACS (``result_id`` repeats it when there is
exactly one), and ``study_hashes`` the keyed hashes of every study it touched
or disclosed (``study_hash`` when there is exactly one). Both lists are bounded
by the routes' own limits (32 files a batch, 64 parts a STOW, 500 studies a
worklist listing, each naming at most ``CXR_PACS_MAX_STUDY_INSTANCES`` results).

The file is on by default (``<stack_dir>/serving/audit.jsonl``) and rotated by
size through a :class:`logging.handlers.RotatingFileHandler` on a logger of its
own that does not propagate, so audit lines never mix with ``gateway.log``.
One gateway process writes it (rotation is not safe across processes).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import logging.handlers
import os
import re
import sys
import threading
from collections.abc import Callable
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
    result_id: str | None = None
    result_ids: list[str] | None = None
    tenant: str | None = None
    study_hash: str | None = None
    study_hashes: list[str] | None = None
    sop_hash: str | None = None
    model_version: str | None = None
    stage: str | None = None
    detections: int | None = None
    duration_ms: float | None = None


def uid_hash(uid: str | None, salt: str) -> str | None:
    if not uid:
        return None
    return hashlib.sha256(f"{salt}\x00{uid}".encode()).hexdigest()[:16]


def audited_id(value: str, salt: str) -> str:
    """A result id as the audit line names it: as it is when it has the server's form, else keyed-hashed.

    Result ids also come from outside (the path, a feedback body), and a client that puts a
    StudyInstanceUID, a patient's name or megabytes there would have them written in clear on
    every refused attempt. The server makes every result id as ``uuid4().hex`` (32 lowercase hex,
    serving/inference/detector.py ``new_request_id``); any other value names no result, so the line
    keeps only its keyed hash (``hashed:`` + :func:`uid_hash`): repeated probes with one value still
    show as one value. Not merely "could name a journal folder" (:func:`serving.results.is_result_id`):
    PatientIDs and accession numbers are mostly letters and digits (``PAT0012345``) and passed that.
    """
    if _SERVER_ID.fullmatch(value):
        return value
    return f"hashed:{uid_hash(value, salt)}"


#: the form of every result id the server makes (``uuid.uuid4().hex``)
_SERVER_ID = re.compile(r"[0-9a-f]{32}")


class _AuditFileHandler(logging.handlers.RotatingFileHandler):
    """The rotating file handler, keeping a failed write's error for :meth:`AuditLog.write`.

    ``logging`` reports a handler's failure (ENOSPC on a full disk, EIO) by printing a traceback and
    the record (the audit line) to stderr and returning: the caller never knew a line was lost.
    """

    error: BaseException | None = None

    def handleError(self, record: logging.LogRecord) -> None:
        self.error = sys.exc_info()[1]

    def doRollover(self) -> None:
        """The file on disk before it is renamed away: :meth:`AuditLog.sync` only reaches the open one."""
        if self.stream is not None:
            with contextlib.suppress(OSError):
                self.stream.flush()
                os.fsync(self.stream.fileno())
        super().doRollover()


class AuditLog:
    """Appends JSON lines to a size-rotated file (when a path is given) and, at debug, to ``cxr.audit``.

    A line the file cannot take (a full disk) is counted in ``failed_writes`` and makes ``available``
    False until a line is written again; the gateway's log says so once per failing spell
    (``audit_write_failed``, then ``audit_write_recovered``), never with the line. The gateway answers
    before its line is written, so refusing work while ``available`` is False is the caller's choice.

    Lines reach the file (the OS) as they are written, which a ``kill -9`` cannot lose; a power cut
    or a kernel crash loses what the OS had not yet written back, up to ~30 s of accesses (Linux's
    dirty page expiry). A thread of its own fsyncs the file every ``sync_every_s`` when lines were
    written since, bounding that to about a second without an fsync on the event loop per request.
    """

    def __init__(
        self,
        path: Path | None,
        *,
        max_bytes: int = 50 * 1024 * 1024,
        backups: int = 10,
        on_lost: Callable[[], None] | None = None,
        sync_every_s: float = 1.0,
    ) -> None:
        self.path = path
        self._on_lost = on_lost  # called per line lost (the gateway counts them for an alert)
        # Not registered with logging.getLogger: one logger per instance, outside the
        # hierarchy, so nothing configured on the root (or a second app) ever sees it.
        self._logger = logging.Logger(f"cxr.audit.file:{path}", logging.INFO)
        self._logger.propagate = False
        self._handler: _AuditFileHandler | None = None
        self.available = True
        self.failed_writes = 0
        self._failing_since = 0  # ``failed_writes`` when the current failing spell began
        self._write_lock = threading.Lock()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            handler = _AuditFileHandler(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
            handler.setFormatter(logging.Formatter("%(message)s"))
            self._logger.addHandler(handler)
            self._handler = handler
        self._unsynced = False  # lines written since the last fsync
        self._closed = threading.Event()
        self._sync_failed = False
        self._syncer: threading.Thread | None = None
        if self._handler is not None:
            self._syncer = threading.Thread(
                target=self._sync_loop, args=(sync_every_s,), name="audit-fsync", daemon=True
            )
            self._syncer.start()

    def _sync_loop(self, every_s: float) -> None:
        while not self._closed.wait(every_s):
            self.sync()

    def sync(self) -> None:
        """fsync the lines written since the last call (blocking: the sync thread's, and at close).

        The file descriptor is duplicated under the write lock and synced outside it, so a request
        writing its line meanwhile never waits for the disk; a rotation closing the file in between
        leaves the duplicate valid (the rotation syncs the old file itself).
        """
        if self._handler is None:
            return
        with self._write_lock:
            stream = self._handler.stream
            if not self._unsynced or stream is None:
                return
            try:
                fd = os.dup(stream.fileno())
            except (OSError, ValueError):  # closed meanwhile
                return
            self._unsynced = False
        try:
            os.fsync(fd)
            if self._sync_failed:
                self._sync_failed = False
                log.warning("audit_sync_recovered")
        except OSError as exc:
            with self._write_lock:
                self._unsynced = True  # tried again on the next turn
            if not self._sync_failed:
                self._sync_failed = True
                log.warning("audit_sync_failed error_type=%s errno=%s", type(exc).__name__, exc.errno)
        finally:
            os.close(fd)

    def write(self, entry: AuditEntry) -> None:
        line = json.dumps(asdict(entry), separators=(",", ":"))
        log.debug(line)
        if self._handler is None:
            return
        with self._write_lock:
            self._handler.error = None
            self._logger.info(line)
            error, self._handler.error = self._handler.error, None
            if error is None:
                self._unsynced = True
                if not self.available:
                    self.available = True
                    log.warning(
                        "audit_write_recovered failed_writes=%d", self.failed_writes - self._failing_since
                    )
                return
            self.failed_writes += 1
            if self._on_lost is not None:
                self._on_lost()
            if self.available:
                self.available = False
                self._failing_since = self.failed_writes - 1
                log.warning(
                    "audit_write_failed error_type=%s errno=%s",
                    type(error).__name__,
                    getattr(error, "errno", None),
                )

    def close(self) -> None:
        self._closed.set()
        if self._syncer is not None:
            self._syncer.join(timeout=10.0)
        self.sync()
        if self._handler is not None:
            try:
                self._handler.close()
            except OSError as exc:
                # the file buffer still held what a full disk refused (lines already counted lost):
                # raised, it failed the gateway's shutdown with a traceback, whatever came after it
                log.warning("audit_close_failed error_type=%s errno=%s", type(exc).__name__, exc.errno)

    def take_rotated(self) -> list[Path]:
        """The rotated files, moved out of the rotation's way for shipping (blocking); oldest first.

        Renamed under the handler's own lock (the one a rotation holds), so a rotation cannot rename
        a file being shipped; files an earlier call took and whose shipping failed come again. The
        caller deletes each once the store holds it. Where the disk dies with the gateway (a cluster
        pod) the rotation would otherwise delete the oldest lines after ``backups`` rotations.
        """
        if self.path is None or self._handler is None:
            return []
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
        with self._handler.lock or contextlib.nullcontext():
            n = 1
            while self.path.with_name(f"{self.path.name}.{n}").exists():
                n += 1
            for k in range(n - 1, 0, -1):  # the oldest (highest number) first, so names sort by age
                os.replace(
                    self.path.with_name(f"{self.path.name}.{k}"),
                    self.path.with_name(f"{self.path.name}.shipping-{stamp}-{n - k:03d}"),
                )
        return sorted(self.path.parent.glob(f"{self.path.name}.shipping-*"))

    def files(self) -> list[Path]:
        """The log and its rotated backups that exist, oldest last (``audit.jsonl``, ``.1``, ``.2``, ...)."""
        if self.path is None:
            return []
        found = [self.path] if self.path.exists() else []
        n = 1
        while (backup := self.path.with_name(f"{self.path.name}.{n}")).exists():
            found.append(backup)
            n += 1
        return found


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")

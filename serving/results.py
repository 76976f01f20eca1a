"""Detection results: the JSON a client gets, kept for the SR, the review page and feedback.

A result is written to a local directory (temp file + rename) BEFORE its
response goes out, so a gateway killed right after answering loses nothing (not
fsync'd: a power cut may lose the last few, whose callers hold the JSON already,
and the DIMSE SCP, which keeps a study until its send-back is answered, sends the
images of a study the gateway lost again; what a PACS is owed is in the fsync'd
outbox, ``serving/pacs/outbox.py``);
recent results also stay in memory (the review page asks for the preview and
SR right after detecting), and a background copy goes to the S3 store under
``results/<request_id>/`` for other replicas. The source image is kept beside
it because feedback must ship the image a radiologist corrected and the SR
must reference the source header; it is identified patient data, so it is
deleted after ``CXR_SOURCE_RETENTION_HOURS`` while the result JSON stays for
``CXR_RESULTS_RETENTION_DAYS``. What is computed from the source later (a saliency map) is kept
beside it as ``derived-<name>`` and deleted with it: it is derived from identified pixels.

Result ids are made by the server (UUIDv4) and every record names its
tenant: a key of another tenant gets 404 for it, exactly as for an id that
does not exist.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from core.triage import shown_score
from serving.contract import Detection
from serving.errors import NotFound

log = logging.getLogger(__name__)

_EXT = {"dicom": "dcm", "png": "png", "jpeg": "jpg"}


class BlobStore(Protocol):
    def put_bytes(self, key: str, data: bytes, content_type: str = ...) -> None: ...

    def get_bytes(self, key: str) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def list_prefix(self, prefix: str) -> list[str]: ...

    def delete_prefix(self, prefix: str) -> int: ...


@dataclass
class ResultRecord:
    """One answered request: the response body plus what SR/feedback need later."""

    request_id: str
    response: dict[str, Any]
    source_format: str
    source: bytes | None = None
    created: datetime = field(default_factory=lambda: datetime.now(UTC))
    tenant: str = "default"

    def meta(self) -> dict[str, Any]:
        return {
            "response": self.response,
            "source_format": self.source_format,
            "created": self.created.isoformat(),
            "tenant": self.tenant,
        }

    @property
    def detections(self) -> list[dict[str, Any]]:
        return list(self.response.get("detections", []))


def build_response(
    request_id: str,
    *,
    model_name: str,
    model_version: str,
    stage: str,
    width: int,
    height: int,
    sop_instance_uid: str | None,
    detections: list[Detection],
    timings_ms: dict[str, float],
    triage: tuple[float, bool] | None = None,
    variant: str | None = None,
) -> dict[str, Any]:
    """The DESIGN.md detection response, boxes in original pixels.

    ``triage``: the image's abnormality score and priority flag (core/triage.py), an added key
    ``"triage": {"score", "priority"}`` that clients reading only the DESIGN.md keys never miss.
    ``variant``: the serving precision that answered (fp32, int8, fp16-trt), an added key of the
    model block.
    """
    image: dict[str, Any] = {"width": width, "height": height}
    if sop_instance_uid:
        image["sop_instance_uid"] = sop_instance_uid
    response: dict[str, Any] = {
        "request_id": request_id,
        "model": {
            "name": model_name,
            "version": model_version,
            "stage": stage,
            **({"variant": variant} if variant else {}),
        },
        "image": image,
        "detections": [d.to_json() for d in detections],
        "timings_ms": {k: round(v, 3) for k, v in timings_ms.items()},
    }
    if triage is not None:
        response["triage"] = {"score": shown_score(triage[0]), "priority": bool(triage[1])}
    return response


@dataclass(frozen=True)
class Retention:
    """How long results and their identified source images are kept."""

    results: timedelta = timedelta(days=30)
    sources: timedelta = timedelta(hours=24)


@dataclass
class PurgeReport:
    results: int = 0
    sources: int = 0


class ResultStore:
    """Local journal (durable, written before answering) + memory LRU + background S3 copy."""

    def __init__(
        self,
        store: BlobStore | None,
        *,
        local_dir: Path | None = None,
        cache_items: int = 256,
        cache_bytes: int = 512 * 1024 * 1024,
        retention: Retention | None = None,
        local_until_stored: bool = False,
    ) -> None:
        """``local_until_stored``: the journal holds a result only until its copy in ``store`` is made
        (``CXR_EPHEMERAL_DISK``). A cluster pod's disk is a small emptyDir that dies with the pod; a
        day of identified sources (15 MiB a radiograph) outgrew it within some dozens of images, and
        kubelet evicts such a pod without its grace period, its queued PACS objects with it."""
        self._store = store
        self._local = local_dir
        self._local_until_stored = local_until_stored and store is not None
        self._cache: OrderedDict[str, ResultRecord] = OrderedDict()
        self._cache_items = cache_items
        self._cache_bytes = cache_bytes
        self._bytes = 0
        self.retention = retention or Retention()
        self._lock = threading.Lock()
        # stored sources the last purge found without a result.json (see :func:`purge_expired`)
        self._undated: set[str] = set()

    def remember(self, record: ResultRecord) -> None:
        with self._lock:
            old = self._cache.pop(record.request_id, None)
            if old is not None:
                self._bytes -= len(old.source or b"")
            self._cache[record.request_id] = record
            self._bytes += len(record.source or b"")
            # bounded by count and by bytes: a 2048x2048 DICOM is 8 MiB
            while len(self._cache) > 1 and (
                len(self._cache) > self._cache_items or self._bytes > self._cache_bytes
            ):
                _, evicted = self._cache.popitem(last=False)
                self._bytes -= len(evicted.source or b"")

    def journal(self, record: ResultRecord) -> None:
        """Write the record to the local directory (blocking; call before the response goes out)."""
        self.remember(record)
        if self._local is None:
            return
        final = self._local / record.request_id
        tmp = self._local / f".tmp-{record.request_id}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            if record.source is not None:
                (tmp / f"source.{_EXT.get(record.source_format, 'bin')}").write_bytes(record.source)
            (tmp / "result.json").write_text(json.dumps(record.meta()))
            os.replace(tmp, final)  # ids are server-made UUIDs: the target never exists
        except BaseException:
            # the temp folder holds the identified source and is never a result: a failed write (a
            # full disk) must not leave it behind, where no retention would ever find it
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def persist(self, record: ResultRecord) -> None:
        """Copy to S3 (blocking: call from a worker thread). Failures are logged, not raised."""
        if self._store is None:
            return
        prefix = f"results/{record.request_id}"
        source_stored = False
        try:
            if record.source is not None:
                ext = _EXT.get(record.source_format, "bin")
                self._store.put_bytes(f"{prefix}/source.{ext}", record.source)
                source_stored = True
            self._store.put_bytes(
                f"{prefix}/result.json", json.dumps(record.meta()).encode(), "application/json"
            )
        except Exception as exc:  # the local journal holds it; the store being down fails nothing
            log.warning(
                "result_persist_failed request_id=%s error_type=%s", record.request_id, type(exc).__name__
            )
            if source_stored:
                self._drop_undated_source(prefix)
            return
        if self._local_until_stored and self._local is not None and is_result_id(record.request_id):
            shutil.rmtree(self._local / record.request_id, ignore_errors=True)

    def persist_journal(self) -> int:
        """Copy every result the journal still holds to the store (blocking); how many were tried.

        With ``local_until_stored`` the journal holds only what a copy has not reached yet (the store
        was down): a gateway whose disk dies with it calls this when it stops, and the retention job
        retries it. Idempotent: the same keys, the same bytes.
        """
        if self._store is None or self._local is None or not self._local.exists():
            return 0
        tried = 0
        now = datetime.now(UTC)
        for folder in sorted(self._local.iterdir()):
            if folder.name.startswith(".tmp-") or not is_result_id(folder.name):
                continue
            record = self._read_local(folder.name)
            if record is None:  # not a result, or stored and gone meanwhile (the answer's own copy)
                continue
            # past its retention: never copied to a store whose purge may already have run (the
            # stop's hand-off has no purge after it); the local purge deletes it here
            if now - record.created > self.retention.results:
                continue
            if now - record.created > self.retention.sources:
                record.source = None
            self.persist(record)
            tried += 1
        return tried

    def _drop_undated_source(self, prefix: str) -> None:
        """Delete a source copied to S3 whose ``result.json`` did not follow (blocking).

        :func:`purge_expired` dates a stored result by its ``result.json``: such a source, identified
        patient data, would wait for the retention job to find it undated on two runs; deleted now.
        """
        assert self._store is not None
        try:
            self._store.delete_prefix(f"{prefix}/source.")
        except Exception as exc:
            log.warning("result_source_orphaned prefix=%s error_type=%s", prefix, type(exc).__name__)

    def purge(self, now: datetime | None = None) -> PurgeReport:
        """Delete sources past their retention and results past theirs, locally and in S3 (blocking)."""
        now = now or datetime.now(UTC)
        report = PurgeReport()
        if self._local is not None and self._local.exists():
            _purge_local(self._local, self.retention, now, report)
        if self._store is not None:
            try:
                purge_expired(self._store, self.retention, now, report, undated=self._undated)
            except Exception as exc:  # the store down: the next run tries again; the rest goes now
                log.warning("results_store_purge_failed error_type=%s", type(exc).__name__)
        with self._lock:
            for rid, record in list(self._cache.items()):
                if now - record.created > self.retention.results:
                    self._cache.pop(rid)
                    self._bytes -= len(record.source or b"")
                elif record.source is not None and now - record.created > self.retention.sources:
                    self._bytes -= len(record.source)
                    record.source = None
        if report.results or report.sources:
            log.info("results_purged results=%d sources=%d", report.results, report.sources)
        return report

    def keep_derived(self, request_id: str, name: str, data: bytes) -> bool:
        """Keep ``data`` computed from the source beside the journalled result (blocking).

        Only where this gateway journalled the result (its ``result.json`` is here): a folder
        without one would never be purged. False when not kept; the caller then recomputes later.
        """
        if self._local is None or not is_result_id(request_id) or not is_result_id(name):
            return False
        if self._local_until_stored:  # the folder goes once stored: a derived file would race it
            return False
        folder = self._local / request_id
        if not (folder / "result.json").exists():
            return False
        tmp = folder / f".tmp-derived-{name}-{uuid.uuid4().hex[:8]}"
        tmp.write_bytes(data)
        os.replace(tmp, folder / f"derived-{name}")
        return True

    def derived(self, request_id: str, name: str) -> bytes | None:
        """What :meth:`keep_derived` kept, or None (blocking; callers check the source is still kept)."""
        if self._local is None or not is_result_id(request_id) or not is_result_id(name):
            return None
        try:
            return (self._local / request_id / f"derived-{name}").read_bytes()
        except OSError:
            return None

    def get(self, request_id: str, tenant: str) -> ResultRecord:
        """The caller's result, from memory, the local journal, else S3 (blocking)."""
        if not is_result_id(request_id):  # not quoted: 5,000 characters, a NUL or look-alikes came back
            raise NotFound("no result with that request_id: it is not an id this server gives")
        missing = NotFound(f"no result with request_id '{request_id}' (expired, never stored or not yours)")
        record = self._lookup(request_id)
        if record is None or record.tenant != tenant:
            raise missing
        age = datetime.now(UTC) - record.created
        if age > self.retention.results:
            raise NotFound(f"result '{request_id}' is older than the retention period")
        if age > self.retention.sources:
            self._drop_source(record)
        return record

    def _drop_source(self, record: ResultRecord) -> None:
        """Forget ``record``'s source, and its bytes in the cache's count when the cache holds it.

        The record is the cached object itself: dropping its source without the count left the
        bytes counted for ever (an eviction subtracts what the record holds then, nothing), and
        the count, past ``cache_bytes`` after enough of them, kept the cache down to one result.
        """
        with self._lock:
            if record.source is not None and self._cache.get(record.request_id) is record:
                self._bytes -= len(record.source)
            record.source = None

    def _lookup(self, request_id: str) -> ResultRecord | None:
        with self._lock:
            if request_id in self._cache:
                return self._cache[request_id]
        record = self._read_local(request_id) or self._read_store(request_id)
        if record is not None:
            self.remember(record)
        return record

    def _read_local(self, request_id: str) -> ResultRecord | None:
        if self._local is None:
            return None
        folder = self._local / request_id
        try:
            meta = json.loads((folder / "result.json").read_text())
        except (OSError, ValueError):
            return None
        record = _record(request_id, meta)
        if record is None:
            return None
        source_file = folder / f"source.{_EXT.get(record.source_format, 'bin')}"
        try:
            source: bytes | None = source_file.read_bytes()
        except FileNotFoundError:
            source = None
        except OSError:
            return None
        if source is None and not (folder / "result.json").exists():
            # the folder went after its result.json was read (stored meanwhile, ``local_until_stored``):
            # not a result without its source, which the cache would then keep; the store has it whole
            return None
        record.source = source
        return record

    def _read_store(self, request_id: str) -> ResultRecord | None:
        if self._store is None:
            return None
        prefix = f"results/{request_id}"
        try:
            meta = json.loads(self._store.get_bytes(f"{prefix}/result.json"))
        except Exception:
            return None
        record = _record(request_id, meta)
        if record is None:
            return None
        try:
            record.source = self._store.get_bytes(f"{prefix}/source.{_EXT.get(record.source_format, 'bin')}")
        except Exception:
            record.source = None
        return record


def _record(request_id: str, meta: Any) -> ResultRecord | None:
    """The record a ``result.json`` describes; None for one that is no result (never served).

    JSON of another shape (``[]``, no ``response``, a ``created`` that is no time) raised out of the
    read, a 500 for any caller of any tenant; one without ``created`` was dated "now" on every read,
    so reads never found it expired. The retention job dates such a folder by its mtime.
    """
    if not isinstance(meta, dict) or not isinstance(meta.get("response"), dict):
        return None
    try:
        created = _created(meta["created"])
    except (KeyError, ValueError, TypeError):
        return None
    fmt = str(meta.get("source_format", "dicom"))
    return ResultRecord(request_id, meta["response"], fmt, None, created, str(meta.get("tenant", "default")))


def _purge_local(root: Path, retention: Retention, now: datetime, report: PurgeReport) -> None:
    """Apply the retention to the journal's folders, also those that are no readable result.

    A ``.tmp-`` folder is a journal write a crash cut short (it holds the identified source, never a
    result); a folder whose ``result.json`` cannot be read (not fsync'd: a power cut can empty it)
    is never served. Neither can be dated by its ``created``, so both are dated by the folder's
    mtime, which is never before the write began: their sources go no sooner than a result's would.
    A ``.tmp-`` folder past the source retention goes whole (a write in progress is milliseconds old).
    """
    for folder in root.iterdir():
        modified = _mtime(folder)
        if modified is None:  # not a folder, or renamed meanwhile (a journal write finishing)
            continue
        if folder.name.startswith(".tmp-"):
            if now - modified > retention.sources:
                report.sources += any(folder.glob("source.*"))
                shutil.rmtree(folder, ignore_errors=True)
            continue
        try:
            created = _created(json.loads((folder / "result.json").read_text())["created"])
        except (OSError, ValueError, KeyError, TypeError):
            created = modified
        if now - created > retention.results:
            shutil.rmtree(folder, ignore_errors=True)
            report.results += 1
            continue
        if now - created > retention.sources:
            try:
                sources = list(folder.glob("source.*"))
                for source in sources:
                    source.unlink(missing_ok=True)
                report.sources += bool(sources)
                # computed from the source: gone with it, also when written after the source went
                for derived in [*folder.glob("derived-*"), *folder.glob(".tmp-derived-*")]:
                    derived.unlink(missing_ok=True)
            except OSError as exc:  # one folder the disk refuses keeps no other past its retention
                log.warning("result_source_purge_failed error_type=%s", type(exc).__name__)


def purge_expired(
    store: BlobStore,
    retention: Retention,
    now: datetime | None = None,
    report: PurgeReport | None = None,
    *,
    undated: set[str] | None = None,
) -> PurgeReport:
    """Delete stored results and sources past their retention in S3 (blocking).

    ``undated``: the ids whose source an earlier run found stored without a ``result.json``, updated
    in place (the caller keeps it between runs; None: such sources are left alone). A gateway killed
    between a result's two puts, or a store that failed the ``result.json`` and then the clean-up
    (:meth:`ResultStore._drop_undated_source`), leaves a source nothing can date: identified pixels
    kept for ever. One still without its ``result.json`` a run later is deleted; a copy in progress
    takes milliseconds, the runs are ``CXR_HOUSEKEEPING_INTERVAL_S`` apart.
    """
    now = now or datetime.now(UTC)
    report = report or PurgeReport()
    names = store.list_prefix("results/")
    ids = sorted({name.split("/")[1] for name in names if name.count("/") >= 2})
    if undated is not None:
        _purge_undated(store, names, undated, report)
    for request_id in ids:
        try:
            meta = json.loads(store.get_bytes(f"results/{request_id}/result.json"))
            created = _created(meta["created"])
        except Exception:  # half-written or foreign objects: leave them for a person to look at
            continue
        # one object the store fails to delete must not keep every result after it past its retention
        try:
            if now - created > retention.results:
                store.delete_prefix(f"results/{request_id}/")
                report.results += 1
            elif now - created > retention.sources and any(
                n.startswith(f"results/{request_id}/source.") for n in names
            ):
                store.delete_prefix(f"results/{request_id}/source.")
                report.sources += 1
        except Exception as exc:  # the next run tries again
            log.warning("result_purge_failed error_type=%s", type(exc).__name__)
    return report


def _purge_undated(store: BlobStore, names: list[str], undated: set[str], report: PurgeReport) -> None:
    """Delete the stored sources that two runs in a row found without a ``result.json`` (blocking).

    ``undated`` is updated to the ids found so in this run and not deleted (the next run's candidates).
    """
    dated, with_source = set(), set()  # one pass over the names: a store holds thousands of results
    for name in names:
        parts = name.split("/")
        if len(parts) == 3 and parts[2] == "result.json":
            dated.add(parts[1])
        elif len(parts) == 3 and parts[2].startswith("source."):
            with_source.add(parts[1])
    found = with_source - dated
    for request_id in sorted(found & undated):
        try:
            store.delete_prefix(f"results/{request_id}/source.")
        except Exception as exc:  # the store failing now: the next run tries again
            log.warning("result_source_orphaned request_id=%s error_type=%s", request_id, type(exc).__name__)
            continue
        found.discard(request_id)
        report.sources += 1
    undated.clear()
    undated.update(found)


def _mtime(folder: Path) -> datetime | None:
    """When ``folder`` last changed; None when it is not (or no longer) a folder."""
    try:
        st = folder.stat()
    except OSError:
        return None
    return datetime.fromtimestamp(st.st_mtime, UTC) if stat.S_ISDIR(st.st_mode) else None


def _created(value: Any) -> datetime:
    """A ``created`` as written in ``result.json``, always with a zone (``ValueError``/``TypeError``).

    The gateway writes UTC with its offset; a time without one (another writer, an older one) is
    taken as UTC. Compared as it was with the aware ``now``, it raised ``TypeError`` outside the
    guards, and one such result stopped the whole purge: every other result and identified source,
    of every tenant, then outlived its retention.
    """
    created = datetime.fromisoformat(value)
    return created if created.tzinfo is not None else created.replace(tzinfo=UTC)


_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def is_result_id(request_id: str) -> bool:
    """An id (or derived name) that may name a journal folder, a file and an S3 key: ASCII only.

    ``str.isalnum`` also takes non-ASCII letters and digits (U+00E9, fullwidth U+FF21, U+0661): 64 of them
    can pass NAME_MAX (255 bytes; a lookup then raised instead of finding nothing), and filesystems
    that normalise names (NFD on HFS+, casefolded ext4) list such a name in another form than the
    one written. The server's ids are UUID hex and its derived names ``[A-Za-z0-9_-]``.
    """
    return 0 < len(request_id) <= 64 and all(c in _ID_CHARS for c in request_id)

"""Detection results: the JSON a client gets, kept for the SR, the review page and feedback.

Recent results stay in memory (the review page asks for the preview and SR
right after detecting); every result is also written to the S3 store under
``results/<request_id>/`` in the background, never delaying the response.
The source image is kept beside it because feedback must ship the image a
radiologist corrected, and the SR must reference the source header.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from serving.errors import NotFound
from serving.postprocess import Detection

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
) -> dict[str, Any]:
    """The DESIGN.md detection response, boxes in original pixels."""
    image: dict[str, Any] = {"width": width, "height": height}
    if sop_instance_uid:
        image["sop_instance_uid"] = sop_instance_uid
    return {
        "request_id": request_id,
        "model": {"name": model_name, "version": model_version, "stage": stage},
        "image": image,
        "detections": [d.to_json() for d in detections],
        "timings_ms": {k: round(v, 3) for k, v in timings_ms.items()},
    }


class ResultStore:
    """Memory LRU in front of S3 ``results/``; S3 writes happen on a caller-supplied background path."""

    def __init__(
        self,
        store: BlobStore | None,
        *,
        cache_items: int = 256,
        cache_bytes: int = 512 * 1024 * 1024,
        retention_days: int = 30,
    ) -> None:
        self._store = store
        self._cache: OrderedDict[str, ResultRecord] = OrderedDict()
        self._cache_items = cache_items
        self._cache_bytes = cache_bytes
        self._bytes = 0
        self._retention = timedelta(days=retention_days)
        self._lock = threading.Lock()

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

    def persist(self, record: ResultRecord) -> None:
        """Write to S3 (blocking: call from a worker thread). Failures are logged, not raised."""
        if self._store is None:
            return
        prefix = f"results/{record.request_id}"
        try:
            meta = {
                "response": record.response,
                "source_format": record.source_format,
                "created": record.created.isoformat(),
            }
            if record.source is not None:
                ext = _EXT.get(record.source_format, "bin")
                self._store.put_bytes(f"{prefix}/source.{ext}", record.source)
            self._store.put_bytes(f"{prefix}/result.json", json.dumps(meta).encode(), "application/json")
        except Exception as exc:  # the store being down must not fail a detection already answered
            log.warning("result_persist_failed request_id=%s error=%s", record.request_id, exc)

    def purge(self) -> int:
        return purge_expired(self._store, self._retention) if self._store is not None else 0

    def get(self, request_id: str) -> ResultRecord:
        """From memory, else from S3 (blocking)."""
        with self._lock:
            if request_id in self._cache:
                return self._cache[request_id]
        if self._store is None or not _safe_id(request_id):
            raise NotFound(f"no result with request_id '{request_id}'")
        prefix = f"results/{request_id}"
        try:
            meta = json.loads(self._store.get_bytes(f"{prefix}/result.json"))
        except Exception as exc:
            raise NotFound(f"no result with request_id '{request_id}' (expired or never stored)") from exc
        fmt = str(meta.get("source_format", "dicom"))
        try:
            source: bytes | None = self._store.get_bytes(f"{prefix}/source.{_EXT.get(fmt, 'bin')}")
        except Exception:
            source = None
        created = datetime.fromisoformat(meta.get("created", datetime.now(UTC).isoformat()))
        if datetime.now(UTC) - created > self._retention:
            raise NotFound(f"result '{request_id}' is older than the retention period")
        record = ResultRecord(request_id, meta["response"], fmt, source, created)
        self.remember(record)
        return record


def purge_expired(store: BlobStore, retention: timedelta, now: datetime | None = None) -> int:
    """Delete stored results older than the retention period; returns how many went (blocking)."""
    now = now or datetime.now(UTC)
    ids = sorted({name.split("/")[1] for name in store.list_prefix("results/") if name.count("/") >= 2})
    purged = 0
    for request_id in ids:
        try:
            meta = json.loads(store.get_bytes(f"results/{request_id}/result.json"))
            created = datetime.fromisoformat(meta["created"])
        except Exception:  # half-written or foreign objects: leave them for a person to look at
            continue
        if now - created > retention:
            store.delete_prefix(f"results/{request_id}/")
            purged += 1
    if purged:
        log.info("results_purged count=%d retention_days=%d", purged, retention.days)
    return purged


def _safe_id(request_id: str) -> bool:
    return 0 < len(request_id) <= 64 and all(c.isalnum() or c in "-_" for c in request_id)

"""The retention job deletes what it can when a part of it fails: one failure keeps nothing else."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest

from serving.config import ServingSettings
from serving.errors import WorklistUnavailable
from serving.metrics import GatewayMetrics
from serving.pacs.outbox import Outbox
from serving.results import ResultRecord, ResultStore, Retention
from serving.triage.worklist import WorklistStore
from tests.unit.serving.serving_support import MemoryStore

pytestmark = pytest.mark.unit

RETENTION = Retention(timedelta(days=30), timedelta(hours=24))


class _StoreDown(MemoryStore):
    """An object store that answers nothing (down, or its credentials revoked)."""

    def list_prefix(self, prefix: str) -> list[str]:
        raise ConnectionError("the store does not answer")

    def delete_prefix(self, prefix: str) -> int:
        raise ConnectionError("the store does not answer")


class _OneObjectStuck(MemoryStore):
    """A store that fails to delete one result's objects (a lock, a permission) and deletes the rest."""

    def __init__(self, stuck: str) -> None:
        super().__init__()
        self.stuck = stuck

    def delete_prefix(self, prefix: str) -> int:
        if prefix.startswith(f"results/{self.stuck}/"):
            raise PermissionError("AccessDenied")
        return super().delete_prefix(prefix)


def _stored(store: MemoryStore, rid: str, created: datetime) -> None:
    record = ResultRecord(rid, {"request_id": rid}, "dicom", b"DICM-bytes", created, "t")
    store.put_bytes(f"results/{rid}/source.dcm", b"DICM-bytes")
    store.put_bytes(f"results/{rid}/result.json", json.dumps(record.meta()).encode())


def _outbox_with_an_old_dead_letter(tmp_path: Path) -> Outbox:
    """An outbox holding one dead letter (a patient's SR) queued 31 days ago."""
    outbox = Outbox(tmp_path / "outbox")
    outbox.put("pacs", "1.2.840.10008.5.1.4.1.1.88.33", "1.2.9", b"sr of a patient")
    [item] = outbox.items()
    outbox.refused(item, "no_presentation_context")
    meta_file = outbox.dead_letter / item.item_id / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["created"] -= 31 * 86400
    meta_file.write_text(json.dumps(meta))
    return outbox


def test_one_stored_result_the_store_cannot_delete_keeps_no_other_past_its_retention() -> None:
    now = datetime.now(UTC)
    store = _OneObjectStuck("aaa-first")  # sorted first: the purge met it before every other result
    _stored(store, "aaa-first", now - timedelta(days=31))
    _stored(store, "bbb-expired", now - timedelta(days=31))
    _stored(store, "ccc-day-old", now - timedelta(hours=25))
    _stored(store, "ddd-fresh", now)
    report = ResultStore(store, retention=RETENTION).purge(now)
    assert not any(k.startswith("results/bbb-expired/") for k in store.objects)
    assert "results/ccc-day-old/source.dcm" not in store.objects
    assert "results/ccc-day-old/result.json" in store.objects
    assert "results/ddd-fresh/source.dcm" in store.objects  # nothing younger goes
    assert "results/aaa-first/result.json" in store.objects  # tried again by the next run
    assert (report.results, report.sources) == (1, 1)


def test_an_object_store_that_is_down_stops_neither_the_local_purge_nor_the_worklist_nor_dead_letters(
    tmp_path: Path,
) -> None:
    from serving.gateway.app import RETENTION_STATUS, run_retention

    settings = ServingSettings(stack_dir=tmp_path)
    now = datetime.now(UTC)
    results = ResultStore(_StoreDown(), local_dir=settings.resolved_results_dir, retention=RETENTION)
    results.journal(
        ResultRecord("old", {"request_id": "old"}, "dicom", b"DICM", now - timedelta(days=31), "t")
    )
    results.remember(
        ResultRecord("cached", {"request_id": "cached"}, "dicom", b"DICM", now - timedelta(days=31))
    )
    worklist = WorklistStore(settings.resolved_worklist_db)
    worklist.record("t", "1.2.3.4", ["old"], [0.9], "1", "production", 0.5, now=now - timedelta(days=31))
    worklist.record("t", "1.2.3.5", ["new"], [0.9], "1", "production", 0.5, now=now)
    outbox = _outbox_with_an_old_dead_letter(tmp_path)
    state = SimpleNamespace(
        settings=settings,
        results=results,
        worklist=worklist,
        sendback=SimpleNamespace(outbox=outbox),
        metrics=GatewayMetrics(),
        store=None,
    )
    run_retention(state)  # type: ignore[arg-type]
    assert not (settings.resolved_results_dir / "old").exists()
    assert "cached" not in results._cache  # the in-memory copy goes too
    assert worklist.get("t", "1.2.3.4") is None  # the study's UID does not outlive its results
    assert worklist.get("t", "1.2.3.5") is not None
    assert outbox.dead_letters() == []  # the patient's name in a refused object neither
    assert (settings.resolved_results_dir.parent / RETENTION_STATUS).exists()


def test_a_worklist_database_that_is_down_does_not_keep_pacs_dead_letters_past_their_retention(
    tmp_path: Path,
) -> None:
    from serving.gateway.app import run_retention

    class _DownWorklist:
        def purge(self, before: datetime) -> int:
            raise WorklistUnavailable("the worklist database cannot be used right now (OperationalError)")

    settings = ServingSettings(stack_dir=tmp_path)
    outbox = _outbox_with_an_old_dead_letter(tmp_path)
    state = SimpleNamespace(
        settings=settings,
        results=ResultStore(None, local_dir=settings.resolved_results_dir, retention=RETENTION),
        worklist=_DownWorklist(),
        sendback=SimpleNamespace(outbox=outbox),
        metrics=GatewayMetrics(),
        store=None,
    )
    run_retention(state)  # type: ignore[arg-type]
    assert outbox.dead_letters() == []


def test_one_journal_source_the_disk_refuses_to_delete_keeps_no_other_past_its_retention(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = datetime.now(UTC)
    results = ResultStore(None, local_dir=tmp_path, retention=RETENTION)
    for rid in ("aaa", "bbb", "ccc", "ddd"):  # whichever order the folder lists them in
        results.journal(
            ResultRecord(rid, {"request_id": rid}, "dicom", b"DICM", now - timedelta(hours=25), "t")
        )
    results.journal(
        ResultRecord("eee", {"request_id": "eee"}, "dicom", b"DICM", now - timedelta(days=31), "t")
    )
    unlink = Path.unlink

    def refused(self: Path, missing_ok: bool = False) -> None:
        if self.parent.name == "bbb":  # an immutable file, a folder another user owns, EIO
            raise PermissionError(1, "Operation not permitted")
        unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", refused)
    results.purge(now)
    assert [rid for rid in ("aaa", "ccc", "ddd") if (tmp_path / rid / "source.dcm").exists()] == []
    assert not (tmp_path / "eee").exists()
    assert (tmp_path / "bbb" / "source.dcm").exists()  # tried again by the next run

"""Identified sources are deleted after their retention by a job whose last run `make status` shows."""

from __future__ import annotations

import errno
import json
import os
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from serving.errors import NotFound
from serving.results import ResultRecord, ResultStore, Retention
from tests.unit.serving.serving_support import MemoryStore, make_dicom

pytestmark = pytest.mark.unit


def test_local_journal_drops_sources_after_hours_and_results_after_days(tmp_path: Path) -> None:
    store = ResultStore(
        None, local_dir=tmp_path, retention=Retention(timedelta(days=30), timedelta(hours=24))
    )
    now = datetime.now(UTC)
    ages = {"fresh": timedelta(0), "day-old": timedelta(hours=25), "month-old": timedelta(days=31)}
    for rid, age in ages.items():
        store.journal(ResultRecord(rid, {"request_id": rid}, "dicom", b"DICM-bytes", now - age, "t"))
    report = ResultStore(None, local_dir=tmp_path, retention=store.retention).purge(now)
    assert (report.results, report.sources) == (1, 1)
    assert (tmp_path / "fresh" / "source.dcm").exists()
    assert (tmp_path / "day-old" / "result.json").exists() and not (
        tmp_path / "day-old" / "source.dcm"
    ).exists()
    assert not (tmp_path / "month-old").exists()
    reopened = ResultStore(None, local_dir=tmp_path, retention=store.retention)
    assert reopened.get("day-old", "t").source is None  # the result stays readable, its image is gone
    assert reopened.get("fresh", "t").source == b"DICM-bytes"


def test_the_retention_job_runs_at_start_and_stack_status_shows_it(
    onnx_client: TestClient, keys: dict[str, str]
) -> None:
    from serving.gateway.app import run_retention
    from stack.cli import retention_summary
    from stack.config import StackSettings

    state = onnx_client.app.state.cxr  # type: ignore[attr-defined]
    r = onnx_client.post(
        "/v1/detect",
        content=make_dicom(seed=90),
        headers={"X-API-Key": keys["pacs"], "Content-Type": "application/dicom"},
    )
    rid = r.json()["request_id"]
    folder = state.settings.resolved_results_dir / rid
    assert (folder / "source.dcm").exists()  # journalled before the answer
    old = state.results.get(rid, "default")
    old.created -= timedelta(hours=state.settings.source_retention_hours + 1)  # as if answered a day ago
    (folder / "result.json").write_text(json.dumps(old.meta()))
    run_retention(state)
    assert not (folder / "source.dcm").exists()
    sr = onnx_client.get(f"/v1/results/{rid}/sr", headers={"X-API-Key": keys["pacs"]})
    assert sr.status_code == 404 and "CXR_SOURCE_RETENTION_HOURS" in sr.json()["error"]["message"]
    line = retention_summary(StackSettings(stack_dir=state.settings.stack_dir))
    assert "retention job: last run" in line and "source images" in line


def _age(path: Path, age: timedelta) -> None:
    when = (datetime.now(UTC) - age).timestamp()
    os.utime(path, (when, when))


def test_a_journal_write_cut_short_leaves_no_identified_source_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ResultStore(None, local_dir=tmp_path)

    def disk_full(*_args: object, **_kwargs: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)  # the source is written, result.json is not
    with pytest.raises(OSError):
        store.journal(ResultRecord("r1", {"request_id": "r1"}, "dicom", b"DICM-bytes", tenant="t"))
    assert list(tmp_path.iterdir()) == []


def test_journal_leftovers_and_unreadable_results_lose_their_source_after_its_retention(
    tmp_path: Path,
) -> None:
    retention = Retention(timedelta(days=30), timedelta(hours=24))
    crashed = tmp_path / ".tmp-r1-0123abcd"  # a journal write a kill -9 cut short: never renamed
    crashed.mkdir()
    (crashed / "source.dcm").write_bytes(b"DICM-bytes")
    _age(crashed, timedelta(hours=25))
    writing = tmp_path / ".tmp-r2-0123abcd"  # a write in progress now: not touched
    writing.mkdir()
    (writing / "source.dcm").write_bytes(b"DICM-bytes")
    emptied = tmp_path / "r3"  # result.json is not fsync'd: a power cut can leave it empty
    emptied.mkdir()
    (emptied / "result.json").write_text("")
    (emptied / "source.dcm").write_bytes(b"DICM-bytes")
    _age(emptied, timedelta(hours=25))
    report = ResultStore(None, local_dir=tmp_path, retention=retention).purge()
    assert not crashed.exists()
    assert (writing / "source.dcm").exists()
    assert not (emptied / "source.dcm").exists()
    assert report.sources == 2
    _age(emptied, timedelta(days=31))
    ResultStore(None, local_dir=tmp_path, retention=retention).purge()
    assert not emptied.exists()


class _FlakyStore(MemoryStore):
    """An object store whose puts of ``result.json`` fail (a timeout between the two puts)."""

    def put_bytes(self, key: str, data: bytes, content_type: str = "") -> None:
        if key.endswith("/result.json"):
            raise TimeoutError("the store stopped answering")
        super().put_bytes(key, data, content_type)


def test_a_source_copied_to_the_store_without_its_result_json_is_not_left_there(tmp_path: Path) -> None:
    store = _FlakyStore()
    results = ResultStore(store, local_dir=tmp_path)
    results.persist(ResultRecord("r1", {"request_id": "r1"}, "dicom", b"DICM-bytes", tenant="t"))
    # purge_expired dates a stored result by its result.json: without one, a source would stay for ever
    assert store.objects == {}


def test_the_retention_job_deletes_pacs_dead_letters_older_than_the_results_retention(
    onnx_client: TestClient,
) -> None:
    from serving.gateway.app import run_retention

    state = onnx_client.app.state.cxr  # type: ignore[attr-defined]
    outbox = state.sendback.outbox
    outbox.put("pacs", "1.2.840.10008.5.1.4.1.1.88.33", "1.2.9", b"sr of a patient")
    outbox.put("pacs", "1.2.840.10008.5.1.4.1.1.11.1", "1.2.10", b"pr of a patient")
    old, new = sorted(outbox.items(), key=lambda i: i.sop_instance_uid)
    days = state.settings.results_retention_days
    outbox.refused(old, "no_presentation_context")
    outbox.refused(new, "no_presentation_context")
    meta = json.loads((outbox.dead_letter / old.item_id / "meta.json").read_text())
    meta["created"] -= (days + 1) * 86400  # queued longer ago than its result is kept
    (outbox.dead_letter / old.item_id / "meta.json").write_text(json.dumps(meta))
    try:
        run_retention(state)
        assert [d.item_id for d in outbox.dead_letters()] == [new.item_id]
        status = json.loads((state.settings.resolved_results_dir.parent / "retention.json").read_text())
        assert status["dead_letters_deleted"] == 1
    finally:  # the app is shared by the module's tests: leave its outbox as it was
        shutil.rmtree(outbox.dead_letter, ignore_errors=True)


def test_on_an_ephemeral_disk_the_journal_holds_a_result_only_until_the_store_has_it(tmp_path: Path) -> None:
    """A cluster pod's emptyDir (1 GiB) filled with a day of identified sources within some dozens of
    radiographs, and kubelet evicts such a pod without its grace period."""

    class Flaky(MemoryStore):
        down = True

        def put_bytes(self, key: str, data: bytes, content_type: str = "") -> None:
            if self.down:
                raise OSError("store down")
            super().put_bytes(key, data, content_type)

    store = Flaky()
    results = ResultStore(store, local_dir=tmp_path, local_until_stored=True)
    stored, missed = (ResultRecord(rid, {"request_id": rid}, "dicom", b"DICM", tenant="t") for rid in "ab")
    for record in (stored, missed):
        results.journal(record)
    results.persist(missed)  # the store is down: the journal keeps it
    store.down = False
    results.persist(stored)
    assert not (tmp_path / "a").exists() and (tmp_path / "b" / "source.dcm").exists()
    assert not results.keep_derived("a", "saliency", b"png")  # never beside a folder that goes
    fresh = ResultStore(store, local_dir=tmp_path, local_until_stored=True)  # nothing in memory
    assert fresh.get("a", "t").source == b"DICM"  # read back from the store

    assert fresh.persist_journal() == 1  # what the store missed, when it is back (or at the stop)
    assert not (tmp_path / "b").exists() and store.objects["results/b/source.dcm"] == b"DICM"


def test_a_journal_folder_going_while_it_is_read_is_read_from_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``local_until_stored`` the answer's own copy deletes the folder once stored: a read that
    found its result.json and then no source returned the result without its source (cached so:
    saliency 404, a send-back without the image), and the retention job's or the stop's
    persist_journal raised on the source that went, leaving the rest of the journal uncopied."""
    store = MemoryStore()
    results = ResultStore(store, local_dir=tmp_path, local_until_stored=True)
    record = ResultRecord("a", {"request_id": "a"}, "dicom", b"DICM", tenant="t")
    results.journal(record)
    store.put_bytes("results/a/source.dcm", b"DICM")  # the answer's copy, about to delete the folder
    store.put_bytes("results/a/result.json", json.dumps(record.meta()).encode())
    real_read_text = Path.read_text

    def read_then_the_copy_deletes(path: Path, *args: object, **kwargs: object) -> str:
        text = real_read_text(path, *args, **kwargs)  # type: ignore[arg-type]
        if path.name == "result.json":
            shutil.rmtree(path.parent)
        return text

    monkeypatch.setattr(Path, "read_text", read_then_the_copy_deletes)
    fresh = ResultStore(store, local_dir=tmp_path, local_until_stored=True)  # nothing in memory
    assert fresh.get("a", "t").source == b"DICM"
    results.journal(ResultRecord("b", {"request_id": "b"}, "dicom", b"DICM", tenant="t"))
    assert ResultStore(store, local_dir=tmp_path, local_until_stored=True).persist_journal() == 0


def test_persist_journal_copies_nothing_past_its_retention(tmp_path: Path) -> None:
    """The stop's hand-off has no purge after it: an expired result (or a source past its hours) the
    journal still held went back to a store whose purge had deleted it, identified data included."""
    store = MemoryStore()
    retention = Retention(timedelta(days=30), timedelta(hours=24))
    results = ResultStore(store, local_dir=tmp_path, retention=retention, local_until_stored=True)
    now = datetime.now(UTC)
    ages = {"fresh": timedelta(0), "day-old": timedelta(hours=25), "old": timedelta(days=31)}
    for rid, age in ages.items():
        results.journal(ResultRecord(rid, {"request_id": rid}, "dicom", b"DICM", now - age, "t"))
    results.persist_journal()
    assert sorted(store.objects) == [
        "results/day-old/result.json",
        "results/fresh/result.json",
        "results/fresh/source.dcm",
    ]


def test_a_source_dropped_when_read_past_its_retention_frees_its_bytes_in_the_cache() -> None:
    """``get`` dropped the cached record's source but not its bytes from the count: an eviction then
    subtracted nothing, and the count, stuck past ``cache_bytes``, kept the cache down to one result."""
    results = ResultStore(None, cache_bytes=10)  # memory only: an evicted result is gone
    now = datetime.now(UTC)
    results.journal(ResultRecord("old", {}, "dicom", b"DICM-1", now - timedelta(hours=25), "t"))
    assert results.get("old", "t").source is None  # past its source retention
    results.journal(ResultRecord("new", {}, "dicom", b"DICM-2", now, "t"))  # 6 bytes of 10 in the cache
    assert results.get("old", "t").response == {} and results.get("new", "t").source == b"DICM-2"


class _CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.asked: list[str] = []

    def get_bytes(self, key: str) -> bytes:
        self.asked.append(key)
        return super().get_bytes(key)


@pytest.mark.parametrize(
    "request_id",
    ["caf\u00e9", "\uff21" * 32, "\u0661\u0662\u0663", "\U0001d7d8" * 64, "a\u0301"],
    ids=["latin-e-acute", "fullwidth-A", "arabic-indic-digits", "64-math-digits", "combining-accent"],
)
def test_a_result_id_that_is_not_ascii_names_no_folder_and_no_object(tmp_path: Path, request_id: str) -> None:
    """Ids are the server's UUID hex; ``str.isalnum`` took non-ASCII letters and digits too. 64 of
    U+1D7D8 are 256 bytes, past NAME_MAX: ``keep_derived`` raised instead of answering False, and
    a filesystem that normalises names (HFS+ NFD) lists 'cafe\u0301' for the 'caf\u00e9' written, an
    id the same check refused."""
    store = _CountingStore()
    results = ResultStore(store, local_dir=tmp_path)
    with pytest.raises(NotFound):
        results.get(request_id, "t")
    assert store.asked == []
    assert results.keep_derived(request_id, "saliency", b"png") is False
    assert results.derived(request_id, "saliency") is None
    assert results.keep_derived("0123abcd" * 4, "saliency-g16-all", b"png") is False  # no result: False


def test_a_result_json_dated_without_a_zone_does_not_stop_the_purge(tmp_path: Path) -> None:
    """A ``created`` without an offset (another writer's) raised TypeError against the aware ``now``
    outside the guards: one such result stopped the whole purge, and every other result's identified
    source, of every tenant, outlived its retention. It is taken as UTC."""
    now = datetime.now(UTC)
    store = MemoryStore()
    undated = {"response": {}, "created": (now - timedelta(days=40)).replace(tzinfo=None).isoformat()}
    store.put_bytes("results/aaa/result.json", json.dumps(undated).encode())
    store.put_bytes("results/aaa/source.dcm", b"DICM")
    old = ResultRecord("zzz", {}, "dicom", b"DICM", now - timedelta(hours=25), "other-tenant")
    store.put_bytes("results/zzz/result.json", json.dumps(old.meta()).encode())
    store.put_bytes("results/zzz/source.dcm", b"DICM")
    (tmp_path / "aaa").mkdir()
    (tmp_path / "aaa" / "result.json").write_text(json.dumps(undated))
    (tmp_path / "aaa" / "source.dcm").write_bytes(b"DICM")
    ResultStore(None, local_dir=tmp_path).journal(old)
    report = ResultStore(store, local_dir=tmp_path).purge(now)
    assert sorted(store.objects) == ["results/zzz/result.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zzz"]
    assert not (tmp_path / "zzz" / "source.dcm").exists()
    assert (report.results, report.sources) == (2, 2)
    fresh = {"response": {}, "created": now.replace(tzinfo=None).isoformat(), "tenant": "t"}
    store.put_bytes("results/bbb/result.json", json.dumps(fresh).encode())
    assert ResultStore(store).get("bbb", "t").response == {}  # read as UTC, not a 500


class _CrashingStore(MemoryStore):
    """An object store whose ``result.json`` puts fail and whose deletes fail too: the gateway killed
    between a result's two puts, or the store gone before the orphaned source could be deleted."""

    def put_bytes(self, key: str, data: bytes, content_type: str = "") -> None:
        if key.endswith("/result.json"):
            raise TimeoutError("the store stopped answering")
        super().put_bytes(key, data, content_type)

    def delete_prefix(self, prefix: str) -> int:
        raise TimeoutError("the store stopped answering")


def test_a_source_left_in_the_store_without_its_result_json_is_purged_by_a_later_retention_run(
    tmp_path: Path,
) -> None:
    """A source whose ``result.json`` never reached the store (a crash between the two puts, or the
    store failing the put and then the clean-up) cannot be dated, and the purge left it for ever:
    identified pixels outliving every retention. Seen without a ``result.json`` by two runs (a copy
    in progress takes milliseconds, the runs are an interval apart), it is deleted."""
    crashing = _CrashingStore()
    ResultStore(crashing, local_dir=tmp_path).persist(ResultRecord("r1", {}, "dicom", b"DICM", tenant="t"))
    assert list(crashing.objects) == ["results/r1/source.dcm"]  # the orphan the crash leaves
    store = MemoryStore()
    store.objects = dict(crashing.objects)
    results = ResultStore(store, local_dir=tmp_path)
    results.persist(ResultRecord("r2", {}, "dicom", b"DICM", tenant="t"))  # a whole, fresh result
    results.purge()  # the first run sees it: it may be a copy in progress
    assert "results/r1/source.dcm" in store.objects
    store.put_bytes("results/r3/source.dcm", b"DICM")  # a copy starting just before the second run
    report = results.purge()
    assert sorted(store.objects) == [
        "results/r2/result.json",
        "results/r2/source.dcm",
        "results/r3/source.dcm",
    ]
    assert report.sources == 1
    store.put_bytes("results/r3/result.json", json.dumps(ResultRecord("r3", {}, "dicom").meta()).encode())
    results.purge()  # its result.json came: a result like any other, its source kept
    assert "results/r3/source.dcm" in store.objects

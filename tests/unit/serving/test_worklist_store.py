"""The worklist store: merges a study's images, orders priority then oldest, scoped by tenant, purged."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from serving.triage.worklist import StudyTriage, WorklistStore

pytestmark = pytest.mark.unit

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)


@pytest.fixture
def store(tmp_path: Path) -> WorklistStore:
    """The store under test: a SQLite file here; tests/integration/serving/test_worklist_postgres.py
    runs these same tests on PostgreSQL, the cluster's backend."""
    return WorklistStore(tmp_path / "w.sqlite")


def _at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def _record(store: WorklistStore, study: str, score: float, minutes: float, tenant: str = "a") -> StudyTriage:
    rid = f"{study}-{minutes}"
    return store.record(tenant, study, [rid], [score], "7", "production", 0.5, now=_at(minutes))


def test_record_merges_a_studys_images_keeping_the_max_score_and_every_result(store: WorklistStore) -> None:
    first = store.record("a", "1.2.3", ["r1"], [0.3], "7", "production", 0.5, now=_at(0))
    assert (first.score, first.priority, first.images) == (pytest.approx(0.3), False, 1)
    second = store.record("a", "1.2.3", ["r2", "r3"], [0.8, 0.1], "8", "canary", 0.5, now=_at(5))
    assert second.score == pytest.approx(0.8) and second.priority
    assert second.result_ids == ("r1", "r2", "r3") and second.images == 3
    assert (second.model_version, second.stage) == ("8", "canary")
    assert second.first_seen == _at(0) and second.last_seen == _at(5)
    third = store.record("a", "1.2.3", ["r2"], [0.2], "8", "canary", 0.5, now=_at(6))  # a resend
    assert third.result_ids == ("r1", "r2", "r3") and third.score == pytest.approx(0.8)
    assert store.get("a", "1.2.3") == third
    assert third.as_dict() == {"score": 0.8, "priority": True, "threshold": 0.5}


def test_list_puts_priority_first_then_the_longest_waiting(store: WorklistStore) -> None:
    _record(store, "normal-old", 0.1, 0)
    _record(store, "urgent-new", 0.95, 30)
    _record(store, "urgent-old", 0.6, 10)
    _record(store, "normal-new", 0.4, 40)
    order = [s.study_uid for s in store.list("a", _at(-60))]
    # within a class by arrival, not by score: 0.95 arrived later than 0.6 and waits its turn
    assert order == ["urgent-old", "urgent-new", "normal-old", "normal-new"]
    assert [s.study_uid for s in store.list("a", _at(-60), limit=2)] == ["urgent-old", "urgent-new"]


def test_list_shows_only_the_hours_window(store: WorklistStore) -> None:
    _record(store, "yesterday", 0.9, -24 * 60)
    _record(store, "today", 0.2, 0)
    assert [s.study_uid for s in store.list("a", _at(-60))] == ["today"]
    _record(store, "yesterday", 0.1, 1)  # a new image brings the study back into the window
    assert {s.study_uid for s in store.list("a", _at(-60))} == {"today", "yesterday"}


def test_another_tenant_never_sees_a_study(store: WorklistStore) -> None:
    _record(store, "1.2.3", 0.9, 0, tenant="a")
    assert store.list("b", _at(-60)) == []
    assert store.get("b", "1.2.3") is None
    # the same UID from another tenant is another row: neither merges into the other
    other = _record(store, "1.2.3", 0.1, 1, tenant="b")
    assert other.images == 1 and other.score == pytest.approx(0.1)
    assert store.get("a", "1.2.3").score == pytest.approx(0.9)  # type: ignore[union-attr]


def test_purge_drops_studies_last_seen_before_the_cutoff(store: WorklistStore) -> None:
    assert store.purge(_at(0)) == 0
    _record(store, "old", 0.9, 0)
    _record(store, "new", 0.9, 60)
    assert store.purge(_at(30)) == 1
    assert store.get("a", "old") is None and store.get("a", "new") is not None


def test_concurrent_records_of_one_study_lose_no_image(store: WorklistStore) -> None:
    threads = [
        threading.Thread(target=store.record, args=("a", "s", [f"r{i}"], [i / 20], "7", "production", 0.5))
        for i in range(12)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    study = store.get("a", "s")
    assert study is not None and study.images == 12 and study.score == pytest.approx(11 / 20)


def test_an_image_of_another_patient_is_refused_and_leaves_the_row_as_it_was(store: WorklistStore) -> None:
    from serving.errors import StudyPatientMismatch

    store.record("a", "1.2.3", ["r1"], [0.2], "7", "production", 0.5, patient_key="k-alice", now=_at(0))
    with pytest.raises(StudyPatientMismatch):
        store.record("a", "1.2.3", ["r2"], [0.9], "7", "production", 0.5, patient_key="k-bob", now=_at(1))
    with pytest.raises(StudyPatientMismatch):  # no PatientID is not "the same patient" either
        store.record("a", "1.2.3", ["r3"], [0.9], "7", "production", 0.5, patient_key="", now=_at(1))
    row = store.get("a", "1.2.3")
    assert row is not None and row.result_ids == ("r1",) and row.score == pytest.approx(0.2)
    store.record("a", "1.2.3", ["r4"], [0.4], "7", "production", 0.5, patient_key="k-alice", now=_at(2))
    assert store.patient_key("a", "1.2.3") == "k-alice"
    assert store.patient_key("b", "1.2.3") is None  # another tenant's worklist knows no such study


def test_a_patient_key_with_an_issuer_is_its_own_patient_but_a_row_from_before_issuers_takes_it(
    store: WorklistStore,
) -> None:
    """Keys with an IssuerOfPatientID are ``<PatientID hash>/<with issuer>``: another issuer is another
    patient; a row written before the issuer counted (the PatientID hash alone) takes its patient's
    next images instead of refusing them for the rest of the study's window."""
    from serving.errors import StudyPatientMismatch
    from serving.triage.worklist import same_patient

    store.record("a", "1.2.3", ["r1"], [0.2], "7", "production", 0.5, patient_key="h/issuer-a", now=_at(0))
    for other in ("h/issuer-b", "h", "g/issuer-a"):
        with pytest.raises(StudyPatientMismatch):
            store.record("a", "1.2.3", ["r2"], [0.9], "7", "production", 0.5, patient_key=other, now=_at(1))
    store.record("a", "1.2.4", ["r3"], [0.2], "7", "production", 0.5, patient_key="h", now=_at(0))
    store.record("a", "1.2.4", ["r4"], [0.2], "7", "production", 0.5, patient_key="h/issuer-a", now=_at(1))
    assert store.patient_key("a", "1.2.4") == "h"  # the row keeps its key
    assert not same_patient("", "/x") and not same_patient("h", "hh/x") and same_patient("", "")


def test_a_purge_before_any_study_creates_no_file(tmp_path: Path) -> None:
    assert WorklistStore(tmp_path / "w.sqlite").purge(_at(0)) == 0
    assert not (tmp_path / "w.sqlite").exists()


def test_an_older_gateways_worklist_gains_the_patient_key_and_adopts_the_first_one(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "w.sqlite"
    with sqlite3.connect(path) as old:  # the schema before patient keys
        old.execute(
            "CREATE TABLE studies (tenant TEXT NOT NULL, study_uid TEXT NOT NULL, score REAL NOT NULL, "
            "priority INTEGER NOT NULL, threshold REAL NOT NULL, result_ids TEXT NOT NULL, "
            "model_version TEXT NOT NULL, stage TEXT NOT NULL, first_seen REAL NOT NULL, "
            "last_seen REAL NOT NULL, PRIMARY KEY (tenant, study_uid))"
        )
        old.execute(
            "INSERT INTO studies VALUES ('a', '1.2.3', 0.3, 0, 0.5, '[\"r1\"]', '7', 'production', ?, ?)",
            (_at(0).timestamp(), _at(0).timestamp()),
        )
    old.close()
    store = WorklistStore(path)
    assert store.patient_key("a", "1.2.3") is None
    merged = store.record("a", "1.2.3", ["r2"], [0.1], "7", "production", 0.5, patient_key="k1", now=_at(1))
    assert merged.result_ids == ("r1", "r2")
    assert store.patient_key("a", "1.2.3") == "k1"
    # the older row's score (0.3) stood for r1: pushed out by the cap, it still counts
    for i in range(2):
        capped = store.record(
            "a", "1.2.3", [f"n{i}"], [0.1], "7", "production", 0.5, sop_uids=[f"N{i}"], max_results=2
        )
    assert capped.result_ids == ("n0", "n1") and capped.score == pytest.approx(0.3)


def test_a_row_keeps_the_latest_results_up_to_its_bound_and_the_score_over_all(store: WorklistStore) -> None:
    """A PACS resending a study for ever grew the row, and the send-back loads every result it names."""
    store.record("a", "1.2.3", ["r0"], [0.9], "7", "production", 0.5, max_results=3, now=_at(0))
    for i in range(1, 6):
        row = store.record("a", "1.2.3", [f"r{i}"], [0.1], "7", "production", 0.5, max_results=3, now=_at(i))
    assert row.result_ids == ("r3", "r4", "r5") and row.score == pytest.approx(0.9)


def test_a_resent_image_counts_once_and_resends_never_push_the_studys_other_images_out(
    store: WorklistStore,
) -> None:
    store.record(
        "a", "1.2.3", ["rA", "rB"], [0.2, 0.9], "7", "production", 0.5, sop_uids=["A", "B"], now=_at(0)
    )
    store.record(
        "a", "1.2.3", ["rC"], [0.1], "7", "production", 0.5, sop_uids=["C"], max_results=3, now=_at(1)
    )
    for i in range(10):  # image A sent again and again
        row = store.record(
            "a",
            "1.2.3",
            [f"rA{i}"],
            [0.1],
            "7",
            "production",
            0.5,
            sop_uids=["A"],
            max_results=3,
            now=_at(2 + i),
        )
    assert row.result_ids == ("rB", "rC", "rA9") and row.images == 3 and row.score == pytest.approx(0.9)


def test_an_images_newer_result_replaces_its_score_but_an_image_the_cap_drops_still_counts(
    store: WorklistStore,
) -> None:
    """A corrected resend (or a new model) lowers the study's score with the image's new result; an
    urgent image pushed out of the capped row is never forgotten."""
    store.record("a", "s1", ["rA", "rB"], [0.9, 0.2], "7", "production", 0.5, sop_uids=["A", "B"], now=_at(0))
    row = store.record("a", "s1", ["rA2"], [0.1], "8", "production", 0.5, sop_uids=["A"], now=_at(1))
    assert row.result_ids == ("rB", "rA2") and row.score == pytest.approx(0.2) and not row.priority
    store.record("a", "s2", ["u"], [0.95], "7", "production", 0.5, sop_uids=["U"], max_results=2, now=_at(0))
    for i in range(3):
        row = store.record(
            "a",
            "s2",
            [f"n{i}"],
            [0.1],
            "7",
            "production",
            0.5,
            sop_uids=[f"N{i}"],
            max_results=2,
            now=_at(1 + i),
        )
    assert row.result_ids == ("n1", "n2") and row.score == pytest.approx(0.95) and row.priority


def test_the_pools_reconnection_warnings_are_throttled_and_count_what_they_held_back() -> None:
    """With the cluster's worklist database down, psycopg_pool logged each failed reconnection, about
    once a second in every replica; the gateway's own worklist_db_error already says it is down."""
    import logging

    from serving.triage.worklist_db import PostgresWorklistDb, Throttle

    now = [0.0]
    throttle = Throttle(every_s=60, clock=lambda: now[0])

    def record(text: str) -> logging.LogRecord:
        return logging.LogRecord(
            "psycopg.pool", logging.WARNING, __file__, 1, "error connecting in %r: %s", ("pool-1", text), None
        )

    assert throttle.filter(record("refused"))
    for second in range(1, 30):
        now[0] = float(second)
        assert not throttle.filter(record("refused"))
    assert throttle.filter(logging.LogRecord("psycopg.pool", logging.WARNING, __file__, 1, "other", (), None))
    now[0] = 61.0
    later = record("refused 100%")
    assert throttle.filter(later)
    assert (
        later.getMessage()
        == "error connecting in 'pool-1': refused 100% (29 like it in the last 60s not logged)"
    )

    pool_log = logging.getLogger("psycopg.pool")
    for installed in [f for f in pool_log.filters if isinstance(f, Throttle)]:  # another test's build
        pool_log.removeFilter(installed)
    PostgresWorklistDb("postgresql://cxr@127.0.0.1:1/worklist").close()  # building one installs it
    assert any(isinstance(f, Throttle) for f in pool_log.filters)


def test_a_score_just_below_the_threshold_never_reads_as_reaching_it(store: WorklistStore) -> None:
    """Rounded to 4 decimals, 0.49996 read 0.5 in the worklist and the SR beside a 0.5 threshold and
    no priority flag; the scores are cut instead (core/triage.py ``shown_score``)."""
    study = store.record("a", "1.2.9", ["r1"], [0.49996], "7", "production", 0.5, now=_at(0))
    assert not study.priority
    assert study.as_dict()["score"] == 0.4999 and study.to_json()["score"] == 0.4999
    exact = store.record("a", "1.2.10", ["r2"], [0.7], "7", "production", 0.5, now=_at(0))
    assert exact.as_dict()["score"] == 0.7  # float noise of the scaling is not cut to 0.6999

"""The worklist on PostgreSQL, the cluster's backend, against a real server started on loopback.

Every test of tests/unit/serving/test_worklist_store.py runs here again with the store on
PostgreSQL (they are imported, and the ``store`` fixture below replaces theirs); the tests below
are what only a shared database must do: two gateway replicas merging one study at once, every
replica creating the table at once, and a database that is down answering in bounded time with a
message that names no password.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from serving.errors import WorklistUnavailable
from serving.triage.worklist import WorklistStore
from serving.triage.worklist_db import PostgresWorklistDb
from tests.fixtures.postgres import PostgresServer
from tests.unit.serving.test_worklist_store import *  # noqa: F403 (the same tests, on PostgreSQL)
from tests.unit.serving.test_worklist_store import _at

pytestmark = pytest.mark.integration


@pytest.fixture
def database(postgres_server: PostgresServer) -> str:
    return postgres_server.create_database("w" + uuid.uuid4().hex[:12])


@pytest.fixture
def store(database: str) -> Iterator[WorklistStore]:
    worklist = WorklistStore(PostgresWorklistDb(database))
    yield worklist
    worklist.close()


def test_two_replicas_merging_one_study_at_once_lose_no_image(database: str) -> None:
    """Two gateway replicas (two stores, two pools) record images of one study at the same time."""
    replicas = [WorklistStore(PostgresWorklistDb(database)) for _ in range(2)]
    try:
        threads = [
            threading.Thread(
                target=replicas[i % 2].record,
                args=("a", "1.2.3", [f"r{i}"], [i / 40], "7", "production", 0.5),
                kwargs={"sop_uids": [f"S{i}"], "patient_key": "k"},
            )
            for i in range(16)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for replica in replicas:  # both see the one row, with every image
            study = replica.get("a", "1.2.3")
            assert study is not None and study.images == 16 and study.score == pytest.approx(15 / 40)
        assert [s.study_uid for s in replicas[1].list("a", _at(-60 * 24 * 365 * 10))] == ["1.2.3"]
    finally:
        for replica in replicas:
            replica.close()


def test_replicas_starting_at_once_create_the_table_once(database: str) -> None:
    replicas = [WorklistStore(PostgresWorklistDb(database)) for _ in range(4)]
    errors: list[BaseException] = []

    def first_call(replica: WorklistStore) -> None:
        try:
            replica.get("a", "1.2.3")
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=first_call, args=(r,)) for r in replicas]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for replica in replicas:
        replica.close()
    assert errors == []


def test_a_database_that_is_down_is_unavailable_in_bounded_time_and_names_no_password(
    postgres_server: PostgresServer,
) -> None:
    url = f"postgresql://cxr:s3cret-pw@{postgres_server.host}:{postgres_server.port}/no_such_db"
    store = WorklistStore(PostgresWorklistDb(url, timeout_s=2))
    try:
        started = time.monotonic()
        with pytest.raises(WorklistUnavailable) as err:
            store.get("a", "1.2.3")
        assert time.monotonic() - started < 10
        assert "s3cret-pw" not in str(err.value) and err.value.status == 503
    finally:
        store.close()


def test_a_merge_behind_a_study_lock_a_hung_replica_holds_gives_up_in_bounded_time(database: str) -> None:
    """A replica frozen (or cut off) inside a merge keeps its transaction and the study's advisory
    lock: every other merge of that study waited for ever, each holding one of the gateway's
    worker threads, and a detection waits for its merge after its own time limit. Bounded, that
    one study's merge fails and the worklist stays usable for every other study."""
    import json

    import psycopg

    store = WorklistStore(PostgresWorklistDb(database, timeout_s=1))
    try:
        store.get("a", "1.2.3")  # the table exists
        with psycopg.connect(database) as hung:
            hung.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (json.dumps(["a", "1.2.3"]),)
            )
            outcome: list[object] = []

            def merge() -> None:
                try:
                    outcome.append(store.record("a", "1.2.3", ["r1"], [0.3], "7", "production", 0.5))
                except WorklistUnavailable as exc:
                    outcome.append(exc)

            waiting = threading.Thread(target=merge, daemon=True)
            started = time.monotonic()
            waiting.start()
            waiting.join(10)
            assert not waiting.is_alive(), "the merge still waits for the hung replica's lock"
            assert time.monotonic() - started < 5
            assert isinstance(outcome[0], WorklistUnavailable) and outcome[0].status == 503
            # a lock that waited too long is that study's trouble: the database is not down
            assert store.record("a", "4.5.6", ["r2"], [0.9], "7", "production", 0.5).images == 1
            hung.rollback()
        assert store.record("a", "1.2.3", ["r1"], [0.3], "7", "production", 0.5).images == 1
    finally:
        store.close()


def test_a_database_restart_fails_no_call_once_it_is_back(
    postgres_server: PostgresServer, database: str
) -> None:
    """The pool's idle connections die with a restart (or a failover): each failed one call, and
    that failure then made the replica treat a database that is up as down for a while."""
    import psycopg

    store = WorklistStore(PostgresWorklistDb(database))
    try:
        store.record("a", "1.2.3", ["r1"], [0.3], "7", "production", 0.5)
        with psycopg.connect(postgres_server.url(), autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'cxr-gateway-worklist'"
            )
        for _ in range(3):
            study = store.get("a", "1.2.3")
            assert study is not None and study.images == 1
    finally:
        store.close()


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://cxr:pa%zzSECRET@127.0.0.1:1/worklist",  # a password not percent-encoded
        "postgresql://cxr:pa@ssSECRET@127.0.0.1:1/worklist",
    ],
)
def test_a_url_whose_password_is_not_encoded_never_reaches_the_log(
    url: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """psycopg_pool's background worker logs why each connection failed, with libpq's message,
    which quotes the part of the URL it could not parse: here, the password."""
    import logging

    from serving.triage import worklist_db

    monkeypatch.setattr(worklist_db._POOL_LOG, "every_s", 0.0)  # every line the pool logs is read here

    with caplog.at_level(logging.DEBUG):
        try:
            store = WorklistStore(PostgresWorklistDb(url, timeout_s=1))
            with pytest.raises(WorklistUnavailable) as err:
                store.get("a", "1.2.3")
            time.sleep(1.5)  # the pool's worker retries meanwhile
            store.close()
        except WorklistUnavailable as exc:  # refused before any connection: as good
            err = pytest.ExceptionInfo.from_exception(exc)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "SECRET" not in logged and "SECRET" not in str(err.value)
    assert "SECRET" not in repr(err.value.__cause__) and "SECRET" not in repr(err.value.__context__)


def test_a_study_uid_postgresql_cannot_store_fails_that_merge_only(database: str) -> None:
    """A hostile DICOM's StudyInstanceUID with a NUL in it (SQLite stores it, PostgreSQL's text
    cannot): that merge is unavailable, and the next study's merge is not failed fast with it."""
    store = WorklistStore(PostgresWorklistDb(database))
    try:
        with pytest.raises(WorklistUnavailable):
            store.record("a", "1.2.3\x004", ["r1"], [0.3], "7", "production", 0.5)
        assert store.record("a", "1.2.3", ["r2"], [0.3], "7", "production", 0.5).images == 1
    finally:
        store.close()


def test_a_database_restored_without_the_table_gets_it_back_after_one_failed_call(database: str) -> None:
    """A database recreated empty (restored from an older dump, a new instance behind the same
    name): the table was created once per process, so every call failed until a gateway restart."""
    import psycopg

    store = WorklistStore(PostgresWorklistDb(database))
    try:
        store.record("a", "1.2.3", ["r1"], [0.3], "7", "production", 0.5)
        with psycopg.connect(database, autocommit=True) as admin:
            admin.execute("DROP TABLE studies")
        with pytest.raises(WorklistUnavailable):  # this call learns the table is gone
            store.get("a", "1.2.3")
        assert store.record("a", "1.2.4", ["r2"], [0.3], "7", "production", 0.5).images == 1
        assert store.get("a", "1.2.3") is None  # what the old database held is gone with it
    finally:
        store.close()

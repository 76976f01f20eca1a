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

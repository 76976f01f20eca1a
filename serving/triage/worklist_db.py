"""Where the worklist's rows live: one SQLite file on one machine, PostgreSQL for a cluster's replicas.

Why two: on one machine the worklist sits beside the result journal in a SQLite file and needs no
server. In the cluster the gateway runs 2-12 replicas; a SQLite file per pod split the worklist
(each replica triaged only the studies it received, two images of one study on two replicas made
two rows and two SRs, and a scaled-in pod took its rows with it). There every replica shares one
PostgreSQL database (``CXR_WORKLIST_URL``), the cluster's own PostgreSQL.

Both backends offer the same three things to :class:`serving.triage.worklist.WorklistStore`: a
read, a write, and a transaction that holds one study's lock, so two images of one study merged
at once (two threads, or two replicas) cannot lose each other. SQL is written once with ``?``
placeholders (psycopg's are ``%s``; the worklist's SQL holds no other ``?`` or ``%``). Every
driver error comes out as :class:`serving.errors.WorklistUnavailable`: callers decide whether a
worklist that cannot be reached fails the request (``GET /v1/worklist``) or not (a detection).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Protocol

from serving.errors import WorklistUnavailable

log = logging.getLogger("cxr.worklist")

Row = Mapping[str, Any]
#: run one statement inside a transaction: (sql, params) -> the rows it returned
Execute = Callable[[str, Sequence[object]], list[Row]]

_COLUMNS = (
    "tenant {key} NOT NULL, study_uid {key} NOT NULL, score {real} NOT NULL, priority INTEGER NOT NULL, "
    "threshold {real} NOT NULL, result_ids {text} NOT NULL, model_version {text} NOT NULL, "
    "stage {text} NOT NULL, first_seen {real} NOT NULL, last_seen {real} NOT NULL, patient_key {text}, "
    "result_sops {text}, result_scores {text}, evicted_score {real}, PRIMARY KEY (tenant, study_uid)"
)
_INDEX = "CREATE INDEX IF NOT EXISTS studies_by_time ON studies (tenant, last_seen)"
#: columns a worklist of an older gateway lacks (SQLite only: the PostgreSQL table is newer)
_ADDED = (
    ("patient_key", "TEXT"),
    ("result_sops", "TEXT"),
    ("result_scores", "TEXT"),
    ("evicted_score", "REAL"),
)


class WorklistDb(Protocol):
    """What the worklist store needs of a database."""

    def query(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        """Rows of one read (autocommitted)."""
        ...

    def execute(self, sql: str, params: Sequence[object] = ()) -> int:
        """One write (autocommitted); the rows it touched."""
        ...

    def locked(self, key: str) -> AbstractContextManager[Execute]:
        """A transaction holding ``key``'s lock, yielding an :data:`Execute`."""
        ...

    def created(self) -> bool:
        """Whether the worklist exists yet (a purge of one never written touches nothing)."""
        ...

    def close(self) -> None:
        """Release connections (the gateway's shutdown)."""
        ...


class SqliteWorklistDb:
    """One SQLite file in WAL mode; safe from several threads (one connection per call)."""

    def __init__(self, path: Path) -> None:
        """Nothing is created until the first call, so building a gateway touches no disk."""
        self.path = path
        self._ready = False
        self._init_lock = threading.Lock()

    def _setup(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with sqlite3.connect(self.path, timeout=30) as setup:
            setup.execute("PRAGMA journal_mode=WAL")
            setup.execute(
                "CREATE TABLE IF NOT EXISTS studies ("
                + _COLUMNS.format(key="TEXT", text="TEXT", real="REAL")
                + ")"
            )
            setup.execute(_INDEX)
            columns = {row[1] for row in setup.execute("PRAGMA table_info(studies)")}
            for column, kind in _ADDED:  # a worklist of an older gateway: NULL = not known
                if column in columns:
                    continue
                try:
                    setup.execute(f"ALTER TABLE studies ADD COLUMN {column} {kind}")
                except sqlite3.OperationalError as exc:  # another process added it first
                    if "duplicate column" not in str(exc):
                        raise
        setup.close()

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """One connection per call (sqlite3 connections must not cross threads), closed after it."""
        try:
            if not self._ready:
                with self._init_lock:
                    if not self._ready:
                        self._setup()
                        self._ready = True
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        except (sqlite3.Error, OSError) as exc:
            raise WorklistUnavailable(f"the worklist file cannot be opened ({type(exc).__name__})") from exc
        conn.row_factory = sqlite3.Row
        try:
            yield conn
        except (sqlite3.Error, OSError) as exc:
            raise WorklistUnavailable(f"the worklist file failed ({type(exc).__name__}: {exc})") from exc
        finally:
            conn.close()

    def query(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        with self._connect() as conn:
            return list(conn.execute(sql, tuple(params)).fetchall())

    def execute(self, sql: str, params: Sequence[object] = ()) -> int:
        with self._connect() as conn:
            return int(conn.execute(sql, tuple(params)).rowcount)

    @contextmanager
    def locked(self, key: str) -> Iterator[Execute]:
        """``BEGIN IMMEDIATE`` takes the file's write lock: one merge at a time, whatever the study."""
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield lambda sql, params: _rows(conn.execute(sql, tuple(params)))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def created(self) -> bool:
        return self._ready or self.path.exists()

    def close(self) -> None:
        """Nothing held between calls."""


def _rows(cursor: Any) -> list[Row]:
    """A statement's rows; none for a write (psycopg refuses ``fetchall`` there, sqlite3 gives [])."""
    return list(cursor.fetchall()) if cursor.description else []


def _pg(sql: str) -> str:
    return sql.replace("?", "%s")


def _split_url(url: str) -> tuple[str, str | None]:
    """``url`` as a libpq connection string without its password, and the password (None: libpq's
    own sources, ``PGPASSWORD`` or a password file).

    Refused, without repeating it, when libpq cannot parse it or reads a host with an ``@`` in it:
    a password with an unencoded ``%`` or ``@``, which libpq's messages would then quote.
    """
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    refused = WorklistUnavailable(
        "CXR_WORKLIST_URL cannot be read as a PostgreSQL URL (its text is not repeated: it may hold "
        "a password; percent-encode the password's special characters, e.g. %40 for @, %25 for %)"
    )
    # raised outside the except block: the parser's message (quoting the part it could not read)
    # is not even kept as the refusal's context
    params: dict[str, Any] | None
    try:
        params = conninfo_to_dict(url)
    except psycopg.Error:
        params = None
    if params is None or any("@" in str(params.get(k) or "") for k in ("host", "hostaddr", "port", "dbname")):
        raise refused
    password = params.pop("password", None)
    return make_conninfo("", **params), None if password is None else str(password)


class Throttle(logging.Filter):
    """At most one record per message template every ``every_s`` seconds; the next says how many went.

    psycopg_pool's worker logs each failed reconnection (backing off from one second), in every
    replica, for as long as the database is down: the gateway's own ``worklist_db_error`` already
    says so once per failing window, so the pool's repeats only bury other lines.
    """

    def __init__(self, every_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.every_s = every_s
        self._clock = clock
        self._last: dict[str, float] = {}
        self._dropped: dict[str, int] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key, now = str(record.msg), self._clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.every_s:
                self._dropped[key] = self._dropped.get(key, 0) + 1
                return False
            self._last[key] = now
            dropped = self._dropped.pop(key, 0)
        if dropped:
            text = record.getMessage()
            record.msg, record.args = (
                "%s (%d like it in the last %ds not logged)",
                (text, dropped, round(self.every_s)),
            )
        return True


_POOL_LOG = Throttle()


class PostgresWorklistDb:
    """One PostgreSQL database shared by every gateway replica, through a small connection pool.

    The pool (psycopg_pool) opens on the first call, so building a gateway connects to nothing, and
    a database that is down costs a call at most ``timeout_s`` before :class:`WorklistUnavailable`.
    A merge holds a transaction-scoped advisory lock on the study (``pg_advisory_xact_lock`` of a
    64-bit hash of tenant and study UID): row locks cannot serialise two first images of one study,
    whose row does not exist yet. The table is created under a lock too, as every replica starts at
    once.

    Every wait is bounded by ``timeout_s``, on the server too: a lock (a replica frozen or cut off
    inside a merge keeps its study's lock), a statement, a transaction left idle by a client that
    vanished. A pooled connection is checked before it is lent, so the connections a restart or a
    failover killed cost no call. The password travels apart from the URL's text, which is parsed
    here: libpq's messages, which psycopg_pool's worker logs, quote a part of it they cannot parse.
    """

    def __init__(self, url: str, *, timeout_s: float = 5.0, max_connections: int = 8) -> None:
        self._conninfo, self._password = _split_url(url)
        self._timeout_s = timeout_s
        self._max = max_connections
        self._pool: Any = None
        self._lock = threading.Lock()
        self._ready = False
        self._closed = False
        self._down_until = 0.0
        # the pool's package now, not at the first detection: an image without it fails at start
        import psycopg_pool  # noqa: F401

        pool_log = logging.getLogger("psycopg.pool")
        if _POOL_LOG not in pool_log.filters:
            pool_log.addFilter(_POOL_LOG)

    def _configure(self, conn: Any) -> None:
        """Each new connection's server-side limits (milliseconds), before the pool lends it."""
        limit = str(max(1, round(self._timeout_s * 1000)))
        conn.execute(
            "SELECT set_config('lock_timeout', %s, false), set_config('statement_timeout', %s, false), "
            "set_config('idle_in_transaction_session_timeout', %s, false)",
            (limit, limit, limit),
        )

    def _connection(self) -> Any:
        from psycopg.rows import dict_row
        from psycopg_pool import ConnectionPool

        with self._lock:
            if self._closed:  # a thread still running at shutdown must not open a pool nobody closes
                raise WorklistUnavailable("the worklist is closed: the gateway is stopping")
            if self._pool is None:
                seconds = max(1, round(self._timeout_s))
                kwargs: dict[str, Any] = {
                    "autocommit": True,
                    "row_factory": dict_row,
                    "connect_timeout": seconds,
                    "application_name": "cxr-gateway-worklist",
                    # a server that vanished (no FIN: a node lost) is noticed, not waited for
                    "keepalives": 1,
                    "keepalives_idle": seconds,
                    "keepalives_interval": seconds,
                    "keepalives_count": 3,
                    "tcp_user_timeout": seconds * 4000,
                }
                if self._password is not None:
                    kwargs["password"] = self._password
                self._pool = ConnectionPool(
                    self._conninfo,
                    min_size=1,
                    max_size=self._max,
                    timeout=self._timeout_s,
                    open=False,
                    configure=self._configure,
                    check=ConnectionPool.check_connection,
                    kwargs=kwargs,
                )
                self._pool.open(wait=False)
        return self._pool.connection()

    @contextmanager
    def _connect(self) -> Iterator[Any]:
        import psycopg

        if time.monotonic() < self._down_until:
            raise WorklistUnavailable("the worklist database did not answer a moment ago; retry later")
        try:
            with self._connection() as conn:
                if not self._ready:
                    self._setup(conn)
                    self._ready = True
                yield conn
        except psycopg.Error as exc:
            if isinstance(exc, psycopg.errors.UndefinedTable):
                # a database recreated empty (restored, or a new instance behind the same name):
                # the table is made again on the next call, not only after a gateway restart
                self._ready = False
            if isinstance(exc, psycopg.OperationalError) and exc.sqlstate is None:
                # no connection (psycopg_pool's PoolTimeout among them): a database that is down
                # costs one wait, then fails fast for as long again: each detection asks the worklist
                # twice, and must not wait twice per request while it is down. Not so for an error
                # the server answered (a lock waited too long: it is up) or a value it cannot take
                # (a NUL in a hostile DICOM's study UID): one study's trouble is not every study's
                self._down_until = time.monotonic() + self._timeout_s
            # the detail (server, role, error; never the URL: it holds the password) goes to the
            # operator's log; the client learns only that the worklist is unavailable
            first = (str(exc).splitlines() or [""])[0]
            log.warning("worklist_db_error error_type=%s error=%s", type(exc).__name__, first)
            raise WorklistUnavailable(
                f"the worklist database cannot be used right now ({type(exc).__name__}); retry later"
            ) from exc

    @staticmethod
    def _setup(conn: Any) -> None:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtextextended('cxr-worklist-schema', 0))")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS studies ("
                # the keys compare byte by byte, as in SQLite: the listing's tie-break on study UID
                # is the same on both, not the server locale's (which ignores the dots)
                + _COLUMNS.format(key='TEXT COLLATE "C"', text="TEXT", real="DOUBLE PRECISION")
                + ")"
            )
            conn.execute(_INDEX)

    def query(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        with self._connect() as conn:
            return _rows(conn.execute(_pg(sql), tuple(params)))

    def execute(self, sql: str, params: Sequence[object] = ()) -> int:
        with self._connect() as conn:
            return int(conn.execute(_pg(sql), tuple(params)).rowcount)

    @contextmanager
    def locked(self, key: str) -> Iterator[Execute]:
        with self._connect() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (key,))
            yield lambda sql, params: _rows(conn.execute(_pg(sql), tuple(params)))

    def created(self) -> bool:
        return True  # a purge asks the server; the table may well exist already

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._pool is not None:
                self._pool.close()
                self._pool = None

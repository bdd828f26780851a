"""The job store on PostgreSQL (psycopg 3, ``pip install "sfumato[postgres]"``).

The same tables and behaviour as the SQLite store; what PostgreSQL adds is that
several front ends and workers, on any machines, may share it: a job is accepted
under a transaction-scoped advisory lock, so that no two front ends overfill the
queue, and claimed with ``FOR UPDATE SKIP LOCKED``, so that each job is claimed
once. New jobs and cancels are announced with ``NOTIFY`` (:meth:`PostgresJobStore.listen`);
progress and images go through the tables, since a notification holds about 8 KB.

A database that cannot be reached raises :class:`StoreUnavailableError` (the
routes answer 503) and is connected again by the next call. The URL may carry a
password; messages name the database by :func:`describe`, never with it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from sfumato.errors import SfumatoError
from sfumato.server.jobs.schema import SCHEMA, SCHEMA_VERSION, StoreVersionError, migrations
from sfumato.server.jobs.store import CANCEL_CHANNEL, WAKE_CHANNEL, JobStore, Row, StoreUnavailableError

if TYPE_CHECKING:
    import psycopg

logger = logging.getLogger("sfumato.server")

URL_SCHEMES = ("postgresql://", "postgres://")
ACCEPTED = (
    "postgresql://[user[:password]@][host][:port]/dbname[?param=value...] (or postgres://; a password is better "
    "kept in PGPASSFILE or the environment, SFUMATO_STORE), or no --store for SQLite in the --data folder"
)
QUEUE_LOCK = 0x5F_756D_6174  # the advisory lock key of the queue's writes ("sfumato"-ish)
CONNECT_TIMEOUT_S = 5
RETRY_S = 2.0
"""How often a listener tries a database it lost."""


class StoreSpecError(SfumatoError):
    """A ``--store`` value sfumato cannot use."""


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        raise StoreSpecError('--store: PostgreSQL needs psycopg 3: pip install "sfumato[postgres]"') from None
    return psycopg


def describe(url: str) -> str:
    """The database of ``url`` as messages name it: ``user@host:port/dbname``, no password.

    Raises
    ------
    StoreSpecError
        For a URL libpq cannot read, naming the accepted forms.
    """
    if not url.startswith(URL_SCHEMES):
        raise StoreSpecError(f"--store: {url.split('://')[0]!r} is not a store sfumato knows; use {ACCEPTED}")
    psycopg = _psycopg()
    try:
        parts = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        message = str(exc).replace(url, "<the URL>")
        raise StoreSpecError(f"--store: not a PostgreSQL URL libpq reads ({message}); use {ACCEPTED}") from None
    if not all(port.isdigit() for port in str(parts.get("port", "0")).split(",")):
        raise StoreSpecError(f"--store: the port {parts['port']!r} is not a number; use {ACCEPTED}")
    user = f"{parts['user']}@" if parts.get("user") else ""
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"postgresql://{user}{parts.get('host', '')}{port}/{parts.get('dbname', '')}"


class PostgresJobStore(JobStore):
    """Jobs in a PostgreSQL database, one connection per store (calls are serialized
    within a process; other processes share the database)."""

    shared = True

    def __init__(self, url: str, max_active: int) -> None:
        self.where = describe(url)
        self._psycopg = _psycopg()
        self._url = url
        self.max_active = max_active
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None
        try:
            with self._lock:
                self._connection()
        except StoreUnavailableError as exc:  # served as 503 until it can be reached
            logger.warning("%s; the server starts and connects again at the next request", exc)

    def _unavailable(self, exc: Exception) -> StoreUnavailableError:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        password = self._psycopg.conninfo.conninfo_to_dict(self._url).get("password")
        if password:
            detail = detail.replace(password, "***")
        return StoreUnavailableError(f"the job store's database {self.where} cannot be reached: {detail}")

    def _connection(self) -> psycopg.Connection[Any]:
        """The open connection; a new one (its schema checked) when there is none."""
        if self._conn is not None and not self._conn.closed and not self._conn.broken:
            return self._conn
        driver = self._psycopg
        try:
            conn: psycopg.Connection[Any] = driver.connect(
                self._url, autocommit=True, row_factory=driver.rows.dict_row, connect_timeout=CONNECT_TIMEOUT_S
            )
        except driver.OperationalError as exc:
            raise self._unavailable(exc) from None
        try:
            self._prepare(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def _prepare(self, conn: psycopg.Connection[Any]) -> None:
        """Create the tables, or check a database an earlier sfumato wrote."""
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (QUEUE_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS sfumato_schema (version INTEGER NOT NULL)")
            row = conn.execute("SELECT max(version) AS version FROM sfumato_schema").fetchone()
            version = row["version"] if row is not None else None
            if version is not None and version > SCHEMA_VERSION:
                raise StoreVersionError(
                    f"the job store {self.where} has schema version {version}, written by a later sfumato; "
                    f"this one reads versions up to {SCHEMA_VERSION}"
                )
            conn.execute(SCHEMA.format(real="DOUBLE PRECISION"))
            if version != SCHEMA_VERSION:
                for statement in migrations(version or 0, real="DOUBLE PRECISION", blob="BYTEA"):
                    conn.execute(statement)
                conn.execute("DELETE FROM sfumato_schema")
                conn.execute("INSERT INTO sfumato_schema (version) VALUES (%s)", (SCHEMA_VERSION,))

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    @contextmanager
    def _connected(self) -> Iterator[psycopg.Connection[Any]]:
        """The connection, under the lock; a lost database becomes :class:`StoreUnavailableError`."""
        with self._lock:
            conn = self._connection()
            try:
                yield conn
            except self._psycopg.OperationalError as exc:
                conn.close()
                raise self._unavailable(exc) from None

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> tuple[list[Row], int]:
        with self._connected() as conn:
            cursor = conn.execute(sql.replace("?", "%s"), tuple(params))
            return (cursor.fetchall() if cursor.description else []), cursor.rowcount

    @contextmanager
    def _transaction(self) -> Iterator[Callable[[str, Sequence[Any]], list[Row]]]:
        def run(sql: str, params: Sequence[Any]) -> list[Row]:
            cursor = conn.execute(sql.replace("?", "%s"), tuple(params))
            return cursor.fetchall() if cursor.description else []

        with self._connected() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (QUEUE_LOCK,))  # the queue's writes, one at a time
            yield run

    def _claim(self, where: str, params: Sequence[Any], assign: str, values: Sequence[Any]) -> Row | None:
        claim = (
            f"UPDATE jobs SET {assign} WHERE id = (SELECT id FROM jobs WHERE {where} ORDER BY created LIMIT 1 "
            "FOR UPDATE SKIP LOCKED) RETURNING *"
        ).replace("?", "%s")
        with self._connected() as conn:
            row: Row | None = conn.execute(claim, (*values, *params)).fetchone()
        return row

    def listen(
        self,
        heard: Callable[[str, str], None],
        stop: threading.Event,
        channels: Sequence[str] = (WAKE_CHANNEL, CANCEL_CHANNEL),
    ) -> None:
        """Call ``heard(channel, payload)`` for each notification of ``channels`` (by
        default: new jobs, :data:`WAKE_CHANNEL`, and jobs cancelled by request,
        :data:`CANCEL_CHANNEL`) until ``stop`` is set; on its own connection, connected
        again (with a log line) when the database is lost. Each (re)connection first
        calls ``heard(channel, "")`` for each channel: whatever was said while not
        listening. Blocks."""
        driver = self._psycopg
        down = False
        while not stop.is_set():
            try:
                with driver.connect(self._url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
                    for channel in channels:
                        conn.execute(f"LISTEN {channel}")
                    if down:
                        logger.warning("listening to %s again", self.where)
                        down = False
                    for channel in channels:  # whatever was announced while not listening
                        heard(channel, "")
                    while not stop.is_set():
                        for note in conn.notifies(timeout=1.0):
                            heard(note.channel, note.payload)
            except driver.OperationalError as exc:
                if not down:
                    logger.error("%s; listening again in %.0f s", self._unavailable(exc), RETRY_S)
                    down = True
                stop.wait(RETRY_S)

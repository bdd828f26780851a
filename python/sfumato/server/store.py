"""The durable job store: one SQLite file (the standard library's ``sqlite3``), or a
PostgreSQL database that several front ends share (:mod:`sfumato.server.store_pg`).

Every accepted job is written before its id is returned, and every change of
state is committed at once, so a restarted server finds its jobs as they were:
queued ones run, finished ones keep their results, and a job that was running
when the server stopped is queued again (it restarts from the beginning).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sfumato.errors import SfumatoError

JobState = Literal["queued", "processing", "done", "error", "cancelled"]
"""A job's state in the store; the first two are active, the rest final."""
QUEUED: JobState = "queued"
PROCESSING: JobState = "processing"
DONE: JobState = "done"
ERROR: JobState = "error"
CANCELLED: JobState = "cancelled"
ACTIVE = (QUEUED, PROCESSING)
FINAL = (DONE, ERROR, CANCELLED)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    request TEXT NOT NULL,
    state TEXT NOT NULL,
    progress {real} NOT NULL DEFAULT 0,
    phase TEXT NOT NULL DEFAULT 'queued',
    error TEXT,
    result TEXT,
    created {real} NOT NULL,
    started {real},
    finished {real}
);
CREATE INDEX IF NOT EXISTS jobs_state_created ON jobs (state, created);
CREATE TABLE IF NOT EXISTS options (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""
"""The tables of both stores: SQLite's ``REAL`` is PostgreSQL's ``DOUBLE PRECISION``."""

SCHEMA_VERSION = 2
"""The store's schema version (SQLite's ``PRAGMA user_version``, PostgreSQL's
``sfumato_schema`` table). 0 (or 1): written before stores had a version, with
untyped plans, which :class:`~sfumato.server.jobplan.JobPlan` reads as its
version 1; 2: typed plans that carry their own version. (The ``options`` table
came later within version 2: it is created when missing, and an older sfumato
ignores it.)"""


class StoreVersionError(SfumatoError):
    """A job store written by a later sfumato, whose jobs this one cannot promise to read."""


class QueueFullError(Exception):
    """The backlog holds as many active jobs as it may."""


class StoreUnavailableError(SfumatoError):
    """The store's database cannot be reached now (the HTTP routes answer 503); a
    later call tries again."""


class StoreInUseError(StoreUnavailableError):
    """Another server runs jobs from this database (one per database, for now)."""


@dataclass
class Job:
    """One row of the store.

    Attributes
    ----------
    id, kind:
        The job id (a UUID) and what runs it (``"txt2img"``, ``"img2img"``).
    request:
        The request as accepted (JSON-able), echoed back as ``payload``.
    state, progress, phase:
        ``queued`` / ``processing`` / ``done`` / ``error`` / ``cancelled``,
        0-100, and the phase name.
    error:
        Why it failed or was cancelled.
    result:
        What a finished job produced (output paths, sizes, times).
    """

    id: str
    kind: str
    request: dict[str, Any]
    state: JobState = QUEUED
    progress: float = 0.0
    phase: str = QUEUED
    error: str | None = None
    result: dict[str, Any] = field(default_factory=dict)
    created: float = 0.0
    started: float | None = None
    finished: float | None = None


def _job(row: Mapping[str, Any]) -> Job:
    return Job(
        id=row["id"],
        kind=row["kind"],
        request=json.loads(row["request"]),
        state=row["state"],
        progress=row["progress"],
        phase=row["phase"],
        error=row["error"],
        result=json.loads(row["result"]) if row["result"] else {},
        created=row["created"],
        started=row["started"],
        finished=row["finished"],
    )


Row = Mapping[str, Any]


class JobStore(ABC):
    """The durable queue, one behaviour on two databases (:class:`SqliteJobStore`,
    :class:`PostgresJobStore`), safe to use from several threads.

    The statements are written once, with ``?`` for parameters; each database runs
    them through :meth:`_rows` (one statement, committed) or :meth:`_transaction`.
    What differs is the lock a transaction holds (SQLite's write lock, a PostgreSQL
    advisory lock) and how a job is claimed, since front ends may share one
    PostgreSQL database.
    """

    max_active: int

    @abstractmethod
    def _rows(self, sql: str, params: Sequence[Any] = ()) -> tuple[list[Row], int]:
        """Run one statement on its own; its rows (when it returns some) and row count."""

    @abstractmethod
    def _transaction(self) -> AbstractContextManager[Callable[[str, Sequence[Any]], list[Row]]]:
        """A transaction that holds the queue's write lock: yields a ``run(sql, params)``."""

    @abstractmethod
    def close(self) -> None: ...

    def hold_exclusive(self) -> None:  # noqa: B027 - SQLite's file belongs to one machine's server
        """Make this store the only server's of its database, for as long as it is open.

        Raises
        ------
        StoreInUseError
            When another server holds it.
        """

    @abstractmethod
    def next_queued(self) -> Job | None:
        """The oldest queued job, marked processing (each job is claimed once)."""

    def recover(self) -> int:
        """Queue again the jobs that were running when the server stopped; returns how many."""
        return self._rows(
            "UPDATE jobs SET state = ?, phase = ?, progress = 0, started = NULL WHERE state = ?",
            (QUEUED, QUEUED, PROCESSING),
        )[1]

    def add(self, kind: str, request: dict[str, Any]) -> Job:
        """Accept a job.

        Raises
        ------
        QueueFullError
            When ``max_active`` jobs are queued or running already.
        """
        job = Job(id=str(uuid.uuid4()), kind=kind, request=request, created=time.time())
        with self._transaction() as run:
            [row] = run("SELECT COUNT(*) AS n FROM jobs WHERE state IN (?, ?)", ACTIVE)
            if row["n"] >= self.max_active:
                raise QueueFullError(
                    f"the queue is full: {row['n']} jobs are waiting or running, the limit is {self.max_active}"
                )
            run(
                "INSERT INTO jobs (id, kind, request, state, phase, created) VALUES (?, ?, ?, ?, ?, ?)",
                (job.id, kind, json.dumps(request), QUEUED, QUEUED, job.created),
            )
        return job

    def get(self, job_id: str) -> Job | None:
        rows = self._rows("SELECT * FROM jobs WHERE id = ?", (job_id,))[0]
        return _job(rows[0]) if rows else None

    def recent(self, limit: int) -> list[Job]:
        """The ``limit`` newest jobs, newest first."""
        return [_job(r) for r in self._rows("SELECT * FROM jobs ORDER BY created DESC LIMIT ?", (limit,))[0]]

    def options(self) -> dict[str, Any]:
        """The settings clients stored (A1111's ``POST /options``), as they wrote them."""
        return {row["key"]: json.loads(row["value"]) for row in self._rows("SELECT key, value FROM options")[0]}

    def set_options(self, values: dict[str, Any]) -> None:
        """Store settings (JSON values), replacing those of the same keys, in one transaction."""
        with self._transaction() as run:
            for key, value in values.items():
                run("INSERT INTO options (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = "
                    "excluded.value", (key, json.dumps(value)))  # fmt: skip

    def ids_of_kind(self, kind: str, *, since: float = 0.0, active: bool = False) -> list[str]:
        """The ids of the jobs of ``kind`` accepted after ``since`` (only the queued or
        running ones if ``active``), oldest first; reads no request."""
        states = ACTIVE if active else (*ACTIVE, *FINAL)
        marks = ", ".join("?" * len(states))
        query = f"SELECT id FROM jobs WHERE kind = ? AND created > ? AND state IN ({marks}) ORDER BY created"
        return [row["id"] for row in self._rows(query, (kind, since, *states))[0]]

    def counts_by_state(self) -> dict[str, int]:
        """How many jobs the store holds in each state (states with none are left out)."""
        return {
            row["state"]: int(row["n"]) for row in self._rows("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")[0]
        }

    def active_count(self) -> int:
        """How many jobs are queued or running."""
        [row] = self._rows("SELECT COUNT(*) AS n FROM jobs WHERE state IN (?, ?)", ACTIVE)[0]
        return int(row["n"])

    def progress(self, job_id: str, progress: float, phase: str) -> None:
        self._rows(
            "UPDATE jobs SET progress = ?, phase = ? WHERE id = ? AND state = ?", (progress, phase, job_id, PROCESSING)
        )

    def end(self, job_id: str, state: JobState, error: str | None = None, result: dict[str, Any] | None = None) -> bool:
        """Put an active job in a final state; returns whether it was still active."""
        assert state in FINAL, state
        return (
            self._rows(
                "UPDATE jobs SET state = ?, phase = ?, error = ?, result = ?, finished = ?,"
                " progress = CASE WHEN ? = 'done' THEN 100 ELSE progress END WHERE id = ? AND state IN (?, ?)",
                (state, state, error, json.dumps(result or {}), time.time(), state, job_id, *ACTIVE),
            )[1]
            == 1
        )

    def purge(self, older_than_s: float) -> list[Job]:
        """Delete the finished jobs older than ``older_than_s``; returns them (their files go too)."""
        cutoff = time.time() - older_than_s
        with self._transaction() as run:
            rows = run("SELECT * FROM jobs WHERE state IN (?, ?, ?) AND finished < ?", (*FINAL, cutoff))
            run("DELETE FROM jobs WHERE state IN (?, ?, ?) AND finished < ?", (*FINAL, cutoff))
        return [_job(r) for r in rows]


class SqliteJobStore(JobStore):
    """Jobs in one SQLite file (the standard library's ``sqlite3``): the embedded default."""

    def __init__(self, path: Path, max_active: int) -> None:
        self.path = path
        self.max_active = max_active
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            self._db.close()
            raise StoreVersionError(
                f"the job store {path} has schema version {version}, written by a later sfumato; "
                f"this one reads versions up to {SCHEMA_VERSION}"
            )
        self._db.executescript(_SCHEMA.format(real="REAL"))
        if version < SCHEMA_VERSION:
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> tuple[list[Row], int]:
        with self._lock:
            cursor = self._db.execute(sql, tuple(params))
            return cursor.fetchall(), cursor.rowcount

    @contextmanager
    def _transaction(self) -> Iterator[Callable[[str, Sequence[Any]], list[Row]]]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")  # the write lock: one writer across processes
            try:
                yield lambda sql, params: self._db.execute(sql, tuple(params)).fetchall()
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def next_queued(self) -> Job | None:
        with self._transaction() as run:
            rows = run("SELECT * FROM jobs WHERE state = ? ORDER BY created LIMIT 1", (QUEUED,))
            if not rows:
                return None
            started = time.time()
            run("UPDATE jobs SET state = ?, phase = ?, started = ? WHERE id = ?",
                (PROCESSING, "starting", started, rows[0]["id"]))  # fmt: skip
        job = _job(rows[0])
        job.state, job.phase, job.started = PROCESSING, "starting", started
        return job


def open_store(spec: str | None, sqlite_path: Path, max_active: int) -> JobStore:
    """The store ``--store`` names: a ``postgresql://`` URL, or (``None``) the SQLite file ``sqlite_path``.

    Raises
    ------
    StoreSpecError
        For a value that is neither, naming the flag and the accepted forms.
    StoreVersionError
        For a store a later sfumato wrote.
    """
    if not spec:
        return SqliteJobStore(sqlite_path, max_active)
    from sfumato.server.store_pg import PostgresJobStore

    return PostgresJobStore(spec, max_active)

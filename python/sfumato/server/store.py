"""The durable job store: one SQLite file (the standard library's ``sqlite3``).

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
    progress REAL NOT NULL DEFAULT 0,
    phase TEXT NOT NULL DEFAULT 'queued',
    error TEXT,
    result TEXT,
    created REAL NOT NULL,
    started REAL,
    finished REAL
);
CREATE INDEX IF NOT EXISTS jobs_state_created ON jobs (state, created);
CREATE TABLE IF NOT EXISTS options (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

SCHEMA_VERSION = 2
"""The store's ``PRAGMA user_version``. 0 (or 1): written before stores had a
version, with untyped plans, which :class:`~sfumato.server.jobplan.JobPlan` reads
as its version 1; 2: typed plans that carry their own version. (The ``options``
table came later within version 2: it is created when missing, and an older
sfumato ignores it.)"""


class StoreVersionError(SfumatoError):
    """A job store written by a later sfumato, whose jobs this one cannot promise to read."""


class QueueFullError(Exception):
    """The backlog holds as many active jobs as it may."""


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


def _job(row: sqlite3.Row) -> Job:
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


class JobStore:
    """Jobs in one SQLite file, safe to use from several threads."""

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
        self._db.executescript(_SCHEMA)
        if version < SCHEMA_VERSION:
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def recover(self) -> int:
        """Queue again the jobs that were running when the server stopped; returns how many."""
        with self._lock:
            cursor = self._db.execute(
                "UPDATE jobs SET state = ?, phase = ?, progress = 0, started = NULL WHERE state = ?",
                (QUEUED, QUEUED, PROCESSING),
            )
            return cursor.rowcount

    def add(self, kind: str, request: dict[str, Any]) -> Job:
        """Accept a job.

        Raises
        ------
        QueueFullError
            When ``max_active`` jobs are queued or running already.
        """
        job = Job(id=str(uuid.uuid4()), kind=kind, request=request, created=time.time())
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                (active,) = self._db.execute("SELECT COUNT(*) FROM jobs WHERE state IN (?, ?)", ACTIVE).fetchone()
                if active >= self.max_active:
                    raise QueueFullError(
                        f"the queue is full: {active} jobs are waiting or running, the limit is {self.max_active}"
                    )
                self._db.execute(
                    "INSERT INTO jobs (id, kind, request, state, phase, created) VALUES (?, ?, ?, ?, ?, ?)",
                    (job.id, kind, json.dumps(request), QUEUED, QUEUED, job.created),
                )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def recent(self, limit: int) -> list[Job]:
        """The ``limit`` newest jobs, newest first."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs ORDER BY created DESC LIMIT ?", (limit,)).fetchall()
        return [_job(r) for r in rows]

    def options(self) -> dict[str, Any]:
        """The settings clients stored (A1111's ``POST /options``), as they wrote them."""
        with self._lock:
            rows = self._db.execute("SELECT key, value FROM options").fetchall()
        return {row["key"]: json.loads(row["value"]) for row in rows}

    def set_options(self, values: dict[str, Any]) -> None:
        """Store settings (JSON values), replacing those of the same keys, in one transaction."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(
                "INSERT INTO options (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [(key, json.dumps(value)) for key, value in values.items()],
            )
            self._db.execute("COMMIT")

    def ids_of_kind(self, kind: str, *, since: float = 0.0, active: bool = False) -> list[str]:
        """The ids of the jobs of ``kind`` accepted after ``since`` (only the queued or
        running ones if ``active``), oldest first; reads no request."""
        states = ACTIVE if active else (*ACTIVE, *FINAL)
        marks = ", ".join("?" * len(states))
        query = f"SELECT id FROM jobs WHERE kind = ? AND created > ? AND state IN ({marks}) ORDER BY created"
        with self._lock:
            return [row["id"] for row in self._db.execute(query, (kind, since, *states)).fetchall()]

    def active_count(self) -> int:
        """How many jobs are queued or running."""
        with self._lock:
            (count,) = self._db.execute("SELECT COUNT(*) FROM jobs WHERE state IN (?, ?)", ACTIVE).fetchone()
        return int(count)

    def next_queued(self) -> Job | None:
        """The oldest queued job, marked processing."""
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE state = ? ORDER BY created LIMIT 1", (QUEUED,)).fetchone()
            if row is None:
                return None
            self._db.execute(
                "UPDATE jobs SET state = ?, phase = ?, started = ? WHERE id = ?",
                (PROCESSING, "starting", time.time(), row["id"]),
            )
        job = _job(row)
        job.state = PROCESSING
        return job

    def progress(self, job_id: str, progress: float, phase: str) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET progress = ?, phase = ? WHERE id = ? AND state = ?",
                (progress, phase, job_id, PROCESSING),
            )

    def end(self, job_id: str, state: JobState, error: str | None = None, result: dict[str, Any] | None = None) -> bool:
        """Put an active job in a final state; returns whether it was still active."""
        assert state in FINAL, state
        with self._lock:
            cursor = self._db.execute(
                "UPDATE jobs SET state = ?, phase = ?, error = ?, result = ?, finished = ?,"
                " progress = CASE WHEN ? = 'done' THEN 100 ELSE progress END"
                " WHERE id = ? AND state IN (?, ?)",
                (state, state, error, json.dumps(result or {}), time.time(), state, job_id, *ACTIVE),
            )
            return cursor.rowcount == 1

    def purge(self, older_than_s: float) -> list[Job]:
        """Delete the finished jobs older than ``older_than_s``; returns them (their files go too)."""
        cutoff = time.time() - older_than_s
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM jobs WHERE state IN (?, ?, ?) AND finished < ?", (*FINAL, cutoff)
            ).fetchall()
            self._db.execute("DELETE FROM jobs WHERE state IN (?, ?, ?) AND finished < ?", (*FINAL, cutoff))
        return [_job(r) for r in rows]

"""The job store in one SQLite file (the standard library's ``sqlite3``): the embedded default."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sfumato.server.jobs.schema import SCHEMA, SCHEMA_VERSION, StoreVersionError, migrations
from sfumato.server.jobs.store import JobStore, Row


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
        self._db.executescript(SCHEMA.format(real="REAL"))
        if version < SCHEMA_VERSION:
            self._db.execute("BEGIN IMMEDIATE")  # another process may be migrating it too
            try:
                (version,) = self._db.execute("PRAGMA user_version").fetchone()
                for statement in migrations(version, real="REAL", blob="BLOB"):
                    self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
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

    def _claim(self, where: str, params: Sequence[Any], assign: str, values: Sequence[Any]) -> Row | None:
        with self._transaction() as run:  # the write lock: no other process claims meanwhile
            rows = run(f"SELECT id FROM jobs WHERE {where} ORDER BY created LIMIT 1", params)
            if not rows:
                return None
            run(f"UPDATE jobs SET {assign} WHERE id = ?", (*values, rows[0]["id"]))
            return run("SELECT * FROM jobs WHERE id = ?", (rows[0]["id"],))[0]

    def recover(self) -> int:
        """Queue again every job that was running: the file belongs to one machine's
        server, and no other worker runs its jobs."""
        return self.expire(everything=True)[0]

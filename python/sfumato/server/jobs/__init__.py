"""The jobs wing: the stored plan of a job, the job stores, the runner that turns
plans into engine calls, and the farm's worker process."""

from __future__ import annotations

from pathlib import Path

from sfumato.server.jobs.store import JobStore
from sfumato.server.jobs.store_sqlite import SqliteJobStore


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
    from sfumato.server.jobs.store_pg import PostgresJobStore

    return PostgresJobStore(spec, max_active)

"""The job store's tables, shared by SQLite and PostgreSQL, and the migrations from
each schema version to the next."""

from __future__ import annotations

from sfumato.errors import SfumatoError

SCHEMA = """
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
"""The tables of both stores as version 2 had them: SQLite's ``REAL`` is
PostgreSQL's ``DOUBLE PRECISION``, its ``BLOB`` PostgreSQL's ``BYTEA``."""

MIGRATIONS: dict[int, tuple[str, ...]] = {
    3: (
        "ALTER TABLE jobs ADD COLUMN model TEXT",
        "ALTER TABLE jobs ADD COLUMN worker TEXT",
        "ALTER TABLE jobs ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE jobs ADD COLUMN lease_until {real}",
        "ALTER TABLE jobs ADD COLUMN owner TEXT",
        "ALTER TABLE jobs ADD COLUMN identity TEXT",
        "ALTER TABLE jobs ADD COLUMN step INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE jobs ADD COLUMN steps INTEGER NOT NULL DEFAULT 0",
        "CREATE INDEX IF NOT EXISTS jobs_worker ON jobs (worker)",
        """CREATE TABLE IF NOT EXISTS workers (
            id TEXT PRIMARY KEY,
            host TEXT NOT NULL,
            pid INTEGER NOT NULL,
            started {real} NOT NULL,
            last_seen {real} NOT NULL,
            running INTEGER NOT NULL DEFAULT 0,
            slots INTEGER NOT NULL DEFAULT 1,
            note TEXT
        )""",
        """CREATE TABLE IF NOT EXISTS worker_models (
            worker TEXT NOT NULL,
            model TEXT NOT NULL,
            identity TEXT,
            loaded INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (worker, model)
        )""",
        """CREATE TABLE IF NOT EXISTS images (
            job_id TEXT NOT NULL,
            idx INTEGER NOT NULL,
            data {blob} NOT NULL,
            PRIMARY KEY (job_id, idx)
        )""",
        """CREATE TABLE IF NOT EXISTS previews (
            job_id TEXT PRIMARY KEY,
            serial INTEGER NOT NULL,
            step INTEGER NOT NULL,
            steps INTEGER NOT NULL,
            png {blob} NOT NULL
        )""",
    ),
    4: (
        "ALTER TABLE workers ADD COLUMN left_at {real}",
        "ALTER TABLE workers ADD COLUMN holdings TEXT",
        "ALTER TABLE worker_models ADD COLUMN facts TEXT",
        "ALTER TABLE worker_models ADD COLUMN auxiliary INTEGER NOT NULL DEFAULT 0",
        """CREATE TABLE IF NOT EXISTS job_files (
            job_id TEXT NOT NULL,
            file TEXT NOT NULL,
            identity TEXT,
            PRIMARY KEY (job_id, file)
        )""",
        """CREATE TABLE IF NOT EXISTS uploads (
            name TEXT PRIMARY KEY,
            data {blob} NOT NULL,
            created {real} NOT NULL
        )""",
    ),
}
"""What each schema version adds to the one before, applied in order to an older
store (and to a new one, after :data:`SCHEMA`)."""

SCHEMA_VERSION = max(MIGRATIONS)
"""The store's schema version (SQLite's ``PRAGMA user_version``, PostgreSQL's
``sfumato_schema`` table). 0 (or 1): written before stores had a version, with
untyped plans, which :class:`~sfumato.server.jobs.plan.JobPlan` reads as its
version 1; 2: typed plans that carry their own version (the ``options`` table
came later within it: it is created when missing); 3: workers, leases, attempts,
the sampling step, and the images and latest previews in the store; 4: what each
worker holds beyond its models (LoRAs, VAEs, ControlNets, embeddings) with the facts a
front end validates requests by, workers that left (remembered, not live), the
files each job needs, and the images clients upload (ComfyUI's ``/upload/image``)."""


def migrations(version: int, real: str, blob: str) -> list[str]:
    """The statements that bring a store of ``version`` to :data:`SCHEMA_VERSION`."""
    return [
        statement.format(real=real, blob=blob)
        for target in sorted(MIGRATIONS)
        if target > version
        for statement in MIGRATIONS[target]
    ]


class StoreVersionError(SfumatoError):
    """A job store written by a later sfumato, whose jobs this one cannot promise to read."""

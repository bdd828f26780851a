"""The durable job store: what every store does, over SQL that one SQLite file
(:mod:`sfumato.server.jobs.store_sqlite`) or a PostgreSQL database that several front
ends and workers share (:mod:`sfumato.server.jobs.store_pg`) runs.

Every accepted job is written before its id is returned, and every change of
state is committed at once, so a restarted server finds its jobs as they were:
queued ones run, finished ones keep their results and images, and a job that was
running when its worker stopped is queued again (it restarts from the beginning).

Workers claim jobs under a lease (:meth:`JobStore.claim`) that their heartbeat
renews; a job whose lease runs out goes back to the queue with one more attempt
(:meth:`JobStore.expire`), and a worker's progress and result count only while
its claim (worker id and attempt) still owns the job, so a late result from a
worker presumed dead is refused.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
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

LEASE_S = 30.0
"""How long a claim holds a job without its worker's heartbeat (which renews it every third of that)."""
MAX_ATTEMPTS = 3
"""How many workers may lose a job before it fails as lost."""
CLAIM_DELAY_S = 1.5
"""How long a job waits for a worker that has its model loaded before one that would load it may claim it."""
FORGET_AFTER_S = 24 * 3600.0
"""When a worker unseen for so long leaves the registry."""
WAKE_CHANNEL = "sfumato_jobs"
"""The ``NOTIFY`` channel of new (and requeued) jobs; the payload names the job's model."""
CANCEL_CHANNEL = "sfumato_cancel"
"""The ``NOTIFY`` channel of jobs cancelled by request; the payload is the job id."""
JOB_CHANNEL = "sfumato_job"
"""The ``NOTIFY`` channel of changes of a job (accepted, claimed, progress, preview,
ended, queued again); the payload is the job id. Front ends wake its followers."""
WORKERS_CHANNEL = "sfumato_workers"
"""The ``NOTIFY`` channel of changes in what workers hold; the payload is the worker id."""
_LIVE = "last_seen > ? AND left_at IS NULL"
"""The condition (and its parameter, the oldest last heartbeat) of a live worker's row."""
_REQUEUE = "state = ?, phase = ?, progress = 0, started = NULL, worker = NULL, lease_until = NULL"


class QueueFullError(Exception):
    """The backlog holds as many active jobs as it may."""


class StoreUnavailableError(SfumatoError):
    """The store's database cannot be reached now (the HTTP routes answer 503); a
    later call tries again."""


@dataclass(frozen=True)
class Preview:
    """A running job's latest preview: its ``serial`` (1, 2, ...), the sampling step and the PNG."""

    job_id: str
    serial: int
    step: int
    total_steps: int
    png: bytes


@dataclass(frozen=True)
class Claim:
    """Who holds a running job: its worker and the attempt (the job's ``attempts`` at the
    claim). A write fenced by a claim changes the job only while that claim owns it."""

    worker: str
    attempt: int


@dataclass(frozen=True)
class WorkerInfo:
    """A worker as it registered: where it runs, the models it can serve (by catalog
    name; an upscaler as ``upscaler:NAME``), the other ``files`` jobs may name
    (``lora:NAME``, ``vae:NAME``, ``control_net:NAME``, ``embedding:NAME``), the
    ``identities`` of both (sha256, on a shared store), the models it has loaded, and
    its load."""

    id: str
    host: str
    pid: int
    started: float
    last_seen: float
    running: int
    slots: int
    models: tuple[str, ...]
    loaded: tuple[str, ...]
    note: str | None = None
    identities: Mapping[str, str] = field(default_factory=dict)
    files: tuple[str, ...] = ()


@dataclass(frozen=True)
class Holding:
    """One thing a worker registered: a model or upscaler (its catalog route) or, when
    ``auxiliary``, a file a job names beside its model (``lora:NAME``, ``vae:NAME``, ...),
    with its sha256 and the ``facts`` a front end without the file validates requests by.
    ``live``: whether its worker is live now (else it left or stopped answering, and is
    remembered until :data:`FORGET_AFTER_S`)."""

    worker: str
    key: str
    identity: str | None
    facts: Mapping[str, Any]
    auxiliary: bool
    live: bool
    last_seen: float


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
    model, identity:
        The catalog name of the model it runs, which routes it to the workers
        that serve it (``None``: any worker), and the sha256 of the file the
        front end that accepted it has under that name (``None``: any).
    worker, attempts, lease_until:
        The worker holding it (while it runs), how many times it was claimed,
        and until when the claim holds without a heartbeat.
    owner:
        Who sent it, for the routes that name no job (A1111's ``progress`` and ``interrupt``).
    step, steps:
        The sampling step it is at, of how many (0 outside sampling).
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
    model: str | None = None
    worker: str | None = None
    attempts: int = 0
    lease_until: float | None = None
    owner: str | None = None
    identity: str | None = None
    step: int = 0
    steps: int = 0

    @property
    def claim(self) -> Claim:
        """The claim of a job just claimed."""
        assert self.worker is not None, self.id
        return Claim(self.worker, self.attempts)


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
        model=row["model"],
        worker=row["worker"],
        attempts=row["attempts"],
        lease_until=row["lease_until"],
        owner=row["owner"],
        identity=row["identity"],
        step=row["step"],
        steps=row["steps"],
    )


def _fence(claim: Claim | None) -> tuple[str, tuple[Any, ...]]:
    """The condition (and its parameters) under which a write by ``claim`` counts."""
    return (" AND worker = ? AND attempts = ?", (claim.worker, claim.attempt)) if claim else ("", ())


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

    shared = False
    """Whether processes on several machines share the store; its database then tells
    them of new jobs and cancels (PostgreSQL's ``NOTIFY``)."""

    changed: Callable[[str], None] | None = None
    """Called with a job's id after each change of it this process writes (the front
    end of the same process wakes its followers; other processes hear :data:`JOB_CHANNEL`)."""

    def _notify(self, run: Callable[[str, Sequence[Any]], list[Row]], channel: str, payload: str) -> None:
        if self.shared:  # delivered when the transaction commits
            run("SELECT pg_notify(?, ?)", (channel, payload))

    def _changed(self, *job_ids: str) -> None:
        """Say that jobs changed: to this process, and (a shared store) to every front end."""
        for job_id in job_ids:
            if self.shared:
                try:
                    self._rows("SELECT pg_notify(?, ?)", (JOB_CHANNEL, job_id))
                except StoreUnavailableError:
                    pass  # the write before it counted; followers see it at their next look
            if self.changed is not None:
                self.changed(job_id)

    @abstractmethod
    def _claim(self, where: str, params: Sequence[Any], assign: str, values: Sequence[Any]) -> Row | None:
        """Set ``assign`` on the oldest job matching ``where``, claimed by no one else; its row after."""

    def claim(
        self,
        worker: str,
        models: Collection[str] | None = None,
        loaded: Collection[str] = (),
        lease_s: float = LEASE_S,
    ) -> Job | None:
        """The oldest queued job ``worker`` can run, marked processing under its lease
        (each job is claimed once). ``models``: the models it serves (``None``: any);
        a job for one of them it has not ``loaded`` waits :data:`CLAIM_DELAY_S` when
        another live worker has that model loaded, which then gets it first. A job that
        names its model's identity goes only to a worker that registered that identity, and
        a job that names other files (a LoRA, a VAE, ...) only to a worker that registered
        each of them (the same file, when the job names its sha256)."""
        now = time.time()
        where, params = "state = ?", list[Any]([QUEUED])
        if models is not None:
            marks = ", ".join("?" * len(models))
            where += f" AND (model IS NULL OR model IN ({marks}))" if models else " AND model IS NULL"
            params += list(models)
        held = ", ".join("?" * len(loaded))
        where += (
            f" AND (model IS NULL{f' OR model IN ({held})' if loaded else ''} OR created < ? OR NOT EXISTS ("
            "SELECT 1 FROM worker_models m JOIN workers w ON w.id = m.worker"
            " WHERE m.model = jobs.model AND m.loaded = 1 AND w.id <> ? AND w.last_seen > ? AND w.left_at IS NULL))"
        )
        params += [*loaded, now - CLAIM_DELAY_S, worker, now - lease_s]
        where += (  # the same file as the front end's that accepted it, not only the same name
            " AND (identity IS NULL OR EXISTS (SELECT 1 FROM worker_models i"
            " WHERE i.worker = ? AND i.model = jobs.model AND i.identity = jobs.identity))"
        )
        params.append(worker)
        where += (  # every other file the job names, held by this worker (the same file, when hashed)
            " AND NOT EXISTS (SELECT 1 FROM job_files f WHERE f.job_id = jobs.id AND NOT EXISTS (SELECT 1 FROM"
            " worker_models h WHERE h.worker = ? AND h.model = f.file AND (f.identity IS NULL OR h.identity ="
            " f.identity)))"
        )
        params.append(worker)
        assign = "state = ?, phase = ?, started = ?, worker = ?, attempts = attempts + 1, lease_until = ?"
        row = self._claim(where, params, assign, (PROCESSING, "starting", now, worker, now + lease_s))
        if row is None:
            return None
        self._changed(row["id"])
        return _job(row)

    def heartbeat(
        self,
        worker: WorkerInfo,
        lease_s: float = LEASE_S,
        holding: Collection[str] = (),
        facts: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> set[str]:
        """Register ``worker`` (or renew its registration), with the ``facts`` of what it
        holds by key, and the leases of the jobs it is ``holding`` (running now); returns
        those it still holds (a job cancelled or taken from it is no longer among them).
        A job it claimed but no longer runs (it lost the store meanwhile) is left to its
        lease's end. What it holds is written again only when it changed."""
        now = time.time()
        mine = ", ".join("?" * len(holding)) or "NULL"
        known = facts or {}
        keys = [(key, False) for key in worker.models] + [(key, True) for key in worker.files]
        entries = [
            (key, worker.identities.get(key), json.dumps(known.get(key, {}), sort_keys=True), aux, key in worker.loaded)
            for key, aux in keys
        ]
        digest = hashlib.sha256(json.dumps(entries).encode()).hexdigest()
        with self._transaction() as run:
            before = run("SELECT holdings FROM workers WHERE id = ?", (worker.id,))
            run("DELETE FROM workers WHERE id = ?", (worker.id,))
            run(
                "INSERT INTO workers (id, host, pid, started, last_seen, running, slots, note, holdings) VALUES "
                "(?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    worker.id, worker.host, worker.pid, worker.started, now, worker.running, worker.slots, worker.note,
                    digest,
                ),
            )  # fmt: skip
            if not before or before[0]["holdings"] != digest:
                run("DELETE FROM worker_models WHERE worker = ?", (worker.id,))
                for key, identity, text, aux, loaded in entries:
                    run(
                        "INSERT INTO worker_models (worker, model, identity, loaded, facts, auxiliary) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        (worker.id, key, identity, int(loaded), text, int(aux)),
                    )
                self._notify(run, WORKERS_CHANNEL, worker.id)
            held = f"worker = ? AND state = ? AND id IN ({mine})"
            run(f"UPDATE jobs SET lease_until = ? WHERE {held}", (now + lease_s, worker.id, PROCESSING, *holding))
            rows = run(f"SELECT id FROM jobs WHERE {held}", (worker.id, PROCESSING, *holding))
        return {row["id"] for row in rows}

    def unregister(self, worker: str) -> int:
        """A worker that stops: its running jobs go back to the queue (not counted as
        lost attempts) and it leaves the live workers; what it held is remembered (a
        front end then says which worker had a file no live worker holds) until
        :data:`FORGET_AFTER_S`. Returns how many jobs it gave back."""
        with self._transaction() as run:
            rows = run("SELECT id FROM jobs WHERE worker = ? AND state = ?", (worker, PROCESSING))
            run(
                f"UPDATE jobs SET {_REQUEUE}, attempts = attempts - 1 WHERE worker = ? AND state = ?",
                (QUEUED, QUEUED, worker, PROCESSING),
            )
            run("UPDATE worker_models SET loaded = 0 WHERE worker = ?", (worker,))
            run("UPDATE workers SET left_at = ?, running = 0 WHERE id = ?", (time.time(), worker))
            self._notify(run, WORKERS_CHANNEL, worker)
            if rows:
                self._notify(run, WAKE_CHANNEL, "")
        self._changed(*(row["id"] for row in rows))
        return len(rows)

    def workers(self, lease_s: float = LEASE_S) -> list[WorkerInfo]:
        """The live workers (seen within a lease), oldest first, with their models."""
        rows = self._rows(f"SELECT * FROM workers WHERE {_LIVE} ORDER BY started, id", (time.time() - lease_s,))[0]
        models: dict[str, list[Row]] = {}
        for row in self._rows("SELECT worker, model, identity, loaded, auxiliary FROM worker_models ORDER BY model")[0]:
            models.setdefault(row["worker"], []).append(row)
        return [
            WorkerInfo(
                id=row["id"],
                host=row["host"],
                pid=row["pid"],
                started=row["started"],
                last_seen=row["last_seen"],
                running=row["running"],
                slots=row["slots"],
                note=row["note"],
                models=tuple(m["model"] for m in models.get(row["id"], []) if not m["auxiliary"]),
                files=tuple(m["model"] for m in models.get(row["id"], []) if m["auxiliary"]),
                loaded=tuple(m["model"] for m in models.get(row["id"], []) if m["loaded"]),
                identities={m["model"]: m["identity"] for m in models.get(row["id"], []) if m["identity"]},
            )
            for row in rows
        ]

    def holdings(self, lease_s: float = LEASE_S) -> list[Holding]:
        """Everything the registered workers hold, live or remembered: the live workers'
        first, each worker's in the order it started."""
        now = time.time()
        rows = self._rows(
            "SELECT m.worker, m.model, m.identity, m.facts, m.auxiliary, w.last_seen, w.left_at FROM worker_models m"
            " JOIN workers w ON w.id = m.worker ORDER BY w.started, w.id, m.model"
        )[0]
        found = [
            Holding(
                worker=row["worker"],
                key=row["model"],
                identity=row["identity"],
                facts=json.loads(row["facts"]) if row["facts"] else {},
                auxiliary=bool(row["auxiliary"]),
                live=row["left_at"] is None and row["last_seen"] > now - lease_s,
                last_seen=row["left_at"] if row["left_at"] is not None else row["last_seen"],
            )
            for row in rows
        ]
        return sorted(found, key=lambda h: not h.live)

    def expire(self, everything: bool = False) -> tuple[int, int]:
        """Jobs whose lease ran out (``everything``: every running job) go back to the
        queue, or fail as lost past :data:`MAX_ATTEMPTS`; returns (queued again, failed)."""
        now = time.time()
        lapsed = "state = ?" if everything else "state = ? AND (lease_until IS NULL OR lease_until < ?)"
        params: tuple[Any, ...] = (PROCESSING,) if everything else (PROCESSING, now)
        with self._transaction() as run:
            again = run(f"SELECT id FROM jobs WHERE {lapsed} AND attempts < ?", (*params, MAX_ATTEMPTS))
            lost = run(f"SELECT id FROM jobs WHERE {lapsed} AND attempts >= ?", (*params, MAX_ATTEMPTS))
            run(f"UPDATE jobs SET {_REQUEUE} WHERE {lapsed} AND attempts < ?", (QUEUED, QUEUED, *params, MAX_ATTEMPTS))
            run(
                f"UPDATE jobs SET state = ?, phase = ?, error = ?, finished = ?, lease_until = NULL WHERE {lapsed} "
                "AND attempts >= ?",
                (
                    ERROR,
                    ERROR,
                    f"worker lost: the workers running this job stopped answering {MAX_ATTEMPTS} times",
                    now,
                    *params,
                    MAX_ATTEMPTS,
                ),
            )
            run(
                "DELETE FROM worker_models WHERE worker IN (SELECT id FROM workers WHERE last_seen < ?)",
                (now - FORGET_AFTER_S,),
            )
            run("DELETE FROM workers WHERE last_seen < ?", (now - FORGET_AFTER_S,))
            if again:
                self._notify(run, WAKE_CHANNEL, "")
        self._changed(*(row["id"] for row in [*again, *lost]))
        return len(again), len(lost)

    def recover(self) -> int:
        """At a server's start: queue again the jobs whose workers were lost (their
        leases ran out), never those a live worker holds; returns how many."""
        return self.expire()[0]

    def add(
        self,
        kind: str,
        request: dict[str, Any],
        model: str | None = None,
        owner: str | None = None,
        identity: str | None = None,
        files: Mapping[str, str | None] | None = None,
    ) -> Job:
        """Accept a job for ``model`` (the workers that serve it run it; ``None``: any),
        that file of it when ``identity`` names it (its sha256), sent by ``owner``;
        ``files``: the other files it names (``lora:NAME`` -> sha256 or ``None``), which
        its worker must hold too.

        Raises
        ------
        QueueFullError
            When ``max_active`` jobs are queued or running already.
        """
        job = Job(
            id=str(uuid.uuid4()),
            kind=kind,
            request=request,
            created=time.time(),
            model=model,
            owner=owner,
            identity=identity,
        )
        with self._transaction() as run:
            [row] = run("SELECT COUNT(*) AS n FROM jobs WHERE state IN (?, ?)", ACTIVE)
            if row["n"] >= self.max_active:
                raise QueueFullError(
                    f"the queue is full: {row['n']} jobs are waiting or running, the limit is {self.max_active}"
                )
            run(
                "INSERT INTO jobs (id, kind, request, state, phase, created, model, owner, identity)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job.id, kind, json.dumps(request), QUEUED, QUEUED, job.created, model, owner, identity),
            )
            for file, sha in (files or {}).items():
                run("INSERT INTO job_files (job_id, file, identity) VALUES (?, ?, ?)", (job.id, file, sha))
            self._notify(run, WAKE_CHANNEL, model or "")
        self._changed(job.id)
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
                run(
                    "INSERT INTO options (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = "
                    "excluded.value",
                    (key, json.dumps(value)),
                )

    def ids_of_kind(self, kind: str, *, since: float = 0.0, active: bool = False) -> list[str]:
        """The ids of the jobs of ``kind`` accepted after ``since`` (only the queued or
        running ones if ``active``), oldest first; reads no request."""
        states = ACTIVE if active else (*ACTIVE, *FINAL)
        marks = ", ".join("?" * len(states))
        query = f"SELECT id FROM jobs WHERE kind = ? AND created > ? AND state IN ({marks}) ORDER BY created"
        return [row["id"] for row in self._rows(query, (kind, since, *states))[0]]

    def active_of(self, owner: str) -> list[Job]:
        """The queued and running jobs ``owner`` sent: the running ones first, then oldest first."""
        rows = self._rows(
            "SELECT * FROM jobs WHERE owner = ? AND state IN (?, ?) ORDER BY CASE WHEN state = ? THEN 0 ELSE 1 END, "
            "created",
            (owner, *ACTIVE, PROCESSING),
        )[0]
        return [_job(row) for row in rows]

    def counts_by_state(self) -> dict[str, int]:
        """How many jobs the store holds in each state (states with none are left out)."""
        return {
            row["state"]: int(row["n"]) for row in self._rows("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")[0]
        }

    def active_count(self) -> int:
        """How many jobs are queued or running."""
        [row] = self._rows("SELECT COUNT(*) AS n FROM jobs WHERE state IN (?, ?)", ACTIVE)[0]
        return int(row["n"])

    def progress(
        self, job_id: str, progress: float, phase: str, claim: Claim | None = None, step: int = 0, steps: int = 0
    ) -> bool:
        """Record a running job's progress (and sampling ``step`` of ``steps``); returns whether
        it counted (``claim``: only while that claim owns the job, so ``False`` tells its
        worker to stop)."""
        fence, owner = _fence(claim)
        counted = (
            self._rows(
                f"UPDATE jobs SET progress = ?, phase = ?, step = ?, steps = ? WHERE id = ? AND state = ?{fence}",
                (progress, phase, step, steps, job_id, PROCESSING, *owner),
            )[1]
            == 1
        )
        if counted:
            self._changed(job_id)
        return counted

    def put_preview(self, preview: Preview) -> None:
        """Keep a running job's latest preview, for the front ends of other machines."""
        self._rows(
            "INSERT INTO previews (job_id, serial, step, steps, png) VALUES (?, ?, ?, ?, ?) ON CONFLICT (job_id) DO "
            "UPDATE SET serial = excluded.serial, step = excluded.step, steps = excluded.steps, png = excluded.png",
            (preview.job_id, preview.serial, preview.step, preview.total_steps, preview.png),
        )
        self._changed(preview.job_id)

    def preview(self, job_id: str) -> Preview | None:
        """A job's latest preview (kept until retention removes the job)."""
        rows = self._rows("SELECT * FROM previews WHERE job_id = ?", (job_id,))[0]
        if not rows:
            return None
        row = rows[0]
        return Preview(job_id, row["serial"], row["step"], row["steps"], bytes(row["png"]))

    def end(
        self,
        job_id: str,
        state: JobState,
        error: str | None = None,
        result: dict[str, Any] | None = None,
        claim: Claim | None = None,
        images: Sequence[bytes] = (),
    ) -> bool:
        """Put an active job in a final state, with its ``images``; returns whether it was
        still active. A worker's end (with its ``claim``) counts only while the claim owns
        the job; its end of a job cancelled by request keeps the images it finished."""
        assert state in FINAL, state
        fence, owner = _fence(claim)
        states = (*ACTIVE, CANCELLED) if claim is not None and state == CANCELLED else ACTIVE
        marks = ", ".join("?" * len(states))
        with self._transaction() as run:
            which = f"id = ? AND state IN ({marks}){fence}"
            ended = run(f"SELECT id FROM jobs WHERE {which}", (job_id, *states, *owner))
            # A cancel by request leaves the running job's lease: until its worker's own end
            # (with the images it finished) clears it, or the lease runs out, more may come.
            lease = ", lease_until = NULL" if claim is not None else ""
            run(
                f"UPDATE jobs SET state = ?, phase = ?, error = ?, result = ?, finished = ?{lease},"
                f" progress = CASE WHEN ? = 'done' THEN 100 ELSE progress END WHERE {which}",
                (state, state, error, json.dumps(result or {}), time.time(), state, job_id, *states, *owner),
            )
            if ended:
                for i, data in enumerate(images):
                    run("INSERT INTO images (job_id, idx, data) VALUES (?, ?, ?)", (job_id, i, data))
                if claim is None and state == CANCELLED:
                    self._notify(run, CANCEL_CHANNEL, job_id)
        if ended:
            self._changed(job_id)
        return bool(ended)

    def put_upload(self, name: str, data: bytes) -> None:
        """Keep an uploaded image under ``name`` (``sub/name.png``), replacing one of that name."""
        self._rows(
            "INSERT INTO uploads (name, data, created) VALUES (?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
            "data = excluded.data, created = excluded.created",
            (name, data, time.time()),
        )

    def upload(self, name: str) -> bytes | None:
        """An uploaded image by its name (any front end's upload)."""
        rows = self._rows("SELECT data FROM uploads WHERE name = ?", (name,))[0]
        return bytes(rows[0]["data"]) if rows else None

    def uploads(self) -> list[str]:
        """The names of the uploaded images, sorted."""
        return [row["name"] for row in self._rows("SELECT name FROM uploads ORDER BY name")[0]]

    def images(self, job_id: str) -> list[bytes]:
        """The images a job stored, in order."""
        rows = self._rows("SELECT data FROM images WHERE job_id = ? ORDER BY idx", (job_id,))[0]
        return [bytes(row["data"]) for row in rows]

    def purge(self, older_than_s: float) -> list[Job]:
        """Delete the finished jobs older than ``older_than_s``, their images and previews; returns them."""
        cutoff = time.time() - older_than_s
        old = "state IN (?, ?, ?) AND finished < ?"
        with self._transaction() as run:
            rows = run(f"SELECT * FROM jobs WHERE {old}", (*FINAL, cutoff))
            for table in ("images", "previews", "job_files"):
                run(f"DELETE FROM {table} WHERE job_id IN (SELECT id FROM jobs WHERE {old})", (*FINAL, cutoff))
            run(f"DELETE FROM jobs WHERE {old}", (*FINAL, cutoff))
        return [_job(r) for r in rows]

"""What the routes of one server share: settings, job store, catalog, runner,
and the ways a route waits on a job."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import os
import secrets
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request
from starlette.requests import HTTPConnection

from sfumato.families.embeddings import named_in
from sfumato.params import DiffusionParams
from sfumato.server.errors import ApiError
from sfumato.server.jobs.plan import JobPlan
from sfumato.server.jobs.registered import kind_of
from sfumato.server.jobs.runner import SAMPLING_PHASES, JobRunner, route_of
from sfumato.server.jobs.store import CANCELLED, ERROR, FINAL, Job, JobStore, Preview, QueueFullError, WorkerInfo
from sfumato.server.models.catalog import EMBEDDING, Catalog
from sfumato.server.settings import ServerSettings

FIELDS = {
    "model": "model", "upscaler": "upscaler", "LoRA": "loras", "VAE": "vae", "ControlNet": "control_net",
    "embedding": "prompt",
}  # fmt: skip
"""The request field a missing file of each kind is refused on."""


FALLBACK_S = 2.0
"""How long a follower waits for word of a change before it looks at its job anyway."""
MIN_LOOK_S = 0.1
"""The shortest time between two looks of one follower: changes faster than that (steps of
a small model) are read together."""
POLL_ENV = "SFUMATO_FOLLOW_POLL_S"
"""Set to a number of seconds, followers look every so often instead of waiting for word of
a change (how sfumato followed jobs before; for comparison in the benchmarks)."""
ANY_JOB = ""
"""What a follower of every job (ComfyUI's websocket) watches."""


class Watch:
    """One follower's wake-ups: :meth:`next` returns after a change of what it watches
    (at most every :data:`MIN_LOOK_S`, at least every :data:`FALLBACK_S`)."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.event = asyncio.Event()
        self._last = 0.0

    def wake(self) -> None:
        """Callable from any thread."""
        with contextlib.suppress(RuntimeError):  # its loop closed meanwhile
            self.loop.call_soon_threadsafe(self.event.set)

    async def next(self) -> None:
        poll = os.environ.get(POLL_ENV)
        if poll:
            await asyncio.sleep(float(poll))
            return
        with contextlib.suppress(asyncio.TimeoutError):  # TimeoutError itself from Python 3.11 on
            await asyncio.wait_for(self.event.wait(), FALLBACK_S)
        self.event.clear()
        pause = self._last + MIN_LOOK_S - time.monotonic()
        if pause > 0:
            await asyncio.sleep(pause)
        self._last = time.monotonic()


class Changes:
    """Wakes the followers of jobs (streams, websockets, waits) when a job changes: this
    process's own writes say so through :attr:`JobStore.changed`, other machines'
    through the store's notifications (:data:`JOB_CHANNEL`), so that a follower reads
    the store once per change instead of polling it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[str, set[Watch]] = {}

    def heard(self, job_id: str) -> None:
        """Job ``job_id`` changed (``ANY_JOB``: some job did, or a notification may have
        been missed: every follower looks). Callable from any thread."""
        with self._lock:
            if job_id == ANY_JOB:
                woken = set().union(*self._waiting.values())
            else:
                woken = self._waiting.get(job_id, set()) | self._waiting.get(ANY_JOB, set())
        for watch in woken:
            watch.wake()

    @contextlib.contextmanager
    def watching(self, job_id: str) -> Iterator[Watch]:
        """The wake-ups of a follower of job ``job_id`` (``ANY_JOB``: of any job)."""
        watch = Watch()
        with self._lock:
            self._waiting.setdefault(job_id, set()).add(watch)
        try:
            yield watch
        finally:
            with self._lock:
                self._waiting[job_id].discard(watch)
                if not self._waiting[job_id]:
                    del self._waiting[job_id]


@dataclass
class ServerState:
    settings: ServerSettings
    store: JobStore
    catalog: Catalog
    runner: JobRunner
    changes: Changes = field(default_factory=Changes)

    def __post_init__(self) -> None:
        self.store.changed = self.changes.heard

    def enqueue(self, kind: str, payload: dict[str, Any], plan: JobPlan, owner: str | None = None) -> str:
        """Store a checked job and wake the runner; returns the job id. ``owner``
        scopes the routes that name no job (A1111's ``progress`` and ``interrupt``).
        On a shared store the job names each file it needs (its model, LoRAs, VAE,
        ControlNet, upscalers, the embeddings its prompts say) by name and sha256, and
        only a worker that holds them all claims it.

        Raises
        ------
        ApiError
            409 when the queue is full; 503 on a front end (``workers`` 0) when no
            live worker holds all the job's files.
        """
        route = route_of(plan)
        identity, files = None, None
        if self.store.shared:
            keys = plan.files()
            if isinstance(plan.work, DiffusionParams):
                said = f"{plan.work.prompt}\n{plan.work.negative_prompt}"
                keys += [EMBEDDING + n for n in named_in(said, [e.name for e in self.catalog.embeddings()[0]])]
            entries = {key: self.catalog.entry(key) for key in [route, *keys]}
            sha = {key: self.catalog.identity(e) if e is not None else None for key, e in entries.items()}
            identity, files = sha.pop(route), sha
        if self.settings.workers == 0:
            self._check_served({route: identity, **(files or {})})
        try:
            job = self.store.add(kind, {"payload": payload, "plan": plan.to_json()}, route, owner, identity, files)
        except QueueFullError as exc:
            raise ApiError(409, "queue_full", str(exc)) from None
        self.runner.wake()
        return job.id

    def _check_served(self, needs: dict[str, str | None]) -> None:
        """On a front end: refuse a job no live worker can run (none holds one of its
        files, or only another file under its name, or none holds them all together),
        rather than queue it for ever. ``needs``: registration key -> sha256 (or ``None``)."""
        live = self.store.workers(self.settings.lease_s)

        def holds(worker: WorkerInfo, key: str, sha: str | None) -> bool:
            held = key in worker.models or key in worker.files
            return held and (sha is None or worker.identities.get(key) == sha)

        if any(all(holds(worker, key, sha) for key, sha in needs.items()) for worker in live):
            return
        for key, sha in needs.items():
            kind, name = kind_of(key)
            at = FIELDS.get(kind, "model")
            named = [worker for worker in live if holds(worker, key, None)]
            if not named:
                served = sorted({model for worker in live for model in worker.models})
                detail = self.catalog.absent(key) or (
                    f"no live worker serves {kind} {name!r}; the {len(live)} live worker(s) serve: "
                    f"{', '.join(served) or 'nothing'} (start sfumato worker with it in its folders)"
                )
                raise ApiError(503, "no_worker", detail, at)
            if sha is not None and not any(holds(worker, key, sha) for worker in named):
                theirs = sorted({str(worker.identities.get(key, "not hashed yet"))[:10] for worker in named})
                detail = (
                    f"the live workers' {key!r} is another file (sha256 {', '.join(theirs)}) than the one this front "
                    f"end checked the request against (sha256 {sha[:10]})"
                )
                raise ApiError(503, "no_worker", detail, at)
        apart = ", ".join(repr(key) for key in needs)
        detail = f"no live worker holds all of {apart} together (each is on some worker)"
        raise ApiError(503, "no_worker", detail, "model")

    def preview(self, job_id: str) -> Preview | None:
        """A job's latest live preview: from this server's own worker when it runs the job,
        else (a shared store) as the worker on another machine stored it."""
        preview = self.runner.preview_of(job_id)
        if preview is not None:
            return preview
        return self.store.preview(job_id) if self.store.shared else None

    def sampling_step(self, job: Job) -> tuple[int, int] | None:
        """The sampling step a running job is at and its steps (``None`` outside sampling):
        this server's worker's latest tick, else the step its worker stored."""
        tick = self.runner.tick_of(job.id)
        if tick is not None:
            return (tick.step, tick.total_steps) if tick.phase in SAMPLING_PHASES else None
        return (job.step, job.steps) if job.steps else None

    def find(self, job_id: str) -> Job:
        """The job with ``job_id``; 404 when there is none."""
        job = self.store.get(job_id)
        if job is None:
            raise ApiError(404, "not_found", f"no job has id {job_id!r} (never accepted, or past retention)", "job_id")
        return job

    async def follow(self, job_id: str, request: Request | None = None) -> AsyncIterator[Job]:
        """The job each time its state, progress or phase changes, until it ends
        (or the client of ``request`` goes away); never blocks the event loop."""
        last = None
        with self.changes.watching(job_id) as changed:
            while request is None or not await request.is_disconnected():
                job = self.store.get(job_id)
                if job is None:  # purged while followed
                    return
                now = (job.state, job.progress, job.phase)
                if now != last:
                    yield job
                    last = now
                if job.state in FINAL:
                    return
                await changed.next()

    async def wait_final(self, job_id: str) -> Job:
        """The job once it has ended."""
        job = self.find(job_id)
        async for seen in self.follow(job_id):
            job = seen
        if job.state not in FINAL:
            raise ApiError(500, "job_lost", f"job {job_id} left the store before it ended")
        with self.changes.watching(job_id) as changed:
            while job.state == CANCELLED and job.lease_until is not None and job.lease_until > time.time():
                # Cancelled while running: its worker, on whichever machine, still adds the
                # images it finished; wait for that (or for its lease to run out).
                await changed.next()
                job = self.store.get(job_id) or job
        return job

    def images(self, job: Job) -> list[bytes]:
        """The images a job made (a cancelled job's finished ones), from the store, which
        any front end reads whichever machine ran it; a failed job is a 500."""
        if job.state == ERROR:
            raise ApiError(500, "generation_failed", job.error or "the job failed")
        return [data for data in stored_images(self.store, job) if data is not None]


def stored_images(store: JobStore, job: Job) -> list[bytes | None]:
    """A job's images from the store; for a job an older sfumato ran, its files (``None``
    for one retention removed)."""
    images: list[bytes | None] = list(store.images(job.id))
    if images:
        return images
    files = [Path(path) for path in job.result.get("output_paths", [])]
    return [file.read_bytes() if file.is_file() else None for file in files]


AUTH_HINT = "this server needs 'Authorization: Bearer <api key>' (or HTTP Basic with the key as the password)"


def basic_credentials(header: str) -> tuple[str, str] | None:
    """The user name and password of an HTTP Basic ``Authorization`` header (``None``
    for another scheme or a token that does not decode)."""
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, _, password = base64.b64decode(token.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return user, password


def authorized(header: str, key: str) -> bool:
    """Whether an ``Authorization`` header carries ``key``: as a Bearer token, or as
    the password of HTTP Basic (any user name), as A1111 clients send it."""
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() == "basic":
        credentials = basic_credentials(header)
        if credentials is None:
            return False
        token = credentials[1]
    elif scheme.lower() != "bearer":
        return False
    return secrets.compare_digest(token.strip().encode(), key.encode())


def client_key(request: Request) -> str:
    """Who sent a request, for the routes that name no job: the user name of HTTP Basic
    auth when there is one (A1111 clients send ``user:password``), else the client's
    address."""
    credentials = basic_credentials(request.headers.get("authorization", ""))
    if credentials is not None:
        return "user:" + credentials[0]
    return "host:" + (request.client.host if request.client is not None else "")


def require_key(settings: ServerSettings) -> Callable[[Request], Awaitable[None]]:
    """A dependency refusing requests without the API key (when one is set), as
    Bearer or as HTTP Basic's password."""

    async def check(request: Request) -> None:
        if settings.api_key is not None and not authorized(request.headers.get("authorization", ""), settings.api_key):
            raise ApiError(401, "unauthorized", AUTH_HINT)

    return check


def server_state(connection: HTTPConnection) -> ServerState:
    """The running server's state: a FastAPI dependency of the routes (``create_app``
    keeps it as ``app.state.sfumato``)."""
    state: ServerState = connection.app.state.sfumato
    return state


StateDep = Annotated[ServerState, Depends(server_state)]
"""A route parameter that receives the server's state."""

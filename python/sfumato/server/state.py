"""What the routes of one server share: settings, job store, catalog, runner,
and the ways a route waits on a job."""

from __future__ import annotations

import asyncio
import base64
import binascii
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request
from starlette.requests import HTTPConnection

from sfumato.server.errors import ApiError
from sfumato.server.jobs.plan import JobPlan
from sfumato.server.jobs.runner import SAMPLING_PHASES, JobRunner, route_of
from sfumato.server.jobs.store import CANCELLED, ERROR, FINAL, Job, JobStore, Preview, QueueFullError
from sfumato.server.models.catalog import Catalog
from sfumato.server.settings import ServerSettings

POLL_S = 0.1


@dataclass
class ServerState:
    settings: ServerSettings
    store: JobStore
    catalog: Catalog
    runner: JobRunner

    def enqueue(self, kind: str, payload: dict[str, Any], plan: JobPlan, owner: str | None = None) -> str:
        """Store a checked job and wake the runner; returns the job id. ``owner``
        scopes the routes that name no job (A1111's ``progress`` and ``interrupt``).

        Raises
        ------
        ApiError
            409 when the queue is full; 503 on a front end (``workers`` 0) when no
            live worker serves the job's model.
        """
        route = route_of(plan)
        entry = self.catalog.entry(route) if self.store.shared else None
        identity = self.catalog.identity(entry) if entry is not None else None
        if self.settings.workers == 0:
            self._check_served(route, identity)
        try:
            job = self.store.add(kind, {"payload": payload, "plan": plan.to_json()}, route, owner, identity)
        except QueueFullError as exc:
            raise ApiError(409, "queue_full", str(exc)) from None
        self.runner.wake()
        return job.id

    def _check_served(self, route: str, identity: str | None) -> None:
        """On a front end: refuse a job no live worker can run (none has the model, or
        only another file under its name), rather than queue it for ever."""
        live = self.store.workers(self.settings.lease_s)
        named = [worker for worker in live if route in worker.models]
        if any(identity is None or worker.identities.get(route) == identity for worker in named):
            return
        if named:
            theirs = sorted({str(worker.identities.get(route, "not hashed yet"))[:10] for worker in named})
            detail = (
                f"the live workers' {route!r} is another file (sha256 {', '.join(theirs)}) than this front end's "
                f"(sha256 {str(identity)[:10]})"
            )
        else:
            served = sorted({model for worker in live for model in worker.models})
            detail = (
                f"no live worker serves model {route!r}; the {len(live)} live worker(s) serve: "
                f"{', '.join(served) or 'nothing'} (start sfumato worker with it in its --models folder)"
            )
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
            await asyncio.sleep(POLL_S)

    async def wait_final(self, job_id: str) -> Job:
        """The job once it has ended."""
        job = self.find(job_id)
        async for seen in self.follow(job_id):
            job = seen
        if job.state not in FINAL:
            raise ApiError(500, "job_lost", f"job {job_id} left the store before it ended")
        while job.state == CANCELLED and job.lease_until is not None and job.lease_until > time.time():
            # Cancelled while running: its worker, on whichever machine, still adds the
            # images it finished; wait for that (or for its lease to run out).
            await asyncio.sleep(POLL_S)
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

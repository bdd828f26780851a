"""What the routes of one server share: settings, job store, catalog, runner,
and the ways a route waits on a job."""

from __future__ import annotations

import asyncio
import base64
import binascii
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from sfumato.server.catalog import Catalog
from sfumato.server.errors import ApiError
from sfumato.server.jobplan import JobPlan
from sfumato.server.runner import JobRunner, read_output
from sfumato.server.settings import ServerSettings
from sfumato.server.store import ERROR, FINAL, Job, JobStore, QueueFullError

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
            409 when the queue is full.
        """
        try:
            request = {"payload": payload, "plan": plan.to_json(), **({"owner": owner} if owner else {})}
            job = self.store.add(kind, request)
        except QueueFullError as exc:
            raise ApiError(409, "queue_full", str(exc)) from None
        self.runner.wake()
        return job.id

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
        return job


def output_images(job: Job) -> list[bytes]:
    """The images a job wrote (a cancelled job's finished ones); a failed job is a 500."""
    if job.state == ERROR:
        raise ApiError(500, "generation_failed", job.error or "the job failed")
    found = (read_output(path) for path in job.result.get("output_paths", []))
    return [data for data in found if data is not None]


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

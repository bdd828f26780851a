"""What the routes of one server share: settings, job store, catalog, runner."""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from sfumato.server.catalog import Catalog
from sfumato.server.errors import ApiError
from sfumato.server.runner import JobRunner
from sfumato.server.settings import ServerSettings
from sfumato.server.store import JobStore, QueueFullError


@dataclass
class ServerState:
    settings: ServerSettings
    store: JobStore
    catalog: Catalog
    runner: JobRunner

    def enqueue(self, kind: str, payload: dict[str, Any], plan: dict[str, Any]) -> str:
        """Store a checked job and wake the runner; returns the job id.

        Raises
        ------
        ApiError
            409 when the queue is full.
        """
        try:
            job = self.store.add(kind, {"payload": payload, "plan": plan})
        except QueueFullError as exc:
            raise ApiError(409, "queue_full", str(exc)) from None
        self.runner.wake()
        return job.id


def require_key(settings: ServerSettings) -> Callable[[Request], Awaitable[None]]:
    """A dependency refusing requests without ``Authorization: Bearer <api_key>`` (when one is set)."""

    async def check(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.encode(), settings.api_key.encode()):
            raise ApiError(401, "unauthorized", "this server needs 'Authorization: Bearer <api key>'")

    return check

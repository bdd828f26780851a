"""The FastAPI application of ``sfumato serve``.

``create_app(settings)`` builds a server with no other service behind it: a
SQLite job store and an outputs folder under ``settings.data_dir``, models
chosen by name from ``settings.models_dir``.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI
from fastapi.responses import HTMLResponse
from prometheus_client import CollectorRegistry
from pydantic import BaseModel
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sfumato.errors import SfumatoError
from sfumato.families.detect import FAMILY_NAMES
from sfumato.server import errors
from sfumato.server.apis import a1111, job_queue, metrics, openai, param_schema, workers_ai
from sfumato.server.apis.comfy import routes as comfyui
from sfumato.server.apis.metrics import claim_latency
from sfumato.server.errors import error_response
from sfumato.server.jobs import open_store
from sfumato.server.jobs.registered import RegisteredCatalog
from sfumato.server.jobs.runner import JobRunner, check_runner
from sfumato.server.jobs.store import JOB_CHANNEL, WORKERS_CHANNEL, JobStore, StoreUnavailableError, WorkerInfo
from sfumato.server.jobs.store_pg import describe
from sfumato.server.models.catalog import Catalog
from sfumato.server.settings import ServerSettings
from sfumato.server.state import ServerState, StateDep, require_key

logger = logging.getLogger("sfumato.server")
PURGE_EVERY_S = 10.0
PAGE = resources.files("sfumato.server").joinpath("page.html").read_text(encoding="utf-8")


class BodyLimit:
    """Answers 413 to a request whose body passes ``limit`` bytes, declared or streamed."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        too_big = error_response(413, "body_too_large", f"the request body is over {self.limit} bytes")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await too_big(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLargeError
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLargeError:
            await too_big(scope, receive, send)


class _TooLargeError(Exception):
    pass


class Hello(BaseModel):
    ok: bool


def _purge(state: ServerState) -> None:
    """Retention (the images in the store and this machine's files), and the jobs of lost
    workers back to the queue."""
    for job in state.store.purge(state.settings.retention_s):
        for path in job.result.get("output_paths", []):
            Path(path).unlink(missing_ok=True)
    again, lost = state.store.expire()
    if again or lost:
        logger.warning("queued again %d job(s) whose workers were lost; %d failed as lost", again, lost)


def _heard(state: ServerState, channel: str, payload: str) -> None:
    """A notification to a front end: a job changed (its followers look), or what the
    workers hold did (a front end without models reads their registrations again)."""
    if channel == WORKERS_CHANNEL:
        if isinstance(state.catalog, RegisteredCatalog):
            state.catalog.refresh()
    else:
        state.changes.heard(payload)


class WorkersResponse(BaseModel):
    """The live workers: where each runs, the models it serves (with their sha256 on a
    shared store) and has loaded, and its load."""

    workers: list[WorkerInfo]


health = APIRouter(tags=["health"])
"""The routes that never need the API key: health probes and the page."""
operations = APIRouter(tags=["operations"])
"""The routes about the farm itself."""


@health.get("/hello", response_model=Hello, responses=errors.responses())
def hello() -> Hello:
    """Health check; never needs the API key."""
    return Hello(ok=True)


@health.get("/internal/ping", responses=errors.responses())
def ping() -> dict[str, Any]:
    """A1111's health probe; never needs the API key."""
    return {}


@health.get("/queue/status", responses=errors.responses())
def queue_status(state: StateDep) -> dict[str, Any]:
    """Gradio's queue probe, which A1111 front ends call to test a connection; never
    needs the API key. (A fixed path: job ids are UUIDs, never ``status``.)"""
    return {
        "msg": "estimation",
        "rank": None,
        "queue_size": state.store.active_count(),
        "rank_eta": None,
        "avg_event_process_time": None,
        "avg_event_concurrent_process_time": None,
    }


@health.get("/", response_class=HTMLResponse, include_in_schema=False)
def page() -> HTMLResponse:
    """The web page: a static shell that needs no key; its data comes from the API."""
    return HTMLResponse(PAGE)


@operations.get("/workers", response_model=WorkersResponse, responses=errors.responses())
def workers(state: StateDep) -> WorkersResponse:
    """The live workers (this server's own, and ``sfumato worker`` processes on the
    same store): their models, those loaded, and their load."""
    return WorkersResponse(workers=state.store.workers(state.settings.lease_s))


def _check_settings(settings: ServerSettings) -> None:
    """Refuse a combination of settings that cannot serve."""
    if settings.workers not in (0, 1):
        raise SfumatoError(f"--workers: {settings.workers} is not allowed: 1 (run jobs here) or 0 (a front end)")
    if settings.workers == 0 and not settings.store:
        raise SfumatoError("--workers 0: a front end needs a store that workers share: --store postgresql://...")
    check_runner(settings)


def _lifespan(state: ServerState) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """What the server does as it starts and stops: recover and purge jobs, read the
    folders, start the runner (or the hashing of a front end) and the retention loop."""
    settings, store, catalog = state.settings, state.store, state.catalog
    stop = threading.Event()

    def purge_loop() -> None:
        while not stop.wait(PURGE_EVERY_S):
            try:
                _purge(state)
            except StoreUnavailableError as exc:
                logger.warning("retention: %s; trying again later", exc)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        try:
            if settings.workers:
                requeued = store.recover()
                if requeued:
                    logger.info("queued again %d job(s) whose worker stopped while running them", requeued)
            _purge(state)
            # Read the model headers (or registrations) now, not while the first requests wait.
            catalog.models()
            catalog.upscalers()
        except StoreUnavailableError as exc:  # the routes answer 503 until it is back
            logger.error("%s", exc)
        if settings.workers:
            state.runner.start()  # on a shared store, it hashes the models in the background
        elif store.shared:  # a front end names each job's file by its hash: known before the first job
            threading.Thread(target=catalog.hash_all, name="sfumato-hash", daemon=True).start()
        purger = threading.Thread(target=purge_loop, name="sfumato-purge", daemon=True)
        purger.start()
        listen = getattr(store, "listen", None)
        if listen is not None:  # other machines' changes wake this front end's followers
            channels = (JOB_CHANNEL, WORKERS_CHANNEL)
            heard = partial(_heard, state)
            threading.Thread(target=listen, args=(heard, stop, channels), name="sfumato-follow", daemon=True).start()
        yield
        stop.set()
        if settings.workers:
            state.runner.stop()
        store.close()

    return lifespan


def front_catalog(settings: ServerSettings, store: JobStore) -> Catalog:
    """What a server lists and validates requests against: its folders, or on a front end
    (``--workers 0``) with no models folder, what the live workers registered."""
    if settings.workers == 0 and store.shared and not settings.models_dir.is_dir():
        return RegisteredCatalog(settings, store)
    return Catalog(settings)


def create_app(settings: ServerSettings | None = None) -> FastAPI:
    """A server for ``settings`` (the embedded defaults when ``None``).

    Raises
    ------
    ModelsConfigError
        When the models config cannot be served (naming its file, model and key).
    """
    settings = settings or ServerSettings()
    _check_settings(settings)
    store = open_store(settings.store, settings.db_path, settings.queue_size)
    catalog = front_catalog(settings, store)
    if not isinstance(catalog, RegisteredCatalog):  # (the workers check their own)
        catalog.configured()  # a broken models config stops the server before it starts
    registry = CollectorRegistry()
    runner = JobRunner(store, catalog, settings, claim_latency(registry), settings.lease_s, settings.jobs_per_device)
    state = ServerState(settings, store, catalog, runner)
    app = FastAPI(title="sfumato", summary="Local image generation on stable-diffusion.cpp", lifespan=_lifespan(state))
    app.state.sfumato = state
    errors.install(app)
    app.include_router(health)
    app.include_router(operations, dependencies=[Depends(require_key(settings))])
    app.include_router(job_queue.router(state))
    app.include_router(a1111.router(state))
    app.include_router(openai.router(state))
    app.include_router(param_schema.router(state))
    app.include_router(workers_ai.router(state))
    app.include_router(comfyui.router(state))
    app.include_router(comfyui.websocket_router(state))
    app.include_router(metrics.router(state, registry))
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    return app


def serve(settings: ServerSettings, **uvicorn_options: Any) -> None:
    """Run the server with uvicorn until interrupted; first say where, and with which models."""
    import uvicorn

    app = create_app(settings)
    print(announcement(app.state.sfumato), file=sys.stderr, flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, **uvicorn_options)


def announcement(state: ServerState) -> str:
    """What ``sfumato serve`` prints at start: its URL, and the models it offers (or how to add one)."""
    settings = state.settings
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    jobs = f"jobs in {describe(settings.store)}" if settings.store else f"jobs in {settings.db_path}"
    url = f"sfumato serve: http://{host}:{settings.port}/ (the web page; the APIs under it)"
    if isinstance(state.catalog, RegisteredCatalog):
        return (
            f"{url}\nno models folder ({settings.models_dir} is not one): the models are those the live workers "
            f"register, and requests answer 503 until one does\n{jobs}"
        )
    models = state.catalog.models()  # reads the headers now; the catalog keeps them for the first requests
    config = settings.models_config_path
    where = f"{settings.models_dir} and {config}" if config.is_file() else str(settings.models_dir)
    found = f"{len(models)} model(s) in {where}: " + ", ".join(
        f"{e.name} ({FAMILY_NAMES[e.info.family] if e.info else 'unknown'})" for e in models
    )
    if not models:
        found = (
            f"no model in {settings.models_dir} yet: put a checkpoint there (.gguf, .safetensors) or use --models DIR"
        )
    return f"{url}\n{found}\n{jobs}"

"""The ComfyUI-compatible API: ``POST /prompt`` with an API-format graph, ``/history``,
``/view``, ``/upload/image``, ``/object_info``, ``/queue``, ``/interrupt``,
``/system_stats`` and the ``/ws`` websocket, each under ``/`` and ``/api`` as
ComfyUI serves them, except where a path is sfumato's own (``/queue``, ``/models``):
those ComfyUI routes live only under ``/api``.

A prompt is compiled into one job of the server's durable queue
(:mod:`sfumato.server.apis.comfy.compile`), so cancel and restart behave as for every
other API; the prompt id is the job id.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import mimetypes
import platform
import struct
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import psutil
from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response

import sfumato
from sfumato.errors import InvalidParameterError
from sfumato.server.apis.comfy.compile import compile_prompt
from sfumato.server.apis.comfy.nodes import MODEL_FOLDERS, choices, input_image, object_info
from sfumato.server.apis.comfy.walk import GraphError
from sfumato.server.errors import ApiError, responses
from sfumato.server.jobs.store import ACTIVE, CANCELLED, DONE, FINAL, PROCESSING, QUEUED, Job
from sfumato.server.planning import check_image
from sfumato.server.state import (
    ANY_JOB,
    AUTH_HINT,
    ServerState,
    StateDep,
    authorized,
    require_key,
    stored_images,
)

KIND = "comfyui"
PREVIEW_IMAGE, PNG = 1, 2  # ComfyUI's binary event type and image type


def _ms(seconds: float | None) -> int:
    return int((seconds or time.time()) * 1000)


def _bad_prompt(message: str) -> JSONResponse:
    body = {"error": {"type": "invalid_prompt", "message": message, "details": "", "extra_info": {}}, "node_errors": {}}
    return JSONResponse(body, status_code=400)


def _queue_item(job: Job) -> list[Any]:
    """A prompt as ComfyUI's queue and history list it: number, id, graph, extra data, outputs."""
    p = job.request["payload"]
    return [p["number"], job.id, p["prompt"], p["extra_data"], p["outputs"]]


def _node_at(payload: dict[str, Any], phase: str) -> str:
    """The node a job's phase runs, for ``executing`` messages."""
    if phase == "decoding" and payload["decoder"]:
        return str(payload["decoder"])
    if phase == "upscaling" and payload.get("upscaler"):  # ESRGAN passes over the generation
        return str(payload["upscaler"])
    if phase in ("generation", "initial generation", "upscaling", "refining") and payload["sampler"]:
        return str(payload["sampler"])
    return str(payload["loader"])


def _outputs(job: Job) -> dict[str, Any]:
    """A finished job's images, per output node, as ``/view`` serves them."""
    p = job.request["payload"]
    files = [Path(path).name for path in job.result.get("output_paths", [])]
    out = {}
    for node in p["outputs"]:
        kind = "temp" if p["class_types"][node] == "PreviewImage" else "output"
        out[node] = {"images": [{"filename": name, "subfolder": "", "type": kind} for name in files]}
    return out


def _end_message(job: Job) -> tuple[str, dict[str, Any]]:
    """How an ended job ended: ``execution_success``, ``execution_interrupted`` or ``execution_error``."""
    p = job.request["payload"]
    stamp = {"prompt_id": job.id, "timestamp": _ms(job.finished)}
    if job.state == DONE:
        return "execution_success", stamp
    node = _node_at(p, job.phase)
    where = {**stamp, "node_id": node, "node_type": p["class_types"].get(node, ""), "executed": []}
    if job.state == CANCELLED:
        return "execution_interrupted", where
    return "execution_error", {
        **where,
        "exception_message": job.error or "the job failed",
        "exception_type": "RuntimeError",
        "traceback": [],
        "current_inputs": {},
        "current_outputs": {},
    }


def _history_entry(job: Job) -> dict[str, Any]:
    p = job.request["payload"]
    start = {"prompt_id": job.id, "timestamp": _ms(job.started or job.created)}
    messages = [["execution_start", start], ["execution_cached", {**start, "nodes": []}], list(_end_message(job))]
    done = job.state == DONE
    meta = {n: {"node_id": n, "display_node": n, "parent_node": None, "real_node_id": n} for n in p["outputs"]}
    return {
        "prompt": _queue_item(job),
        "outputs": _outputs(job) if done else {},
        "status": {"status_str": "success" if done else "error", "completed": done, "messages": messages},
        "meta": meta if done else {},
    }


def _inside(folder: Path, subfolder: str, name: str, field: str) -> Path:
    """``folder/subfolder/name``, refused unless it stays inside ``folder``."""
    parts = PurePosixPath(subfolder.replace("\\", "/")).parts if subfolder else ()
    if any(part in ("..", "") or part.startswith(".") for part in parts) or subfolder.startswith("/"):
        raise InvalidParameterError("subfolder", f"{subfolder!r} must be a relative folder without '..'")
    if not name or name != PurePosixPath(name.replace("\\", "/")).name or name.startswith("."):
        raise InvalidParameterError(field, f"{name!r} must be a plain file name")
    return folder.joinpath(*parts, name)


api = APIRouter(tags=["ComfyUI"])
_numbers = itertools.count(1)  # the queue numbers prompts get, as ComfyUI counts them per process


def add(path: str, endpoint: Callable[..., Any], method: str, both: bool = True, **extra: Any) -> None:
    for prefix in ("", "/api") if both else ("/api",):
        api.add_api_route(prefix + path, endpoint, methods=[method], responses=responses(), **extra)


def comfy_jobs(state: ServerState, active: bool = False) -> list[Job]:
    jobs = (state.store.get(job_id) for job_id in state.store.ids_of_kind(KIND, active=active))
    return [job for job in jobs if job is not None]


async def prompt(state: StateDep, request: Request) -> Any:
    """Queue a prompt (an API-format graph); ComfyUI's 400 with ``node_errors`` when it cannot run."""
    try:  # some clients send JSON without a JSON content type
        body = json.loads(await request.body() or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        return _bad_prompt(f"the body is not JSON: {exc}")
    if not isinstance(body, dict) or "prompt" not in body:
        return _bad_prompt("the body must be an object with a 'prompt' (the API-format graph)")
    try:
        compiled = compile_prompt(state, body["prompt"])
    except GraphError as exc:
        return JSONResponse(exc.body, status_code=400)
    client_id = body.get("client_id")
    extra = body.get("extra_data") if isinstance(body.get("extra_data"), dict) else {}
    number = next(_numbers)
    payload = {
        "prompt": body["prompt"],
        "client_id": client_id if isinstance(client_id, str) else None,
        "extra_data": extra,
        "number": number,
        "outputs": list(compiled.outputs),
        "loader": compiled.loader,
        "sampler": compiled.sampler,
        "decoder": compiled.decoder,
        "class_types": compiled.class_types,
        "upscaler": compiled.upscaler,
    }
    job_id = state.enqueue(KIND, payload, compiled.plan)
    return {"prompt_id": job_id, "number": number, "node_errors": {}}


def history(state: StateDep, max_items: int | None = Query(None, ge=1)) -> dict[str, Any]:
    """The ended prompts, oldest first (the last ``max_items``)."""
    ended = [job for job in comfy_jobs(state) if job.state in FINAL]
    return {job.id: _history_entry(job) for job in ended[-max_items if max_items else 0 :]}


def history_of(state: StateDep, prompt_id: str) -> dict[str, Any]:
    """One prompt's entry, once it has ended (``{}`` before)."""
    job = state.store.get(prompt_id)
    if job is None or job.kind != KIND or job.state not in FINAL:
        return {}
    return {job.id: _history_entry(job)}


def view(state: StateDep, filename: str, type: str = "output", subfolder: str = "") -> Response:
    """An output image (``type`` output or temp), from the job store whichever machine
    made it, or an uploaded one (``type`` input)."""
    if type not in ("output", "temp", "input"):
        raise InvalidParameterError("type", f"is {type!r}; use output, temp or input")
    missing = ApiError(404, "not_found", f"no {type} image named {filename!r}", "filename")
    media = mimetypes.guess_type(filename)[0] or "application/octet-stream"
    if type != "input":
        _inside(state.settings.outputs_dir, "", filename, "filename")  # refuses paths
        stem = PurePosixPath(filename).stem
        job = state.store.get(stem[:36])
        index = stem[37:] if stem[36:37] == "-" else "0" if len(stem) == 36 else ""
        images = stored_images(state.store, job) if job is not None and index.isdigit() else []
        image = images[int(index)] if index.isdigit() and int(index) < len(images) else None
        if image is None:
            raise missing
        return Response(image, media_type=media)
    data = input_image(state, _inside(Path(), subfolder, filename, "filename").as_posix())
    if data is None:
        raise missing
    return Response(data, media_type=media)


async def upload_image(
    state: StateDep,
    image: UploadFile = File(...),  # noqa: B008 - FastAPI's form declarations
    type: str = Form("input"),
    subfolder: str = Form(""),
    overwrite: str = Form("false"),
) -> dict[str, str]:
    """Keep an image for ``LoadImage``, in the job store (so that every front end has it);
    a different image of the same name is kept as ``name (1).png`` unless ``overwrite``."""
    if type not in ("input", "temp"):
        raise InvalidParameterError("type", f"is {type!r}; sfumato keeps uploads as input images")
    data = check_image(await image.read(), "image")
    path = _inside(Path(), subfolder, Path(image.filename or "").name, "image")
    before = input_image(state, path.as_posix())
    if before is not None and overwrite.lower() not in ("true", "1") and before != data:
        for i in itertools.count(1):
            candidate = path.with_name(f"{path.stem} ({i}){path.suffix}")
            kept = input_image(state, candidate.as_posix())
            if kept is None or kept == data:
                path = candidate
                break
    state.store.put_upload(path.as_posix(), data)
    return {"name": path.name, "subfolder": subfolder, "type": "input"}


def nodes(state: StateDep) -> dict[str, Any]:
    """Every node type sfumato runs, with its inputs' current choices."""
    return object_info(state)


def node(state: StateDep, node_class: str) -> dict[str, Any]:
    return object_info(state, node_class)


def queue(state: StateDep) -> dict[str, Any]:
    jobs = comfy_jobs(state, active=True)
    return {
        "queue_running": [_queue_item(j) for j in jobs if j.state == PROCESSING],
        "queue_pending": [_queue_item(j) for j in jobs if j.state == QUEUED],
    }


async def change_queue(state: StateDep, request: Request) -> dict[str, Any]:
    """``{"clear": true}`` cancels every pending prompt; ``{"delete": [ids]}`` those named."""
    try:
        body = json.loads(await request.body() or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise InvalidParameterError("body", "is not JSON") from None
    if not isinstance(body, dict):
        raise InvalidParameterError("body", "must be an object with 'clear' or 'delete'")
    pending = {j.id for j in comfy_jobs(state, active=True) if j.state == QUEUED}
    named: list[Any] = body["delete"] if isinstance(body.get("delete"), list) else []
    chosen = pending if body.get("clear") is True else pending & {str(i) for i in named}
    for job_id in chosen:
        state.runner.cancel(job_id)
    return {}


async def interrupt(state: StateDep, request: Request) -> dict[str, Any]:
    """Stop the running prompt (the one named by ``prompt_id`` if given); never another API's job."""
    try:
        body = json.loads(await request.body() or b"{}")
    except (ValueError, UnicodeDecodeError):
        body = {}
    named = body.get("prompt_id") if isinstance(body, dict) else None
    for job in comfy_jobs(state, active=True):
        if job.state == PROCESSING and named in (None, job.id):
            state.runner.cancel(job.id)
    return {}


def system_stats() -> dict[str, Any]:
    """This machine, as ComfyUI describes its own: the CPU (with the machine's memory)
    first, then each GPU of the engine's device registry with the memory it reports."""
    memory = psutil.virtual_memory()
    gpus = [d for d in sfumato.list_devices() if d.type != "cpu"]
    return {
        "system": {
            "os": sys.platform,
            "ram_total": memory.total,
            "ram_free": memory.available,
            "comfyui_version": f"sfumato {sfumato.__version__}",
            "python_version": sys.version,
            "pytorch_version": "",
            "embedded_python": False,
            "argv": sys.argv,
        },
        "devices": [
            {
                "name": platform.processor() or platform.machine(),
                "type": "cpu",
                "index": 0,
                "vram_total": memory.total,
                "vram_free": memory.available,
                "torch_vram_total": 0,
                "torch_vram_free": 0,
            },
            *(
                {
                    "name": f"{device.name} : {device.description}",
                    "type": device.name.rstrip("0123456789").lower(),
                    "index": index,
                    "vram_total": device.memory_total,
                    "vram_free": device.memory_free,
                    "torch_vram_total": 0,
                    "torch_vram_free": 0,
                }
                for index, device in enumerate(gpus)
            ),
        ],
    }


def model_folders() -> list[str]:
    return list(MODEL_FOLDERS)


def models_in(state: StateDep, folder: str) -> list[str]:
    if folder not in MODEL_FOLDERS:
        raise ApiError(404, "not_found", f"no model folder {folder!r}; there are {', '.join(MODEL_FOLDERS)}", "folder")
    return choices(state, folder)


def embeddings(state: StateDep) -> list[str]:
    return [e.name for e in state.catalog.embeddings()[0]]


add("/prompt", prompt, "POST")
add("/history", history, "GET")
add("/history/{prompt_id}", history_of, "GET")
add("/view", view, "GET", response_class=Response)
add("/upload/image", upload_image, "POST")
add("/object_info", nodes, "GET")
add("/object_info/{node_class}", node, "GET")
add("/queue", queue, "GET", both=False)
add("/queue", change_queue, "POST", both=False)
add("/interrupt", interrupt, "POST")
add("/system_stats", system_stats, "GET")
add("/models", model_folders, "GET", both=False)
add("/models/{folder}", models_in, "GET", both=False)
add("/embeddings", embeddings, "GET")


def router(state: ServerState) -> APIRouter:
    """The ComfyUI routes, behind the server's API key."""
    root = APIRouter(dependencies=[Depends(require_key(state.settings))])
    root.include_router(api)
    return root


def websocket_router(state: ServerState) -> APIRouter:
    """``/ws?clientId=`` (and ``/api/ws``): a client's prompts' progress, previews and results."""
    api = APIRouter()
    key = state.settings.api_key

    async def ws(websocket: WebSocket) -> None:
        if key is not None and not authorized(websocket.headers.get("authorization", ""), key):
            await websocket.close(code=1008, reason=AUTH_HINT)
            return
        client_id = websocket.query_params.get("clientId") or uuid.uuid4().hex
        await websocket.accept()
        follower = _Follower(state, websocket, client_id)
        listener = asyncio.create_task(_drain(websocket))
        try:
            with state.changes.watching(ANY_JOB) as changed:
                await follower.status()
                while not listener.done():
                    await follower.step()
                    await changed.next()
        except (WebSocketDisconnect, RuntimeError):
            pass  # the client went away
        finally:
            listener.cancel()

    for path in ("/ws", "/api/ws"):
        api.add_api_websocket_route(path, ws)
    return api


async def _drain(websocket: WebSocket) -> None:
    """Read (and ignore) what the client sends, until it goes away."""
    while (await websocket.receive())["type"] != "websocket.disconnect":
        pass


class _Follower:
    """Turns one client's jobs' states into ComfyUI's messages, as they change."""

    def __init__(self, state: ServerState, websocket: WebSocket, client_id: str) -> None:
        self.state, self.websocket, self.client_id = state, websocket, client_id
        self.connected = time.time()
        # Prompts queued before the client connected are followed too, until they end.
        self.followed = dict.fromkeys(state.store.ids_of_kind(KIND, active=True), "")
        self.steps: dict[str, int] = {}
        self.previews: dict[str, int] = {}
        self.remaining = -1

    async def send(self, kind: str, data: dict[str, Any]) -> None:
        await self.websocket.send_text(json.dumps({"type": kind, "data": data}))

    async def status(self) -> None:
        remaining = self.state.store.active_count()
        if remaining != self.remaining:
            self.remaining = remaining
            await self.send("status", {"status": {"exec_info": {"queue_remaining": remaining}}, "sid": self.client_id})

    async def step(self) -> None:
        for job_id in self.state.store.ids_of_kind(KIND, since=self.connected):
            self.followed.setdefault(job_id, "")
        for job_id, node in list(self.followed.items()):
            job = self.state.store.get(job_id)
            if job is None or job.request["payload"].get("client_id") not in (None, self.client_id):
                del self.followed[job_id]
                continue
            if job.state == QUEUED:
                continue
            if node == "":  # it started (or ended) since the last look
                start = {"prompt_id": job.id, "timestamp": _ms(job.started)}
                await self.send("execution_start", start)
                await self.send("execution_cached", {**start, "nodes": []})
            if job.state in ACTIVE:
                await self._running(job, node)
            else:
                await self._ended(job)
                del self.followed[job_id]
        await self.status()

    async def _running(self, job: Job, shown: str) -> None:
        payload = job.request["payload"]
        node = _node_at(payload, job.phase)
        if node != shown:
            self.followed[job.id] = node
            await self.send("executing", {"node": node, "display_node": node, "prompt_id": job.id})
        step = self.state.sampling_step(job)
        if step is not None and self.steps.get(job.id) != step[0]:
            self.steps[job.id] = step[0]
            await self.send(
                "progress", {"value": step[0], "max": step[1], "prompt_id": job.id, "node": payload["sampler"] or node}
            )
        await self._preview(job)

    async def _preview(self, job: Job) -> None:
        """The job's latest preview, if this client has not seen it: ComfyUI's binary frame."""
        preview = self.state.preview(job.id)
        if preview is not None and preview.serial > self.previews.get(job.id, 0):
            self.previews[job.id] = preview.serial
            await self.websocket.send_bytes(struct.pack(">II", PREVIEW_IMAGE, PNG) + preview.png)

    async def _ended(self, job: Job) -> None:
        await self._preview(job)  # a job may end between two looks: its last preview still shows
        if job.state == DONE:
            for node, output in _outputs(job).items():
                await self.send("executing", {"node": node, "display_node": node, "prompt_id": job.id})
                await self.send("executed", {"node": node, "display_node": node, "output": output, "prompt_id": job.id})
        await self.send(*_end_message(job))
        await self.send("executing", {"node": None, "display_node": None, "prompt_id": job.id})
        self.steps.pop(job.id, None)
        self.previews.pop(job.id, None)

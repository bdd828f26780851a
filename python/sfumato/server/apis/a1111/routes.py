"""The AUTOMATIC1111 routes, ``/sdapi/v1`` and the ControlNet extension's, as module-level
handlers over the server's state (a FastAPI dependency)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import psutil
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from PIL import Image

import sfumato
from sfumato.errors import InvalidParameterError
from sfumato.families.embeddings import TEXT_WIDTHS, Embedding, sort_out
from sfumato.params import HIRES_UPSCALERS, SCHEDULER_NAMES
from sfumato.server.apis.a1111.infotext import infotext, parse_parameters, with_infotext
from sfumato.server.apis.a1111.options import current_model, options, restore_default_model, set_options
from sfumato.server.apis.a1111.schemas import (
    ExtraBatchImagesBody,
    ExtraBatchImagesResponse,
    ExtraSingleImageBody,
    ExtraSingleImageResponse,
    HonouredOptions,
    ImagesResponse,
    Img2ImgBody,
    PngInfoBody,
    PreviewOptions,
    ProgressResponse,
    ProgressState,
    Txt2ImgBody,
    validated,
)
from sfumato.server.apis.a1111.upscale import PIXEL_UPSCALERS, upscaled
from sfumato.server.errors import responses
from sfumato.server.jobs.loads import LoadKey
from sfumato.server.jobs.plan import JobPlan
from sfumato.server.jobs.store import CANCELLED, PROCESSING
from sfumato.server.models import names
from sfumato.server.planning import decode_image, job_plan, left_unset
from sfumato.server.state import ServerState, StateDep, client_key, require_key

PREFIX = "/sdapi/v1"
api = APIRouter(prefix=PREFIX)
extension = APIRouter(prefix="/controlnet")  # the ControlNet extension's own routes


def a1111_error(status: int, message: str) -> JSONResponse:
    """A1111's error shape, for what sfumato cannot do."""
    return JSONResponse({"error": "NotSupported", "detail": message, "body": "", "errors": message}, status_code=status)


def owner_of(request: Request) -> str:
    """The scope of a request's A1111 jobs: ``progress`` and ``interrupt`` see only the
    jobs that the same client (:func:`client_key`) sent through this API."""
    return f"a1111|{client_key(request)}"


def plan_for(state: ServerState, body: Txt2ImgBody) -> JobPlan:
    unit = body.control_unit()
    chosen = {**options(state), **body.override_settings}
    honoured = validated(HonouredOptions, chosen, "override_settings.")
    previews = validated(PreviewOptions, chosen, "override_settings.")
    extra = {**previews.params(), "clip_skip": honoured.clip_skip()}
    return job_plan(
        state,
        replace(body.to_params(), **extra),
        model=body.override_settings.get("sd_model_checkpoint"),
        sent_as=body.SENT_AS,
        unset=left_unset(body.sent_fields(), body.SENT_AS, body.sampler_name or body.sampler_index),
        refiner=body.refiner_checkpoint,
        refiner_switch_at=body.refiner_switch_at,
        control_net=unit.model if unit is not None else None,
        vae=honoured.vae(),
        file_type=honoured.file_type(),
        jpeg_quality=honoured.jpeg_quality,
    )


async def run(state: ServerState, kind: str, body: Txt2ImgBody, plan: JobPlan, owner: str) -> ImagesResponse:
    payload = body.model_dump(exclude={"init_images", "mask"})
    job = await state.wait_final(state.enqueue(kind, payload, plan, owner))
    params = plan.generation
    # What ran: the request's names, or those of the model's configured defaults.
    sent = body.sent_fields()
    sampler = (
        body.sampler_name or body.sampler_index
        if "sampler_name" in sent
        else names.sampler_title(params.sampling_method)
    )
    scheduler = body.scheduler or names.scheduler_title(params.scheduler)
    texts = [
        infotext(params, job.result.get("seed", params.seed) + i, sampler, scheduler, plan.model, kind == "img2img")
        for i in range(params.batch_count)
    ]
    made = [with_infotext(data, text) for data, text in zip(state.images(job), texts, strict=False)]
    images = [base64.b64encode(data).decode() for data in made] if body.send_images else []
    info = {
        "prompt": params.prompt,
        "negative_prompt": params.negative_prompt,
        "seed": job.result.get("seed"),
        "all_seeds": [job.result.get("seed", 0) + i for i in range(params.batch_count)],
        "width": params.width,
        "height": params.height,
        "sampler_name": sampler,
        "cfg_scale": params.cfg_scale,
        "steps": params.steps,
        "batch_size": body.batch_size,
        "sd_model_name": plan.model,
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": params.clip_skip,
        "interrupted": job.state == CANCELLED,
        "infotexts": texts[: len(made)],
    }
    return ImagesResponse(images=images, parameters=payload, info=json.dumps(info))


@api.post("/txt2img", response_model=ImagesResponse, responses=responses(409))
async def txt2img(state: StateDep, body: Txt2ImgBody, owner: str = Depends(owner_of)) -> ImagesResponse:
    return await run(state, "txt2img", body, plan_for(state, body), owner)


@api.post("/img2img", response_model=ImagesResponse, responses=responses(409))
async def img2img(state: StateDep, body: Img2ImgBody, owner: str = Depends(owner_of)) -> ImagesResponse:
    return await run(state, "img2img", body, plan_for(state, body), owner)


@api.get("/progress", response_model=ProgressResponse, responses=responses())
def progress(state: StateDep, skip_current_image: bool = False, owner: str = Depends(owner_of)) -> ProgressResponse:
    """The progress of this client's running A1111 job (its Basic-auth user, else its
    address; another client's or API's job is not shown), and its latest live preview
    as ``current_image`` (the options ``live_previews_enable`` and
    ``show_progress_every_n_steps`` govern them)."""
    jobs = state.store.active_of(owner)
    job = jobs[0] if jobs and jobs[0].state == PROCESSING else None
    if job is None:  # none of its jobs runs, on any worker
        return ProgressResponse(progress=0.0, eta_relative=0.0, state=ProgressState())
    step, steps = state.sampling_step(job) or (0, 0)  # from whichever worker runs it
    preview = state.preview(job.id)
    current = None
    if not skip_current_image and preview is not None:
        current = base64.b64encode(preview.png).decode()
    done = job.progress / 100.0
    elapsed = max(0.0, time.time() - (job.started or time.time()))
    eta = elapsed / done - elapsed if done > 0 else 0.0
    return ProgressResponse(
        progress=done,
        eta_relative=round(eta, 2),
        state=ProgressState(job=job.id, job_count=1, sampling_step=step, sampling_steps=steps),
        textinfo=job.phase,
        current_image=current,
        current_task=job.id,
    )


@api.post("/interrupt", responses=responses())
def interrupt(state: StateDep, owner: str = Depends(owner_of)) -> dict[str, Any]:
    """Stop this client's running A1111 job (never another client's or another API's);
    the A1111 request waiting on it gets the images it finished."""
    for job in state.store.active_of(owner):
        if job.state == PROCESSING:  # on whichever worker runs it
            state.runner.cancel(job.id)
    return {}


@api.get("/sd-models", responses=responses())
def sd_models(state: StateDep) -> list[dict[str, Any]]:
    """The models folder; ``title`` is the name ``options.sd_model_checkpoint`` says,
    ``sha256`` (and ``hash``, its first 10 digits) once a worker hashed the file."""
    return [
        {
            "title": e.file_name,
            "model_name": e.name,
            "hash": sha[:10] if sha else None,
            "sha256": sha,
            "filename": str(e.path),
            "config": None,
        }
        for e in state.catalog.models()
        for sha in [state.catalog.identity(e, compute=False)]
    ]


@api.get("/samplers", responses=responses())
def samplers() -> list[dict[str, Any]]:
    titles = names.SAMPLER_TITLES.items()
    return [{"name": name, "aliases": [engine], "options": {}} for name, (engine, _) in titles]


@api.get("/schedulers", responses=responses())
def schedulers() -> list[dict[str, Any]]:
    return [
        {
            "name": n,
            "label": n.replace("_", " ").title(),
            "aliases": None,
            "default_rho": -1,
            "need_inner_model": False,
        }
        for n in SCHEDULER_NAMES
    ]


@api.get("/upscalers", responses=responses())
def upscalers(state: StateDep) -> list[dict[str, Any]]:
    """The pixel resamplers, then the ESRGAN files of the upscalers folder."""
    found = [
        {"name": e.name, "model_name": "ESRGAN", "model_path": str(e.path), "model_url": None, "scale": 4}
        for e in state.catalog.upscalers()
    ]
    pixel = [
        {"name": n, "model_name": None, "model_path": None, "model_url": None, "scale": 4 if n != "None" else 1}
        for n in PIXEL_UPSCALERS
    ]
    return [*pixel, *found]


@api.get("/loras", responses=responses())
def loras(state: StateDep) -> list[dict[str, Any]]:
    return [{"name": e.name, "alias": e.name, "path": str(e.path), "metadata": {}} for e in state.catalog.loras()]


@extension.get("/model_list", responses=responses())
def controlnet_models(state: StateDep) -> dict[str, list[str]]:
    """The ControlNet folder, as A1111's ControlNet extension lists it."""
    return {"model_list": [e.name for e in state.catalog.controlnets()]}


@extension.get("/module_list", responses=responses())
def controlnet_modules() -> dict[str, list[str]]:
    """The preprocessors sfumato runs: none (requests send preprocessed images)."""
    return {"module_list": ["none"]}


@api.get("/embeddings", responses=responses())
def embeddings(state: StateDep) -> dict[str, Any]:
    """The embeddings folder, as A1111 lists it: ``loaded`` are those the current
    model's text encoders take, ``skipped`` the other embeddings."""
    found, unreadable = state.catalog.embeddings()
    entry = state.catalog.model(current_model(state) or "")
    usable = {}
    if entry is not None and entry.info is not None and entry.info.family in TEXT_WIDTHS:
        usable = sort_out(found, unreadable, entry.info.family)[0]

    def shape(e: Embedding) -> dict[str, Any]:
        return {
            "step": None,
            "sd_checkpoint": None,
            "sd_checkpoint_name": None,
            "shape": max(e.widths),
            "vectors": e.vectors,
        }

    return {
        "loaded": {e.name: shape(e) for e in found if e.name in usable},
        "skipped": {e.name: shape(e) for e in found if e.name not in usable},
    }


@api.get("/options", responses=responses())
def get_options(state: StateDep) -> dict[str, Any]:
    """A1111's settings store: its defaults for the keys clients read, and every key written."""
    return options(state)


@api.post("/options", responses=responses())
def post_options(state: StateDep, written: dict[str, Any]) -> None:
    """Store the settings given (durably, with the jobs). ``sd_model_checkpoint``
    switches the default model, and the keys of :class:`HonouredOptions` and
    :class:`PreviewOptions` take effect; any other key is stored and read back,
    and has no effect."""
    set_options(state, written)


@api.post("/extra-single-image", response_model=ExtraSingleImageResponse, responses=responses(409))
async def extra_single_image(
    state: StateDep, body: ExtraSingleImageBody, owner: str = Depends(owner_of)
) -> ExtraSingleImageResponse:
    image = decode_image(body.image, "image")
    big = await upscaled(state, image, body.upscaling_resize, body.upscaler_1, "upscaler_1", owner)
    return ExtraSingleImageResponse(image=base64.b64encode(big).decode())


@api.post("/extra-batch-images", response_model=ExtraBatchImagesResponse, responses=responses(409))
async def extra_batch_images(
    state: StateDep, body: ExtraBatchImagesBody, owner: str = Depends(owner_of)
) -> ExtraBatchImagesResponse:
    out = []
    for i, item in enumerate(body.imageList):
        raw = decode_image(item.data, f"imageList[{i}].data")
        big = await upscaled(state, raw, body.upscaling_resize, body.upscaler_1, "upscaler_1", owner)
        out.append(base64.b64encode(big).decode())
    return ExtraBatchImagesResponse(images=out)


@api.post("/png-info", responses=responses())
def png_info(body: PngInfoBody) -> dict[str, Any]:
    """The text an image carries; A1111's generation parameters read into fields."""
    raw = decode_image(body.image, "image")
    with Image.open(io.BytesIO(raw)) as image:
        items = {k: v for k, v in image.info.items() if isinstance(v, str)}
    text = items.pop("parameters", "")
    return {"info": text, "items": items, "parameters": parse_parameters(text) if text else {}}


@api.get("/latent-upscale-modes", responses=responses())
def latent_upscale_modes() -> list[dict[str, str]]:
    """The latent modes ``hr_upscaler`` takes (the pixel ones are among ``upscalers``)."""
    return [{"name": name} for name in HIRES_UPSCALERS if name.startswith("Latent")]


@api.get("/sd-vae", responses=responses())
def sd_vae(state: StateDep) -> list[dict[str, Any]]:
    """The VAEs folder: files ``sd_vae`` (or ``override_settings.sd_vae``) may name."""
    return [{"model_name": e.path.name, "filename": str(e.path)} for e in state.catalog.vaes()]


@api.get("/realesrgan-models", responses=responses())
def realesrgan_models(state: StateDep) -> list[dict[str, Any]]:
    return [{"name": e.name, "path": str(e.path), "scale": 4} for e in state.catalog.upscalers()]


@api.get("/scripts", responses=responses())
def scripts() -> dict[str, list[str]]:
    """Selectable scripts: none (ControlNet comes as ``alwayson_scripts.controlnet``)."""
    return {"txt2img": [], "img2img": []}


def none() -> list[dict[str, Any]]:
    return []


empty = {
    "hypernetworks": "Hypernetworks do not run in this engine: none.",
    "face-restorers": "Face restorers (CodeFormer, GFPGAN) do not run in this engine: none.",
    "prompt-styles": "Saved prompt styles: sfumato keeps none.",
    "script-info": "Selectable scripts' arguments: there are no such scripts.",
    "extensions": "A1111 extensions: sfumato has none (ControlNet's routes are its own).",
}
for route, description in empty.items():
    api.add_api_route(f"/{route}", none, methods=["GET"], responses=responses(), description=description)


@api.get("/memory", responses=responses())
async def memory() -> dict[str, Any]:
    """This machine's memory (psutil), and its first CUDA device's as the engine's
    device registry reports it; without one, ``cuda`` names the devices there are."""
    ram = psutil.virtual_memory()
    devices = await asyncio.to_thread(sfumato.list_devices)
    cuda = next((d for d in devices if d.name.startswith("CUDA")), None)
    if cuda is None:
        have = ", ".join(d.name for d in devices) or "none"
        gpu: dict[str, Any] = {"error": f"no CUDA device on this machine; the engine's devices: {have}"}
    else:
        used = cuda.memory_total - cuda.memory_free
        gpu = {"system": {"free": cuda.memory_free, "used": used, "total": cuda.memory_total}}
    return {"ram": {"free": ram.available, "used": ram.total - ram.available, "total": ram.total}, "cuda": gpu}


@api.get("/cmd-flags", responses=responses())
def cmd_flags(state: StateDep) -> dict[str, Any]:
    """How the server was started, under A1111's flag names where one means the same."""
    settings = state.settings
    return {
        "api": True,
        "nowebui": False,
        "listen": settings.host not in ("127.0.0.1", "localhost", "::1"),
        "port": settings.port,
        "ckpt_dir": str(settings.models_dir),
        "lora_dir": str(settings.loras_dir),
        "esrgan_models_path": str(settings.upscalers_dir),
        "embeddings_dir": str(settings.embeddings_dir),
        "controlnet_dir": str(settings.controlnets_dir),
        "data_dir": str(settings.data_dir),
        "api_auth": None,
        "api_server_stop": False,
    }


def refresh() -> None:
    """The folders are read on every request (a file's header once per change): nothing to do."""


for route in ("refresh-checkpoints", "refresh-vae", "refresh-loras", "refresh-embeddings"):
    api.add_api_route(f"/{route}", refresh, methods=["POST"], responses=responses())


@api.post("/unload-checkpoint", responses=responses())
def unload_checkpoint(state: StateDep) -> None:
    """Unload the models no job is running on (their worker processes end)."""
    state.runner.unload_idle()


@api.post("/reload-checkpoint", responses=responses())
async def reload_checkpoint(state: StateDep) -> None:
    """Load the current model now, rather than at the next request."""
    name = current_model(state)
    if name is None:
        raise InvalidParameterError("sd_model_checkpoint", "there is no model to load: the models folder is empty")
    await asyncio.to_thread(state.runner.load, LoadKey(name))


def not_here(reason: str) -> Callable[[], JSONResponse]:
    def answer() -> JSONResponse:
        return a1111_error(400, reason)  # a 4xx: the request is what this server does not do

    return answer


cannot = {
    "/interrogate": "sfumato cannot interrogate images (no CLIP or DeepBooru captioner runs here)",
    "/skip": "sfumato cannot skip one image of a running batch; POST /sdapi/v1/interrupt stops the job "
    "and answers the images it finished",
    "/create/embedding": "sfumato does not train: no embedding can be created here",
    "/create/hypernetwork": "sfumato does not train: no hypernetwork can be created here",
    "/train/embedding": "sfumato does not train embeddings",
    "/train/hypernetwork": "sfumato does not train hypernetworks",
    "/server-kill": "a client cannot stop the sfumato server; stop the process",
    "/server-restart": "a client cannot restart the sfumato server; restart the process",
    "/server-stop": "a client cannot stop the sfumato server; stop the process",
}
for path, reason in cannot.items():
    api.add_api_route(path, not_here(reason), methods=["POST"], responses={**responses(), 400: {"description": reason}})


def router(state: ServerState) -> APIRouter:
    """The A1111 routes, behind the server's API key; the model a client chose last is
    the default again."""
    restore_default_model(state)
    root = APIRouter(dependencies=[Depends(require_key(state.settings))], tags=["AUTOMATIC1111"])
    root.include_router(api)
    root.include_router(extension)
    return root

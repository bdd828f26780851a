"""The AUTOMATIC1111 web UI API, ``/sdapi/v1``, for the clients that speak it.

``txt2img`` and ``img2img`` answer when the images are ready, as A1111 does;
underneath they are jobs of the same durable queue as every other route, so
the queue limit, FIFO order and ``interrupt`` apply to them too.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import psutil
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from PIL import Image, PngImagePlugin
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

import sfumato
from sfumato import images as imaging
from sfumato.errors import InvalidParameterError
from sfumato.families.embeddings import TEXT_WIDTHS, Embedding, sort_out
from sfumato.params import (
    HIRES_UPSCALERS,
    MAX_BATCH,
    MAX_CONTROL_STRENGTH,
    MAX_SEED,
    REFINER_SWITCH_AT,
    SCHEDULER_NAMES,
    DiffusionParams,
)
from sfumato.server import names
from sfumato.server.errors import ApiError, responses
from sfumato.server.jobplan import FileType, Generation, JobPlan, Upscale
from sfumato.server.plans import decode_image, job_plan, left_unset, pick_entry, prompt_loras
from sfumato.server.state import ServerState, client_key, require_key
from sfumato.server.store import CANCELLED, DONE, PROCESSING

PREFIX = "/sdapi/v1"


CONTROL_UNIT = "alwayson_scripts.controlnet.args[0]"
Model = TypeVar("Model", bound=BaseModel)


def _validated(model: type[Model], data: object, prefix: str = "") -> Model:
    """``data`` as ``model``; its first problem as an error naming the field (``prefix`` + its place)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise InvalidParameterError(f"{prefix}{where}", error["msg"]) from None


class ControlUnit(BaseModel):
    """One unit of A1111's ControlNet extension (``alwayson_scripts.controlnet.args``):
    the fields sfumato honours; others (``resize_mode``, ``pixel_perfect``, ...) are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, description="a name from GET /controlnet/model_list")
    image: str | dict[str, Any] | None = Field(None, description="base64 image, or {'image': base64}")
    input_image: str | None = Field(None, description="the extension's older name for image")
    weight: float = Field(1.0, ge=0.0, le=MAX_CONTROL_STRENGTH)
    module: str = Field("none", description="the preprocessor: only 'none' (send a preprocessed image)")

    @field_validator("module")
    @classmethod
    def _no_preprocessor(cls, value: str) -> str:
        if value.lower() not in ("none", ""):
            raise ValueError(f"the preprocessor {value!r} does not run in sfumato; send a preprocessed image (none)")
        return value

    def image_bytes(self) -> bytes:
        image = self.image.get("image") if isinstance(self.image, dict) else self.image
        data = image or self.input_image
        field = "image" if image else "input_image"
        if not isinstance(data, str) or not data:
            raise InvalidParameterError(f"{CONTROL_UNIT}.image", "is required: the control image, base64")
        return decode_image(data, f"{CONTROL_UNIT}.{field}")


class Txt2ImgBody(BaseModel):
    """The fields of A1111's txt2img that sfumato honours, with A1111's defaults;
    other A1111 fields are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = Field(-1, ge=-1, le=MAX_SEED)
    sampler_name: str | None = None
    sampler_index: str = "Euler"
    scheduler: str | None = None
    batch_size: int = Field(1, ge=1, le=MAX_BATCH)
    n_iter: int = Field(1, ge=1, le=MAX_BATCH)
    steps: int = Field(50, ge=1, le=150)
    cfg_scale: float = Field(7.0, ge=0.0, le=30.0)
    width: int = Field(512, ge=64, le=2048)
    height: int = Field(512, ge=64, le=2048)
    override_settings: dict[str, Any] = Field(default_factory=dict)
    send_images: bool = True
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str = "Latent"
    hr_second_pass_steps: int = Field(0, ge=0, le=150)
    denoising_strength: float = Field(0.75, ge=0.0, le=1.0)
    refiner_checkpoint: str | None = None
    refiner_switch_at: float = Field(REFINER_SWITCH_AT, ge=0.0, le=1.0)
    alwayson_scripts: dict[str, Any] = Field(
        default_factory=dict, description="'controlnet': {'args': [one unit: image, model, weight, module 'none']}"
    )

    # The SDK's names of fields -> A1111's, for errors raised under the SDK's.
    SENT_AS: ClassVar[dict[str, str]] = {
        "model": "override_settings.sd_model_checkpoint", "batch_count": "batch_size", "hires.scale": "hr_scale",
        "hires.upscaler": "hr_upscaler", "hires.steps": "hr_second_pass_steps",
        "hires.denoising_strength": "denoising_strength", "control_net": f"{CONTROL_UNIT}.model",
        "control_image": f"{CONTROL_UNIT}.image", "control_strength": f"{CONTROL_UNIT}.weight",
        "vae": "override_settings.sd_vae", "sampling_method": "sampler_name",
    }  # fmt: skip

    def sent_fields(self) -> set[str]:
        """The fields the client sent; the legacy ``sampler_index`` counts as ``sampler_name``."""
        return self.model_fields_set | ({"sampler_name"} if "sampler_index" in self.model_fields_set else set())

    def control_unit(self) -> ControlUnit | None:
        """The enabled unit of ``alwayson_scripts.controlnet``, if any.

        Raises
        ------
        InvalidParameterError
            For a unit sfumato cannot run, naming its field.
        """
        script = self.alwayson_scripts.get("controlnet")
        if script is None:
            return None
        field = "alwayson_scripts.controlnet.args"
        args = script.get("args") if isinstance(script, dict) else None
        if not isinstance(args, list) or not all(isinstance(unit, dict) for unit in args):
            raise InvalidParameterError(field, "must be a list of ControlNet units (objects)")
        enabled = [(i, unit) for i, unit in enumerate(args) if unit.get("enabled", True)]
        if len(enabled) > 1:
            raise InvalidParameterError(f"{field}[{enabled[1][0]}]", "sfumato runs one ControlNet unit per request")
        if not enabled:
            return None
        i, unit = enabled[0]
        return _validated(ControlUnit, unit, f"{field}[{i}].")

    def to_params(self) -> DiffusionParams:
        """The SDK's params of this request: ``<lora:name:scale>`` tags become LoRAs,
        ``batch_size`` times ``n_iter`` images are made, and ``enable_hr`` adds the hires pass."""
        sampling_method, scheduler = names.sampler(self.sampler_name or self.sampler_index, "sampler_name")
        if self.scheduler is not None:
            scheduler = names.scheduler(self.scheduler, "scheduler")
        hires = None
        if self.enable_hr:
            hires = {"scale": self.hr_scale, "upscaler": self.hr_upscaler, "steps": self.hr_second_pass_steps,
                     "denoising_strength": self.denoising_strength}  # fmt: skip
        prompt, loras = prompt_loras(self.prompt)
        params = DiffusionParams(
            prompt=prompt, negative_prompt=self.negative_prompt, width=self.width, height=self.height,
            steps=self.steps, cfg_scale=self.cfg_scale, sampling_method=sampling_method, scheduler=scheduler,
            seed=self.seed, batch_count=self.batch_size * self.n_iter, hires=hires, loras=loras,
        )  # fmt: skip
        unit = self.control_unit()
        if unit is None:
            return params
        return replace(params, control_image=unit.image_bytes(), control_strength=unit.weight)


class Img2ImgBody(Txt2ImgBody):
    init_images: list[str] = Field(min_length=1, max_length=1)
    mask: str | None = None
    inpainting_mask_invert: int = Field(0, ge=0, le=1)

    def to_params(self) -> DiffusionParams:
        """:meth:`Txt2ImgBody.to_params` from ``init_images[0]``, with ``denoising_strength``; no hires pass."""
        mask = None
        if self.mask:
            grey = imaging.to_array(decode_image(self.mask, "mask"), "mask", mode="L")
            mask = imaging.encode_png(255 - grey if self.inpainting_mask_invert else grey)
        return replace(
            super().to_params(),
            hires=None,
            init_image=decode_image(self.init_images[0], "init_images"),
            mask=mask,
            strength=self.denoising_strength,
        )


# The settings A1111 clients read, with A1111's defaults. sfumato honours sd_model_checkpoint,
# HonouredOptions' and PreviewOptions' keys; every other key a client writes is stored and
# read back, and has no effect.
OPTION_DEFAULTS: dict[str, Any] = {
    "sd_model_checkpoint": None, "sd_checkpoint_hash": None, "sd_vae": "Automatic", "CLIP_stop_at_last_layers": 1,
    "samples_format": "png", "jpeg_quality": 80, "enable_pnginfo": True, "send_seed": True, "send_size": True,
    "eta_noise_seed_delta": 0, "eta_ddim": 0.0, "eta_ancestral": 1.0, "s_churn": 0.0, "s_tmin": 0.0,
    "s_noise": 1.0, "img2img_fix_steps": False, "sd_vae_overrides_per_model_preferences": True,
    "live_previews_enable": True, "show_progress_every_n_steps": 10, "show_progress_type": "Approx NN",
    "live_preview_content": "Prompt", "return_grid": True, "do_not_show_images": False, "samples_save": True,
    "outdir_samples": "", "sd_checkpoints_limit": 1, "upscaler_for_img2img": None,
}  # fmt: skip
SAMPLES_FORMATS: dict[str, FileType] = {"png": "png", "jpg": "jpg", "jpeg": "jpg", "webp": "webp"}
OWN_VAE = ("Automatic", "None", "")  # sd_vae values that keep the model's own VAE


class HonouredOptions(BaseModel):
    """The options sfumato acts on, checked as a client writes them."""

    model_config = ConfigDict(extra="ignore")

    CLIP_stop_at_last_layers: int = Field(1, ge=1, le=12)
    samples_format: str = "png"
    jpeg_quality: int = Field(80, ge=1, le=100)
    sd_vae: str = "Automatic"

    @field_validator("samples_format")
    @classmethod
    def _format(cls, value: str) -> str:
        if value.lower() not in SAMPLES_FORMATS:
            raise ValueError(f"is {value!r}; sfumato writes {', '.join(SAMPLES_FORMATS)}")
        return value

    def file_type(self) -> FileType:
        return SAMPLES_FORMATS[self.samples_format.lower()]

    def vae(self) -> str | None:
        """A VAE of the VAEs folder to decode with, or ``None``: the model's own."""
        return None if self.sd_vae in OWN_VAE else self.sd_vae

    def clip_skip(self) -> int:
        """The SDK's clip skip: A1111's 1 (every layer) is the family's own setting."""
        return DiffusionParams.clip_skip if self.CLIP_stop_at_last_layers <= 1 else self.CLIP_stop_at_last_layers


class PreviewOptions(BaseModel):
    """A1111's live-preview settings, with A1111's defaults: previews on, every 10
    steps. Every ``show_progress_type`` is served by the latent projection: the
    engine's VAE previews decode on every step whatever the interval, which on a
    CPU would add a whole decode to each step."""

    model_config = ConfigDict(extra="ignore")

    live_previews_enable: bool = True
    show_progress_every_n_steps: int = Field(default=10, ge=-1, le=1000)
    show_progress_type: str = "Approx NN"

    def params(self) -> dict[str, Any]:
        """The SDK's preview fields these settings ask for (0 or -1 steps: none while sampling)."""
        if not self.live_previews_enable or self.show_progress_every_n_steps <= 0:
            return {}
        return {"preview": "proj", "preview_interval": self.show_progress_every_n_steps}


class ImagesResponse(BaseModel):
    images: list[str]
    parameters: dict[str, Any]
    info: str


class ProgressState(BaseModel):
    skipped: bool = False
    interrupted: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: ProgressState
    current_image: str | None = None
    textinfo: str | None = None
    current_task: str | None = None


class ExtraSingleImageBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    image: str = Field(min_length=1)
    upscaling_resize: float = Field(2.0, gt=0.0, le=16.0)
    upscaler_1: str = "None"


class ExtraSingleImageResponse(BaseModel):
    html_info: str = ""
    image: str


class BatchImage(BaseModel):
    data: str = Field(min_length=1, description="base64 image")
    name: str = ""


class ExtraBatchImagesBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    imageList: list[BatchImage] = Field(min_length=1, max_length=16)  # noqa: N815 - A1111's name
    upscaling_resize: float = Field(2.0, gt=0.0, le=16.0)
    upscaler_1: str = "None"


class ExtraBatchImagesResponse(BaseModel):
    html_info: str = ""
    images: list[str]


class PngInfoBody(BaseModel):
    image: str = Field(min_length=1, description="base64 PNG")


# Pixel upscalers by A1111's names (no model): the resampling filter each is.
PIXEL_UPSCALERS = {"None": Image.Resampling.LANCZOS, "Lanczos": Image.Resampling.LANCZOS,
                   "Nearest": Image.Resampling.NEAREST}  # fmt: skip


def a1111_error(status: int, message: str) -> JSONResponse:
    """A1111's error shape, for what sfumato cannot do."""
    return JSONResponse({"error": "NotSupported", "detail": message,
                         "body": "", "errors": message}, status_code=status)  # fmt: skip


def infotext(params: Generation, seed: int, sampler: str, scheduler: str, model: str, img2img: bool) -> str:
    """A1111's generation-parameters text of one image: the prompt, ``Negative prompt:``,
    then ``Key: value, ...`` (a value with a comma or colon quoted), as its PNGs carry it."""
    fields: dict[str, Any] = {
        "Steps": params.steps, "Sampler": sampler, "Schedule type": scheduler,
        "CFG scale": params.cfg_scale, "Seed": seed, "Size": f"{params.width}x{params.height}", "Model": model,
    }  # fmt: skip
    if params.clip_skip > 1:
        fields["Clip skip"] = params.clip_skip
    if img2img:
        fields["Denoising strength"] = params.strength
    if params.hires is not None:
        upscaler = params.hires.upscaler
        fields.update({"Hires upscale": params.hires.scale, "Hires steps": params.hires.steps,
                       "Hires upscaler": upscaler if upscaler in HIRES_UPSCALERS else Path(upscaler).stem,
                       "Denoising strength": params.hires.denoising_strength})  # fmt: skip
    fields["Version"] = f"sfumato {sfumato.__version__}"
    quoted = (json.dumps(str(v)) if any(c in str(v) for c in ',:"\n') else str(v) for v in fields.values())
    lines = [params.prompt, *([f"Negative prompt: {params.negative_prompt}"] if params.negative_prompt else [])]
    return "\n".join([*lines, ", ".join(f"{k}: {v}" for k, v in zip(fields, quoted, strict=True))])


def with_infotext(data: bytes, text: str) -> bytes:
    """A PNG with A1111's ``parameters`` text chunk added (other formats as they are)."""
    if not data.startswith(b"\x89PNG"):
        return data
    meta = PngImagePlugin.PngInfo()
    meta.add_text("parameters", text)
    with Image.open(io.BytesIO(data)) as image:
        out = io.BytesIO()
        image.save(out, format="PNG", pnginfo=meta)
    return out.getvalue()


def parse_parameters(text: str) -> dict[str, Any]:
    """A1111's generation-parameters text (the prompt, ``Negative prompt: ...``, then
    ``Key: value, ...``) as fields."""
    lines = text.strip().split("\n")
    settings = lines.pop() if lines and re.match(r"^\w[\w ]*: ", lines[-1]) and ", " in lines[-1] else ""
    prompt: list[str] = []
    negative: list[str] = []
    in_negative = False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line.removeprefix("Negative prompt:").strip()
        (negative if in_negative else prompt).append(line)
    out: dict[str, Any] = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in re.findall(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)', settings):
        value = value.strip()
        out[key.strip()] = json.loads(value) if value.startswith('"') else value
    return out


def owner_of(request: Request) -> str:
    """The scope of a request's A1111 jobs: ``progress`` and ``interrupt`` see only the
    jobs that the same client (:func:`client_key`) sent through this API."""
    return f"a1111|{client_key(request)}"


def router(state: ServerState) -> APIRouter:
    api = APIRouter(prefix=PREFIX)
    extension = APIRouter(prefix="/controlnet")  # the ControlNet extension's own routes

    def options() -> dict[str, Any]:
        """A1111's settings: its defaults, what clients stored, and the current model's title."""
        current = state.catalog.model(current_model() or "")
        return {**OPTION_DEFAULTS, **state.store.options(),
                "sd_model_checkpoint": current.file_name if current else None}  # fmt: skip

    stored = state.store.options().get("sd_model_checkpoint")
    if state.settings.default_model is None and isinstance(stored, str):
        # The model a client chose last, unless the server was started with one.
        state.runner.default_model = next((e.name for e in state.catalog.models() if stored == e.file_name), None)

    def plan_for(body: Txt2ImgBody) -> JobPlan:
        unit = body.control_unit()
        chosen = {**options(), **body.override_settings}
        honoured = _validated(HonouredOptions, chosen, "override_settings.")
        previews = _validated(PreviewOptions, chosen, "override_settings.")
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

    async def run(kind: str, body: Txt2ImgBody, plan: JobPlan, owner: str) -> ImagesResponse:
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
        texts = [infotext(params, job.result.get("seed", params.seed) + i, sampler, scheduler, plan.model,
                          kind == "img2img") for i in range(params.batch_count)]  # fmt: skip
        made = [with_infotext(data, text) for data, text in zip(state.images(job), texts, strict=False)]
        images = [base64.b64encode(data).decode() for data in made] if body.send_images else []
        info = {
            "prompt": params.prompt, "negative_prompt": params.negative_prompt, "seed": job.result.get("seed"),
            "all_seeds": [job.result.get("seed", 0) + i for i in range(params.batch_count)],
            "width": params.width, "height": params.height, "sampler_name": sampler,
            "cfg_scale": params.cfg_scale, "steps": params.steps, "batch_size": body.batch_size,
            "sd_model_name": plan.model, "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": params.clip_skip,
            "interrupted": job.state == CANCELLED, "infotexts": texts[: len(made)],
        }  # fmt: skip
        return ImagesResponse(images=images, parameters=payload, info=json.dumps(info))

    @api.post("/txt2img", response_model=ImagesResponse, responses=responses(409))
    async def txt2img(body: Txt2ImgBody, owner: str = Depends(owner_of)) -> ImagesResponse:
        return await run("txt2img", body, plan_for(body), owner)

    @api.post("/img2img", response_model=ImagesResponse, responses=responses(409))
    async def img2img(body: Img2ImgBody, owner: str = Depends(owner_of)) -> ImagesResponse:
        return await run("img2img", body, plan_for(body), owner)

    @api.get("/progress", response_model=ProgressResponse, responses=responses())
    def progress(skip_current_image: bool = False, owner: str = Depends(owner_of)) -> ProgressResponse:
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
            textinfo=job.phase, current_image=current, current_task=job.id,
        )  # fmt: skip

    @api.post("/interrupt", responses=responses())
    def interrupt(owner: str = Depends(owner_of)) -> dict[str, Any]:
        """Stop this client's running A1111 job (never another client's or another API's);
        the A1111 request waiting on it gets the images it finished."""
        for job in state.store.active_of(owner):
            if job.state == PROCESSING:  # on whichever worker runs it
                state.runner.cancel(job.id)
        return {}

    @api.get("/sd-models", responses=responses())
    def sd_models() -> list[dict[str, Any]]:
        """The models folder; ``title`` is the name ``options.sd_model_checkpoint`` says,
        ``sha256`` (and ``hash``, its first 10 digits) once a worker hashed the file."""
        return [
            {"title": e.file_name, "model_name": e.name, "hash": sha[:10] if sha else None, "sha256": sha,
             "filename": str(e.path), "config": None}
            for e in state.catalog.models()
            for sha in [state.catalog.identity(e, compute=False)]
        ]  # fmt: skip

    @api.get("/samplers", responses=responses())
    def samplers() -> list[dict[str, Any]]:
        titles = names.SAMPLER_TITLES.items()
        return [{"name": name, "aliases": [engine], "options": {}} for name, (engine, _) in titles]

    @api.get("/schedulers", responses=responses())
    def schedulers() -> list[dict[str, Any]]:
        return [{"name": n, "label": n.replace("_", " ").title(), "aliases": None, "default_rho": -1,
                 "need_inner_model": False} for n in SCHEDULER_NAMES]  # fmt: skip

    @api.get("/upscalers", responses=responses())
    def upscalers() -> list[dict[str, Any]]:
        """The pixel resamplers, then the ESRGAN files of the upscalers folder."""
        found = [{"name": e.name, "model_name": "ESRGAN", "model_path": str(e.path), "model_url": None, "scale": 4}
                 for e in state.catalog.upscalers()]  # fmt: skip
        pixel = [{"name": n, "model_name": None, "model_path": None, "model_url": None, "scale": 4 if n != "None"
                  else 1} for n in PIXEL_UPSCALERS]  # fmt: skip
        return [*pixel, *found]

    @api.get("/loras", responses=responses())
    def loras() -> list[dict[str, Any]]:
        return [{"name": e.name, "alias": e.name, "path": str(e.path), "metadata": {}} for e in state.catalog.loras()]

    @extension.get("/model_list", responses=responses())
    def controlnet_models() -> dict[str, list[str]]:
        """The ControlNet folder, as A1111's ControlNet extension lists it."""
        return {"model_list": [e.name for e in state.catalog.controlnets()]}

    @extension.get("/module_list", responses=responses())
    def controlnet_modules() -> dict[str, list[str]]:
        """The preprocessors sfumato runs: none (requests send preprocessed images)."""
        return {"module_list": ["none"]}

    @api.get("/embeddings", responses=responses())
    def embeddings() -> dict[str, Any]:
        """The embeddings folder, as A1111 lists it: ``loaded`` are those the current
        model's text encoders take, ``skipped`` the other embeddings."""
        found, unreadable = state.catalog.embeddings()
        entry = state.catalog.model(current_model() or "")
        usable = {}
        if entry is not None and entry.info is not None and entry.info.family in TEXT_WIDTHS:
            usable = sort_out(found, unreadable, entry.info.family)[0]

        def shape(e: Embedding) -> dict[str, Any]:
            return {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": max(e.widths),
                    "vectors": e.vectors}  # fmt: skip

        return {
            "loaded": {e.name: shape(e) for e in found if e.name in usable},
            "skipped": {e.name: shape(e) for e in found if e.name not in usable},
        }

    def current_model() -> str | None:
        available = state.catalog.models()
        return state.runner.default_model or (available[0].name if available else None)

    @api.get("/options", responses=responses())
    def get_options() -> dict[str, Any]:
        """A1111's settings store: its defaults for the keys clients read, and every key written."""
        return options()

    @api.post("/options", responses=responses())
    def set_options(written: dict[str, Any]) -> None:
        """Store the settings given (durably, with the jobs). ``sd_model_checkpoint``
        switches the default model, and the keys of :class:`HonouredOptions` and
        :class:`PreviewOptions` take effect; any other key is stored and read back,
        and has no effect."""
        merged = {**options(), **written}
        vae = _validated(HonouredOptions, merged).vae()
        _validated(PreviewOptions, merged)
        if vae is not None and state.catalog.vae(vae) is None:
            have = ", ".join([*OWN_VAE[:2], *(e.path.name for e in state.catalog.vaes())])
            raise InvalidParameterError("sd_vae", f"no VAE named {vae!r}; available: {have}")
        if "sd_model_checkpoint" in written:
            if not isinstance(written["sd_model_checkpoint"], str):
                raise InvalidParameterError("sd_model_checkpoint", "must be a model's title or name")
            entry = pick_entry(state, written["sd_model_checkpoint"], "sd_model_checkpoint")
            state.runner.default_model = entry.name
            written = {**written, "sd_model_checkpoint": entry.file_name}
        state.store.set_options(written)

    async def upscaled(raw: bytes, resize: float, upscaler: str, field: str, owner: str) -> bytes:
        """``raw`` resized by ``resize`` with ``upscaler`` (an ESRGAN of the folder, run in
        x4 passes until the factor is reached, then resized to it; or a resampling filter)."""
        with Image.open(io.BytesIO(raw)) as source:
            size = (round(source.width * resize), round(source.height * resize))
            repeats = max(1, math.ceil(math.log(resize, 4) - 1e-9))
            passes = source.width * source.height * 16**repeats if upscaler not in PIXEL_UPSCALERS else 0
            largest = max(size[0] * size[1], passes)
        if min(size) < 1 or largest > imaging.MAX_INPUT_PIXELS:
            raise InvalidParameterError(
                "upscaling_resize", f"would make a {size[0]}x{size[1]} image; sides must be at least 1 and "
                f"images (the x4 passes included) at most {imaging.MAX_INPUT_PIXELS} pixels",
            )  # fmt: skip
        if upscaler in PIXEL_UPSCALERS:
            big = raw
        else:
            found = [e.name for e in state.catalog.upscalers()]
            if upscaler not in found:
                have = ", ".join([*PIXEL_UPSCALERS, *found])
                raise InvalidParameterError(field, f"no upscaler named {upscaler!r}; available: {have}")
            plan = JobPlan(model=upscaler, work=Upscale(image=raw, repeats=repeats))
            payload = {"upscaling_resize": resize, "upscaler_1": upscaler}
            job = await state.wait_final(state.enqueue("extra-single-image", payload, plan, owner))
            images = state.images(job)
            if job.state != DONE or not images:
                raise ApiError(409, "job_ended", f"the upscale ended {job.state}: {job.error}")
            big = images[0]
        with Image.open(io.BytesIO(big)) as image:
            out = io.BytesIO()
            image.convert("RGB").resize(size, PIXEL_UPSCALERS.get(upscaler, Image.Resampling.LANCZOS)).save(
                out, format="PNG"
            )
        return out.getvalue()

    @api.post("/extra-single-image", response_model=ExtraSingleImageResponse, responses=responses(409))
    async def extra_single_image(
        body: ExtraSingleImageBody, owner: str = Depends(owner_of)
    ) -> ExtraSingleImageResponse:
        image = decode_image(body.image, "image")
        big = await upscaled(image, body.upscaling_resize, body.upscaler_1, "upscaler_1", owner)
        return ExtraSingleImageResponse(image=base64.b64encode(big).decode())

    @api.post("/extra-batch-images", response_model=ExtraBatchImagesResponse, responses=responses(409))
    async def extra_batch_images(
        body: ExtraBatchImagesBody, owner: str = Depends(owner_of)
    ) -> ExtraBatchImagesResponse:
        out = []
        for i, item in enumerate(body.imageList):
            raw = decode_image(item.data, f"imageList[{i}].data")
            big = await upscaled(raw, body.upscaling_resize, body.upscaler_1, "upscaler_1", owner)
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
    def sd_vae() -> list[dict[str, Any]]:
        """The VAEs folder: files ``sd_vae`` (or ``override_settings.sd_vae``) may name."""
        return [{"model_name": e.path.name, "filename": str(e.path)} for e in state.catalog.vaes()]

    @api.get("/realesrgan-models", responses=responses())
    def realesrgan_models() -> list[dict[str, Any]]:
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
    def memory() -> dict[str, Any]:
        """This machine's memory (psutil); ``cuda`` says why there is no CUDA figure."""
        ram = psutil.virtual_memory()
        return {
            "ram": {"free": ram.available, "used": ram.total - ram.available, "total": ram.total},
            "cuda": {"error": "sfumato's engine runs on the CPU in this build: no CUDA device"},
        }

    @api.get("/cmd-flags", responses=responses())
    def cmd_flags() -> dict[str, Any]:
        """How the server was started, under A1111's flag names where one means the same."""
        settings = state.settings
        return {
            "api": True, "nowebui": False, "listen": settings.host not in ("127.0.0.1", "localhost", "::1"),
            "port": settings.port, "ckpt_dir": str(settings.models_dir), "lora_dir": str(settings.loras_dir),
            "esrgan_models_path": str(settings.upscalers_dir), "embeddings_dir": str(settings.embeddings_dir),
            "controlnet_dir": str(settings.controlnets_dir), "data_dir": str(settings.data_dir),
            "api_auth": None, "api_server_stop": False,
        }  # fmt: skip

    def refresh() -> None:
        """The folders are read on every request (a file's header once per change): nothing to do."""

    for route in ("refresh-checkpoints", "refresh-vae", "refresh-loras", "refresh-embeddings"):
        api.add_api_route(f"/{route}", refresh, methods=["POST"], responses=responses())

    @api.post("/unload-checkpoint", responses=responses())
    def unload_checkpoint() -> None:
        """Unload the models no job is running on (their worker processes end)."""
        state.runner.unload_idle()

    @api.post("/reload-checkpoint", responses=responses())
    async def reload_checkpoint() -> None:
        """Load the current model now, rather than at the next request."""
        name = current_model()
        if name is None:
            raise InvalidParameterError("sd_model_checkpoint", "there is no model to load: the models folder is empty")
        await asyncio.to_thread(state.runner.model_id, name)

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
    }  # fmt: skip
    for path, reason in cannot.items():
        api.add_api_route(
            path, not_here(reason), methods=["POST"], responses={**responses(), 400: {"description": reason}}
        )

    root = APIRouter(dependencies=[Depends(require_key(state.settings))], tags=["AUTOMATIC1111"])
    root.include_router(api)
    root.include_router(extension)
    return root

"""The job-queue API: ``/hello``, ``/models``, ``/loras``, ``/upscalers``,
``POST /txt2img`` and ``POST /img2img`` (answered with a job id), ``GET /queue/{job_id}``,
plus ``DELETE /queue/{job_id}`` (cancel) and ``GET /queue/{job_id}/events`` (SSE)."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any, ClassVar, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response, StreamingResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from sfumato.families.detect import FAMILY_NAMES
from sfumato.limits import field
from sfumato.params import ANY_FAMILY_SIDE_MULTIPLE, DiffusionParams
from sfumato.server.errors import ApiError, responses
from sfumato.server.jobs.plan import JobPlan
from sfumato.server.jobs.store import DONE, FINAL, Job, JobStore
from sfumato.server.models import names
from sfumato.server.planning import carried, decode_image, job_plan, left_unset
from sfumato.server.settings import ServerSettings
from sfumato.server.state import ServerState, StateDep, require_key, stored_images


class LoRA(BaseModel):
    name: str
    scale: float = field("job_queue", "loras.scale")


class HiresFields(BaseModel):
    enabled: bool = False
    scale: float = field("job_queue", "hires.scale")
    upscaler: str = "Latent"
    steps: int = field("job_queue", "hires.steps")
    denoising_strength: float = field("job_queue", "hires.denoising_strength")


class Txt2ImgRequest(BaseModel):
    """The job-queue API's request, with its defaults; ``seed`` (-1: random) added."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)
    negative_prompt: str = ""
    steps: int = field("job_queue", "steps")
    cfg_scale: float = field("job_queue", "cfg_scale")
    width: int = field("job_queue", "width")
    height: int = field("job_queue", "height")
    model: str | None = Field(None, description="a name from GET /models (default: the server's default model)")
    sampler_name: str = "DPM++ 2M Karras"
    scheduler_type: str = "karras"
    fileType: Literal["jpg", "png"] = "jpg"  # noqa: N815 - the job-queue API's field name
    jpeg_quality: int = field("job_queue", "jpeg_quality")
    loras: list[LoRA | str] = Field(default_factory=list)
    hires: HiresFields | None = None
    refiner_checkpoint: str | None = None
    refiner_switch_at: float = field("job_queue", "refiner_switch_at")
    seed: int = field("job_queue", "seed")
    flow_shift: float | None = field(
        "job_queue", "flow_shift", description="a flow-matching model's sigma shift (None: the model's own)"
    )
    preview: bool = Field(False, description="live previews: 'preview' events on GET /queue/{job_id}/events")
    preview_interval: int = field(
        "job_queue", "preview_interval", description="a preview every this many sampling steps"
    )

    # The SDK's names of fields -> this request's, for errors raised under the SDK's.
    SENT_AS: ClassVar[dict[str, str]] = {"sampling_method": "sampler_name", "scheduler": "scheduler_type"}

    def to_params(self) -> DiffusionParams:
        """The SDK's params of this request; LoRA and upscaler names are the server's folders'."""
        sampling_method, scheduler = names.sampler(self.sampler_name, "sampler_name")
        # scheduler_type applies unless left at its default while the sampler's name implies one.
        if "scheduler_type" in self.model_fields_set or scheduler is None:
            scheduler = names.scheduler(self.scheduler_type, "scheduler_type")
        loras = [{"name": lora} if isinstance(lora, str) else lora.model_dump() for lora in self.loras]
        same = (
            *("prompt", "negative_prompt", "width", "height", "steps", "cfg_scale", "seed", "preview_interval"),
            "flow_shift",
        )
        return DiffusionParams(
            **carried(self, same),
            sampling_method=sampling_method,
            scheduler=scheduler,
            hires=self.hires.model_dump() if self.hires else None,
            loras=loras,
            preview="proj" if self.preview else None,
        )


class Img2ImgRequest(Txt2ImgRequest):
    """:class:`Txt2ImgRequest` plus the source image (base64 PNG/JPEG) and ``strength``."""

    init_image: str = Field(min_length=1, description="base64 PNG or JPEG")
    strength: float = field("job_queue", "strength")
    mask: str | None = Field(None, description="base64 mask image for inpainting: white is painted anew")
    img_cfg_scale: float | None = field(
        "job_queue", "img_cfg_scale", description="an instruct-pix2pix model's image guidance (None: cfg_scale)"
    )

    def to_params(self) -> DiffusionParams:
        return replace(
            super().to_params(),
            init_image=decode_image(self.init_image, "init_image"),
            mask=decode_image(self.mask, "mask") if self.mask else None,
            strength=self.strength,
            img_cfg_scale=self.img_cfg_scale,
        )


class JobAccepted(BaseModel):
    job_id: str
    status: Literal["queued"] = "queued"


class ModelEntry(BaseModel):
    name: str
    type: Literal["standard", "sdxl"]
    path: str
    family: str


class Success(BaseModel):
    """The job-queue API's ``status`` field, which every successful answer carries."""

    status: Literal["success", "error"] = "success"


class ModelsResponse(Success):
    models: list[ModelEntry]


class LorasResponse(Success):
    loras: list[LoRA]


class UpscalerInfo(BaseModel):
    name: str
    path: str


class UpscalersResponse(Success):
    upscalers: list[UpscalerInfo]


class QueueStatusResponse(Success):
    job_id: str
    progress: float
    current_phase: str
    state: str
    error: str | None = None
    payload: dict[str, Any] | None = None
    image: str | None = None
    output_path: str | None = None
    width: int | None = None
    height: int | None = None
    file_type: Literal["jpg", "png"] | None = None
    jpeg_quality: int | None = None
    generation_time_sec: float | None = None
    memory_before_mb: float | None = None
    memory_after_mb: float | None = None
    decoder: str | None = Field(default=None, description="what decoded the latents: 'vae', or 'taesd'")
    device: str | None = Field(default=None, description="the engine device the job ran on ('CPU', 'Vulkan0')")
    images: list[str] | None = Field(default=None, description="every image of a job that made several (base64)")
    output_paths: list[str] | None = None


class JobSummary(BaseModel):
    job_id: str
    kind: str
    state: str
    progress: float
    current_phase: str
    prompt: str
    created: float
    error: str | None = None
    payload: dict[str, Any] = Field(description="the request's fields as its API took them, images left out")
    seed: int | None = Field(None, description="the seed the job ran with (a random one drawn), once it is done")


class JobList(Success):
    jobs: list[JobSummary]


# The fields the web page's form offers, with their bounds read from the request schema.
FORM_FIELDS = ("steps", "cfg_scale", "width", "height", "seed", "strength", "sampler_name", "scheduler_type")
THUMBNAIL_SIDE = 128


class Limits(Success):
    """What a form needs to offer only what this server accepts (the web page reads it)."""

    max_pixels: int = Field(description="the largest width x height of one image")
    max_steps: int
    max_images: int
    max_prompt_chars: int
    side_multiple: int = Field(description="width and height are multiples of this")
    minimum: dict[str, int | float] = Field(description="the smallest value of each numeric field")
    maximum: dict[str, int | float] = Field(description="the largest value of each numeric field")
    defaults: dict[str, Any] = Field(description="what each field is when a request leaves it out")
    samplers: list[str]
    schedulers: list[str]


def limits(settings: ServerSettings) -> Limits:
    """The form's bounds: the request schema's, narrowed by the server's own limits."""
    schema = Img2ImgRequest.model_json_schema()["properties"]
    fields = {name: schema[name] for name in FORM_FIELDS}
    maximum = {name: f["maximum"] for name, f in fields.items() if "maximum" in f}
    maximum["steps"] = min(maximum["steps"], settings.max_steps)
    # A side may be long while the other is short; the page checks width x height itself.
    for side in ("width", "height"):
        longest = min(maximum[side], settings.max_pixels // ANY_FAMILY_SIDE_MULTIPLE)
        maximum[side] = longest - longest % ANY_FAMILY_SIDE_MULTIPLE
    return Limits(
        max_pixels=settings.max_pixels,
        max_steps=settings.max_steps,
        max_images=settings.max_images,
        max_prompt_chars=settings.max_prompt_chars,
        side_multiple=ANY_FAMILY_SIDE_MULTIPLE,
        minimum={name: f["minimum"] for name, f in fields.items() if "minimum" in f},
        maximum=maximum,
        defaults={name: f["default"] for name, f in fields.items()},
        samplers=list(names.SAMPLER_TITLES),
        schedulers=list(names.SCHEDULER_TITLES),
    )


def thumbnail(data: bytes, side: int) -> bytes:
    """A PNG of the image ``data``, its longer side at most ``side`` pixels."""
    with Image.open(io.BytesIO(data)) as image:
        image.thumbnail((side, side))
        out = io.BytesIO()
        image.save(out, format="PNG")
    return out.getvalue()


def plan(state: ServerState, request: Txt2ImgRequest) -> JobPlan:
    """Check a request completely and turn it into what the runner executes.

    Raises
    ------
    InvalidParameterError
        Naming the field at fault.
    """
    return job_plan(
        state,
        request.to_params(),
        model=request.model,
        sent_as=request.SENT_AS,
        unset=left_unset(request.model_fields_set, request.SENT_AS, request.sampler_name),
        refiner=request.refiner_checkpoint,
        refiner_switch_at=request.refiner_switch_at,
        file_type=request.fileType,
        jpeg_quality=request.jpeg_quality,
    )


def _prompt(job: Job) -> str:
    """A stored job's prompt for the history list, read without decoding its images."""
    return JobPlan.stored_prompt(job.request["plan"])


def status_of(store: JobStore, job: Job) -> QueueStatusResponse:
    """The job-queue API's queue status of a job; the image and payload once it is done."""
    out = QueueStatusResponse(
        status="error" if job.state == "error" else "success",
        job_id=job.id,
        progress=job.progress,
        current_phase=job.phase,
        state=job.state,
        error=job.error,
    )
    if job.state == DONE:
        result = job.result
        paths = result["output_paths"]
        images = [base64.b64encode(data).decode() if data is not None else None for data in stored_images(store, job)]
        out.payload = job.request["payload"]
        out.image, out.output_path = images[0], paths[0]
        for key in (
            "width",
            "height",
            "file_type",
            "jpeg_quality",
            "generation_time_sec",
            "memory_before_mb",
            "memory_after_mb",
            "decoder",
            "device",
        ):
            setattr(out, key, result.get(key))
        if len(paths) > 1:
            out.output_paths = paths
            out.images = [image for image in images if image is not None]
    return out


api = APIRouter(tags=["job queue"])


@api.get("/models", response_model=ModelsResponse, responses=responses())
def models(state: StateDep) -> ModelsResponse:
    return ModelsResponse(
        models=[
            ModelEntry(
                name=e.name,
                type="sdxl" if e.info and e.info.family == "sdxl" else "standard",
                path=str(e.path),
                family=FAMILY_NAMES[e.info.family] if e.info else "unknown",
            )
            for e in state.catalog.models()
        ]
    )


@api.get("/loras", response_model=LorasResponse, responses=responses())
def loras(state: StateDep) -> LorasResponse:
    return LorasResponse(loras=[LoRA(name=e.name) for e in state.catalog.loras()])


@api.get("/upscalers", response_model=UpscalersResponse, responses=responses())
def upscalers(state: StateDep) -> UpscalersResponse:
    found = [UpscalerInfo(name=e.name, path=str(e.path)) for e in state.catalog.upscalers()]
    return UpscalersResponse(upscalers=[UpscalerInfo(name="Latent", path="internal"), *found])


def accept(state: ServerState, kind: str, request: Txt2ImgRequest) -> JobAccepted:
    job_plan = plan(state, request)
    payload = request.model_dump(exclude={"init_image", "mask"} if kind == "img2img" else None)
    return JobAccepted(job_id=state.enqueue(kind, payload, job_plan))


@api.post("/txt2img", response_model=JobAccepted, responses=responses(409))
def txt2img(state: StateDep, request: Txt2ImgRequest) -> JobAccepted:
    return accept(state, "txt2img", request)


@api.post("/img2img", response_model=JobAccepted, responses=responses(409))
def img2img(state: StateDep, request: Img2ImgRequest) -> JobAccepted:
    return accept(state, "img2img", request)


@api.get("/queue", response_model=JobList, responses=responses())
def recent(state: StateDep, limit: int = Query(20, ge=1, le=200)) -> JobList:
    """The newest jobs, newest first (the web page's history)."""
    return JobList(
        jobs=[
            JobSummary(
                job_id=j.id,
                kind=j.kind,
                state=j.state,
                progress=j.progress,
                current_phase=j.phase,
                prompt=_prompt(j),
                created=j.created,
                error=j.error,
                payload=j.request["payload"],
                seed=j.result.get("seed") if j.state == DONE else None,
            )
            for j in state.store.recent(limit)
        ]
    )


@api.get("/queue/{job_id}", response_model=QueueStatusResponse, responses=responses(404))
def queue_status(state: StateDep, job_id: str) -> QueueStatusResponse:
    return status_of(state.store, state.find(job_id))


@api.get("/limits", response_model=Limits, responses=responses())
def form_limits(state: StateDep) -> Limits:
    """The bounds of each request field on this server, its defaults, samplers and schedulers."""
    return limits(state.settings)


@api.get(
    "/queue/{job_id}/thumbnail",
    responses={**responses(404, 409), 200: {"content": {"image/png": {}}, "description": "a small PNG"}},
)
def job_thumbnail(state: StateDep, job_id: str, size: int = Query(THUMBNAIL_SIDE, ge=16, le=512)) -> Response:
    """The first image of a finished job, its longer side at most ``size`` pixels."""
    job = state.find(job_id)
    if job.state != DONE:
        raise ApiError(409, "no_image", f"job {job_id!r} has no image: it is {job.state}", "job_id")
    image = next(iter(stored_images(state.store, job)), None)
    if image is None:
        raise ApiError(404, "not_found", f"the image of job {job_id!r} is gone from the outputs folder", "job_id")
    return Response(thumbnail(image, size), media_type="image/png")


@api.delete("/queue/{job_id}", response_model=QueueStatusResponse, responses=responses(404, 409))
def cancel(state: StateDep, job_id: str) -> QueueStatusResponse:
    job = state.find(job_id)
    if job.state in FINAL or not state.runner.cancel(job_id):
        raise ApiError(409, "job_ended", f"job {job_id!r} has ended already ({state.find(job_id).state})", "job_id")
    return status_of(state.store, state.find(job_id))


@api.get(
    "/queue/{job_id}/events",
    responses={**responses(404), 200: {"content": {"text/event-stream": {}}, "description": "progress events"}},
)
async def events(state: StateDep, job_id: str, request: Request) -> StreamingResponse:
    state.find(job_id)

    async def stream() -> AsyncIterator[str]:
        shown = 0
        async for job in state.follow(job_id, request):
            preview = state.preview(job_id)
            if preview is not None and preview.serial > shown:
                shown = preview.serial
                image = {
                    "job_id": job_id,
                    "step": preview.step,
                    "total_steps": preview.total_steps,
                    "image": base64.b64encode(preview.png).decode(),
                }
                yield f"event: preview\ndata: {json.dumps(image)}\n\n"
            body = {
                "job_id": job.id,
                "state": job.state,
                "progress": job.progress,
                "current_phase": job.phase,
                "error": job.error,
            }
            yield f"event: progress\ndata: {json.dumps(body)}\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream")


def router(state: ServerState) -> APIRouter:
    """These routes, behind the server's API key."""
    root = APIRouter(dependencies=[Depends(require_key(state.settings))])
    root.include_router(api)
    return root

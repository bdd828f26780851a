"""The OpenAI images API: ``POST /v1/images/generations`` and ``/v1/images/edits``.

Both answer ``b64_json`` images when the job ends (they are jobs of the same
durable queue as every other route). With ``stream: true`` the answer is an
SSE stream instead: ``image_generation.progress`` / ``image_edit.progress``
events while the job runs (sfumato's own event type: ``progress`` 0..1,
``phase``), with ``partial_images`` (1..3) up to that many
``image_generation.partial_image`` / ``image_edit.partial_image`` events (a
preview of the image as it forms: the latent projected to RGB, an eighth of the
side), then one ``image_generation.completed`` / ``image_edit.completed`` event
per image, or one ``error`` event.

OpenAI's own model names (``dall-e-*``, ``gpt-image-*``) run the server's
default model, so that clients work unchanged. ``quality`` picks the number
of sampling steps unless the sfumato field ``steps`` is given; ``steps``,
``negative_prompt``, ``cfg_scale``, ``img_cfg_scale`` (an instruct-pix2pix
model's image guidance), ``seed``, ``sampler`` and ``scheduler`` are accepted as
extra fields (form fields of an edit).
"""

from __future__ import annotations

import base64
import io
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, replace
from typing import Annotated, Any, ClassVar, Literal

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import StreamingResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from sfumato import images as imaging
from sfumato.errors import InvalidParameterError
from sfumato.limits import field, limit
from sfumato.params import ANY_FAMILY_SIDE_MULTIPLE, DEFAULT_SIZE, DiffusionParams
from sfumato.server.errors import ApiError, responses
from sfumato.server.jobs.plan import FileType, JobPlan
from sfumato.server.jobs.store import CANCELLED, ERROR
from sfumato.server.models import names
from sfumato.server.planning import check_image, job_plan, left_unset
from sfumato.server.state import ServerState, StateDep, require_key

PREFIX = "/v1/images"

# quality -> sampling steps (when the request does not say ``steps``).
QUALITY_STEPS = {"low": 10, "medium": 20, "high": 30, "xhigh": 40, "max": 50, "standard": 20, "hd": 30, "auto": 20}
Quality = Literal["low", "medium", "high", "xhigh", "max", "standard", "hd", "auto"]
OutputFormat = Literal["png", "jpeg", "webp"]
OPENAI_MODEL = re.compile(r"^(dall-e|gpt-image)")
SIZE = re.compile(r"^(\d{2,5})x(\d{2,5})$")


def _form(name: str) -> Any:
    """A multipart form field with the limits table's bounds of ``name`` (the parameter gives its default)."""
    row = limit("openai", name)
    return Form(ge=row.ge, le=row.le)


class GenerationsBody(BaseModel):
    """OpenAI's ``images.generate`` request, plus sfumato's sampling fields."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)
    model: str | None = Field(None, description="a name from GET /models; OpenAI model names run the default model")
    n: int = field("openai", "n")
    size: str = Field("auto", description="'auto' (512x512) or 'WIDTHxHEIGHT', sides multiples of 64")
    quality: Quality = "auto"
    response_format: Literal["b64_json"] = Field("b64_json", description="only b64_json: images never leave the box")
    output_format: OutputFormat = "png"
    output_compression: int | None = field("openai", "output_compression", description="JPEG/WebP quality (default 85)")
    background: Literal["auto", "opaque"] = "auto"
    stream: bool = False
    partial_images: int = field(
        "openai", "partial_images", description="with stream: up to this many partial_image events"
    )
    moderation: str | None = None
    style: str | None = None
    user: str | None = None
    # sfumato's fields
    negative_prompt: str = ""
    steps: int | None = field("openai", "steps")
    cfg_scale: float = field("openai", "cfg_scale")
    img_cfg_scale: float | None = field(
        "openai", "img_cfg_scale", description="an instruct-pix2pix model's image guidance (None: cfg_scale)"
    )
    seed: int = field("openai", "seed")
    sampler: str | None = Field(None, description="an A1111 or engine sampler name")
    scheduler: str | None = None

    # The SDK's names of fields -> this request's, for errors raised under the SDK's.
    SENT_AS: ClassVar[dict[str, str]] = {
        "batch_count": "n",
        "width": "size",
        "height": "size",
        "sampling_method": "sampler",
    }

    def sent_fields(self) -> set[str]:
        """The fields the client sent; ``quality`` sets the steps."""
        return self.model_fields_set | ({"steps"} if "quality" in self.model_fields_set else set())

    def to_params(
        self, size: tuple[int, int], init_image: bytes | None = None, mask: bytes | None = None
    ) -> DiffusionParams:
        """The SDK's params of this request, at ``size`` (``size`` parsed, or an edit's source size);
        ``quality`` sets the steps unless ``steps`` does, and a masked edit repaints fully (strength 1)."""
        sampling_method, scheduler = (None, None) if self.sampler is None else names.sampler(self.sampler, "sampler")
        if self.scheduler is not None:
            scheduler = names.scheduler(self.scheduler, "scheduler")
        steps = self.steps or QUALITY_STEPS[self.quality]
        previews = self.stream and self.partial_images > 0  # spread over the steps; the stream sends the first ones
        params = DiffusionParams(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            width=size[0],
            height=size[1],
            steps=steps,
            cfg_scale=self.cfg_scale,
            img_cfg_scale=self.img_cfg_scale,
            sampling_method=sampling_method,
            scheduler=scheduler,
            seed=self.seed,
            batch_count=self.n,
            init_image=init_image,
            mask=mask,
            preview="proj" if previews else None,
            preview_interval=max(1, steps // (self.partial_images + 1)),
        )
        return params if mask is None else replace(params, strength=1.0)


class ImageData(BaseModel):
    b64_json: str
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    background: Literal["opaque"] = "opaque"
    output_format: OutputFormat
    quality: str
    size: str


def _size(text: str, field: str = "size") -> tuple[int, int] | None:
    """``(width, height)`` of ``WIDTHxHEIGHT``; ``None`` for ``auto``."""
    if text == "auto":
        return None
    match = SIZE.match(text)
    if match is None:
        raise InvalidParameterError(field, f"must be 'auto' or 'WIDTHxHEIGHT' (e.g. '512x512'), got {text!r}")
    return int(match[1]), int(match[2])


def _file_type(output_format: OutputFormat) -> FileType:
    return "jpg" if output_format == "jpeg" else output_format


async def _read_image(upload: UploadFile, field: str, limit: int) -> bytes:
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise InvalidParameterError(field, f"is over {limit} bytes")
    return check_image(data, field)


def _edit_mask(data: bytes, size: tuple[int, int]) -> bytes:
    """OpenAI's mask (transparent pixels are edited) as sfumato's (white is edited).

    A mask with no alpha channel is read as grey levels, white meaning edit.
    """
    with Image.open(io.BytesIO(data)) as mask:
        if mask.size != size:
            raise InvalidParameterError("mask", f"is {mask.width}x{mask.height}; it must match the image, {size}")
        if "A" in mask.getbands() or "transparency" in mask.info:
            grey = 255 - imaging.to_array(mask.convert("RGBA").getchannel("A"), "mask", mode="L")
        else:
            grey = imaging.to_array(mask, "mask", mode="L")
    return imaging.encode_png(grey)


api = APIRouter(prefix=PREFIX, tags=["OpenAI"])


def plan_for(
    state: ServerState,
    body: GenerationsBody,
    size: tuple[int, int],
    init: bytes | None = None,
    mask: bytes | None = None,
) -> JobPlan:
    model = None if body.model is None or OPENAI_MODEL.match(body.model) else body.model
    quality = 85 if body.output_compression is None else max(1, body.output_compression)
    return job_plan(
        state,
        body.to_params(size, init, mask),
        model=model,
        sent_as=body.SENT_AS,
        unset=left_unset(body.sent_fields(), body.SENT_AS, body.sampler),
        file_type=_file_type(body.output_format),
        jpeg_quality=quality,
    )


async def answer(state: ServerState, kind: str, body: GenerationsBody, plan: JobPlan, request: Request) -> Any:
    job_id = state.enqueue(f"openai-{kind}", body.model_dump(), plan)
    size = f"{plan.generation.width}x{plan.generation.height}"
    shape = {"background": "opaque", "output_format": body.output_format, "quality": body.quality, "size": size}
    event = "image_generation" if kind == "generations" else "image_edit"
    if not body.stream:
        job = await state.wait_final(job_id)
        images = state.images(job)
        if job.state == CANCELLED and not images:
            raise ApiError(409, "job_cancelled", job.error or "the job was cancelled", "job_id")
        data = [ImageData(b64_json=base64.b64encode(i).decode()) for i in images]
        return ImagesResponse(
            created=int(job.created), data=data, output_format=body.output_format, quality=body.quality, size=size
        )

    async def stream() -> AsyncIterator[str]:
        partial, shown = 0, 0
        async for job in state.follow(job_id, request):
            preview = state.preview(job_id)
            fresh = preview is not None and preview.serial > shown
            if preview is not None and fresh and partial < body.partial_images:
                partial, shown = partial + 1, preview.serial
                b64 = base64.b64encode(preview.png).decode()
                part = {
                    "type": f"{event}.partial_image",
                    "created_at": int(time.time()),
                    "b64_json": b64,
                    "partial_image_index": partial - 1,
                    **shape,
                }
                yield f"event: {event}.partial_image\ndata: {json.dumps(part)}\n\n"
            if job.state == ERROR or (job.state == CANCELLED and not job.result.get("output_paths")):
                error = {"message": job.error or job.state, "code": job.state, "job_id": job.id}
                yield f"event: error\ndata: {json.dumps({'type': 'error', 'error': error})}\n\n"
                return
            now = int(time.time())
            if job.state in ("queued", "processing"):
                tick = {
                    "type": f"{event}.progress",
                    "created_at": now,
                    "job_id": job.id,
                    "progress": round(job.progress / 100, 3),
                    "phase": job.phase,
                }
                yield f"event: {event}.progress\ndata: {json.dumps(tick)}\n\n"
                continue
            for data in state.images(job):
                b64 = base64.b64encode(data).decode()
                done = {"type": f"{event}.completed", "created_at": now, "b64_json": b64, **shape}
                yield f"event: {event}.completed\ndata: {json.dumps(done)}\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream")


sse: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/json": {}, "text/event-stream": {}}, "description": "images, or SSE"}
}
answers = {**responses(409), **sse}


@api.post("/generations", response_model=ImagesResponse, responses=answers, response_model_exclude_none=True)
async def generations(state: StateDep, body: GenerationsBody, request: Request) -> Any:
    size = _size(body.size) or (DEFAULT_SIZE, DEFAULT_SIZE)
    return await answer(state, "generations", body, plan_for(state, body, size), request)


@dataclass
class EditForm:
    """The ``images.edit`` form's fields besides its files: those of
    :class:`GenerationsBody`, sent as multipart form fields (one left out, or ``None``,
    is not sent: the model's and the family's defaults fill it as for a body)."""

    prompt: Annotated[str, Form(min_length=1)]
    model: Annotated[str | None, Form()] = None
    n: Annotated[int, _form("n")] = limit("openai", "n").default
    size: Annotated[str, Form(description="'auto' (the image's size, to multiples of 64) or WxH")] = "auto"
    quality: Annotated[Quality | None, Form(description="left out: the model's steps, else auto's")] = None
    response_format: Annotated[Literal["b64_json"], Form()] = "b64_json"
    output_format: Annotated[OutputFormat, Form()] = "png"
    output_compression: Annotated[int | None, _form("output_compression")] = None
    background: Annotated[Literal["auto", "opaque"], Form()] = "auto"
    stream: Annotated[bool, Form()] = False
    partial_images: Annotated[int, _form("partial_images")] = limit("openai", "partial_images").default
    negative_prompt: Annotated[str, Form()] = ""
    steps: Annotated[int | None, _form("steps")] = None
    cfg_scale: Annotated[float | None, _form("cfg_scale")] = None
    img_cfg_scale: Annotated[float | None, _form("img_cfg_scale")] = None
    seed: Annotated[int, _form("seed")] = limit("openai", "seed").default
    sampler: Annotated[str | None, Form()] = None
    scheduler: Annotated[str | None, Form()] = None
    user: Annotated[str | None, Form()] = None


@api.post("/edits", response_model=ImagesResponse, responses=answers, response_model_exclude_none=True)
async def edits(
    state: StateDep,
    request: Request,
    form: Annotated[EditForm, Depends()],
    image: Annotated[list[UploadFile] | None, File(description="the image to edit (PNG/JPEG)")] = None,
    images: Annotated[list[UploadFile] | None, File(alias="image[]", description="the same, as a list")] = None,
    mask: Annotated[UploadFile | None, File(description="PNG; transparent pixels are edited")] = None,
) -> Any:
    uploads = [*(image or []), *(images or [])]
    if len(uploads) != 1:
        raise InvalidParameterError("image", f"needs exactly one image (got {len(uploads)})")
    limit = state.settings.max_body_bytes
    source = await _read_image(uploads[0], "image", limit)
    with Image.open(io.BytesIO(source)) as opened:
        source_size = opened.size
    step = ANY_FAMILY_SIDE_MULTIPLE
    wanted = _size(form.size) or tuple(max(step, round(side / step) * step) for side in source_size)
    sent = {name: value for name, value in asdict(form).items() if value is not None}
    body = GenerationsBody(**sent | {"size": f"{wanted[0]}x{wanted[1]}"})
    edit_mask = None
    if mask is not None:
        edit_mask = _edit_mask(await _read_image(mask, "mask", limit), source_size)
    return await answer(state, "edits", body, plan_for(state, body, (wanted[0], wanted[1]), source, edit_mask), request)


def router(state: ServerState) -> APIRouter:
    """These routes, behind the server's API key."""
    root = APIRouter(dependencies=[Depends(require_key(state.settings))])
    root.include_router(api)
    return root

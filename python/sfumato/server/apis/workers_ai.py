"""The Workers-AI-style synchronous route: one request, validated by that JSON schema,
answered with the PNG bytes.

``POST /ai/run/{model}``, and the same under the path Cloudflare's REST
clients use, ``/client/v4/accounts/{account_id}/ai/run/{model}``. ``model`` is
a name from ``GET /models``; a ``@cf/...`` name runs the server's default
model. ``image`` and ``mask`` are the bytes of an image file as an array of
0..255 integers; ``image_b64`` is the same file in base64. A mask makes it
inpainting (white is painted anew).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated, ClassVar

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from sfumato.errors import InvalidParameterError
from sfumato.limits import field
from sfumato.params import DEFAULT_SIZE, DiffusionParams
from sfumato.server.errors import ApiError, responses
from sfumato.server.jobs.store import DONE
from sfumato.server.planning import check_image, decode_image, job_plan, left_unset
from sfumato.server.state import ServerState, require_key

Byte = Annotated[int, Field(ge=0, le=255)]


class RunBody(BaseModel):
    """Workers AI's input schema."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, description="A text description of the image you want to generate")
    negative_prompt: str = Field("", description="Text describing elements to avoid in the generated image")
    height: int | None = field("workers_ai", "height", description="The height in pixels (default 512)")
    width: int | None = field("workers_ai", "width", description="The width in pixels (default 512)")
    image: list[Byte] | None = Field(None, description="img2img: the bytes of a PNG/JPEG file, as 0..255 integers")
    image_b64: str | None = Field(None, description="img2img: the same file, base64-encoded")
    mask: list[Byte] | None = Field(None, description="inpainting: a mask image file's bytes; white is repainted")
    num_steps: int = field("workers_ai", "num_steps", description="The number of diffusion steps")
    strength: float = field("workers_ai", "strength", description="img2img: how strongly to transform the image")
    guidance: float = field("workers_ai", "guidance", description="How closely to adhere to the prompt (CFG scale)")
    seed: int | None = field("workers_ai", "seed", description="Random seed (default: a random one)")

    # The SDK's names of fields -> this request's, for errors raised under the SDK's.
    SENT_AS: ClassVar[dict[str, str]] = {"steps": "num_steps", "cfg_scale": "guidance", "init_image": "image"}

    def to_params(self) -> DiffusionParams:
        """The SDK's params of this request: img2img from ``image`` or ``image_b64``, inpainting with ``mask``."""
        if self.image is not None and self.image_b64 is not None:
            raise InvalidParameterError("image_b64", "give the image once: as image or as image_b64")
        init = None
        if self.image is not None:
            init = check_image(bytes(self.image), "image")
        elif self.image_b64 is not None:
            init = decode_image(self.image_b64, "image_b64")
        params = DiffusionParams(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            width=self.width or DEFAULT_SIZE,
            height=self.height or DEFAULT_SIZE,
            steps=self.num_steps,
            cfg_scale=self.guidance,
            seed=-1 if self.seed is None else self.seed,
            init_image=init,
            mask=check_image(bytes(self.mask), "mask") if self.mask is not None else None,
        )
        return params if init is None else replace(params, strength=self.strength)


PNG_ANSWER: dict[int | str, dict[str, object]] = {
    200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}, "description": "the PNG"}
}


def router(state: ServerState) -> APIRouter:
    api = APIRouter(dependencies=[Depends(require_key(state.settings))], tags=["Workers AI"])

    async def run(model: str, body: RunBody) -> Response:
        plan = job_plan(
            state,
            body.to_params(),
            model=None if model.startswith("@cf/") else model,
            sent_as=body.SENT_AS,
            unset=left_unset(body.model_fields_set, body.SENT_AS),
        )
        payload = body.model_dump(exclude={"image", "image_b64", "mask"})
        job = await state.wait_final(state.enqueue("run", payload, plan))
        images = state.images(job)
        if job.state != DONE or not images:
            raise ApiError(409, "job_ended", f"the job ended {job.state}: {job.error}", "job_id")
        return Response(images[0], media_type="image/png", headers={"X-Sfumato-Job": job.id})

    @api.post("/ai/run/{model:path}", response_class=Response, responses={**responses(409), **PNG_ANSWER})
    async def run_model(model: str, body: RunBody) -> Response:
        return await run(model, body)

    @api.post(
        "/client/v4/accounts/{account_id}/ai/run/{model:path}",
        response_class=Response,
        responses={**responses(409), **PNG_ANSWER},
    )
    async def run_cloudflare_path(account_id: str, model: str, body: RunBody) -> Response:
        return await run(model, body)

    return api

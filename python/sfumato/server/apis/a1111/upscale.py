"""A1111's extras upscaling: a factor reached by ESRGAN x4 passes (a job of the queue)
and a final resize, or by a resampling filter alone."""

from __future__ import annotations

import io
import math

from PIL import Image

from sfumato import images as imaging
from sfumato.errors import InvalidParameterError
from sfumato.server.errors import ApiError
from sfumato.server.jobs.plan import JobPlan, Upscale
from sfumato.server.jobs.store import DONE
from sfumato.server.models.catalog import UPSCALER
from sfumato.server.planning import refuse_unknown
from sfumato.server.state import ServerState

# Pixel upscalers by A1111's names (no model): the resampling filter each is.
PIXEL_UPSCALERS = {
    "None": Image.Resampling.LANCZOS,
    "Lanczos": Image.Resampling.LANCZOS,
    "Nearest": Image.Resampling.NEAREST,
}


def output_size(raw: bytes, resize: float, upscaler: str) -> tuple[tuple[int, int], int]:
    """The size ``raw`` resized by ``resize`` has, and the x4 passes an ESRGAN takes to
    reach it; refused (``upscaling_resize``) past the largest image sfumato makes."""
    with Image.open(io.BytesIO(raw)) as source:
        size = (round(source.width * resize), round(source.height * resize))
        repeats = max(1, math.ceil(math.log(resize, 4) - 1e-9))
        passes = source.width * source.height * 16**repeats if upscaler not in PIXEL_UPSCALERS else 0
        largest = max(size[0] * size[1], passes)
    if min(size) < 1 or largest > imaging.MAX_INPUT_PIXELS:
        raise InvalidParameterError(
            "upscaling_resize",
            f"would make a {size[0]}x{size[1]} image; sides must be at least 1 and "
            f"images (the x4 passes included) at most {imaging.MAX_INPUT_PIXELS} pixels",
        )
    return size, repeats


async def upscaled(state: ServerState, raw: bytes, resize: float, upscaler: str, field: str, owner: str) -> bytes:
    """``raw`` resized by ``resize`` with ``upscaler`` (an ESRGAN of the folder, run in
    x4 passes until the factor is reached, then resized to it; or a resampling filter)."""
    size, repeats = output_size(raw, resize, upscaler)
    if upscaler in PIXEL_UPSCALERS:
        big = raw
    else:
        found = [e.name for e in state.catalog.upscalers()]
        if upscaler not in found:
            have = ", ".join([*PIXEL_UPSCALERS, *found])
            message = f"no upscaler named {upscaler!r}; available: {have}"
            raise refuse_unknown(state, UPSCALER + upscaler, field, message)
        plan = JobPlan(model=upscaler, work=Upscale(image=raw, repeats=repeats))
        payload = {"upscaling_resize": resize, "upscaler_1": upscaler}
        job = await state.wait_final(state.enqueue("extra-single-image", payload, plan, owner))
        images = state.images(job)
        if job.state != DONE or not images:
            raise ApiError(409, "job_ended", f"the upscale ended {job.state}: {job.error}")
        big = images[0]
    with Image.open(io.BytesIO(big)) as image:
        out = io.BytesIO()
        resample = PIXEL_UPSCALERS.get(upscaler, Image.Resampling.LANCZOS)
        image.convert("RGB").resize(size, resample).save(out, format="PNG")
    return out.getvalue()

"""Every request field's default and bounds, declared once.

:data:`SDK` holds the SDK's own (``diffusion()``'s fields, :class:`~sfumato.params.DiffusionParams`),
which the CLI and the models config share. :data:`APIS` holds, per HTTP API, each
field whose name, default or bounds that API's own specification sets otherwise,
with its source; every other field of an API takes the SDK's row. The SDK's checks,
the models config and every HTTP schema read them here (:func:`field`), and
``tests/test_names.py`` checks each schema against this table.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MAX_SEED = 2**63 - 1
"""The engine's seed is an int64."""

SDK_SOURCE = "sfumato: the engine's range, or what sfumato chose"


@dataclass(frozen=True)
class Limit:
    """One field's default and bounds (``None``: none on that side; ``gt``: an open
    lower bound), and who set them."""

    default: Any
    ge: float | None = None
    le: float | None = None
    source: str = SDK_SOURCE
    gt: float | None = None

    def bounds(self) -> tuple[float, float]:
        """``(low, high)`` for the SDK's range checks (closed on both sides)."""
        assert self.ge is not None and self.le is not None
        return self.ge, self.le


SDK: Mapping[str, Limit] = {
    "width": Limit(None, 8, 4096),
    "height": Limit(None, 8, 4096),
    "steps": Limit(20, 1, 1000),
    "cfg_scale": Limit(None, 0.0, 50.0),
    "guidance": Limit(3.5, 0.0, 50.0, "the engine's distilled-guidance default"),
    "seed": Limit(-1, -1, MAX_SEED),
    "batch_count": Limit(1, 1, 16),
    "strength": Limit(0.75, 0.0, 1.0, "the engine's default"),
    "clip_skip": Limit(-1, -1, 12, "the engine's default (-1: the family's own)"),
    "eta": Limit(None, 0.0, 10.0),
    "img_cfg_scale": Limit(None, 0.0, 50.0),
    "flow_shift": Limit(None, 0.01, 100.0),
    "control_strength": Limit(0.9, 0.0, 2.0, "the engine's default"),
    "preview_interval": Limit(1, 1, 1000),
    "refiner_switch_at": Limit(0.8, 0.0, 1.0, "A1111's refiner_switch_at"),
    "hires.scale": Limit(2.0, 1.0, 4.0),
    "hires.steps": Limit(0, 0, 1000),
    "hires.denoising_strength": Limit(0.7, 0.0, 1.0, "the engine's default"),
    "upscale.repeats": Limit(1, 1, 4),
    "loras.scale": Limit(1.0, -10.0, 10.0),
}
"""The SDK's fields, by their names in :class:`~sfumato.params.DiffusionParams`
(``hires.scale``: a key of ``hires``)."""

_JOB_QUEUE = "the job-queue API's field comments"
_A1111 = "AUTOMATIC1111's API (StableDiffusionProcessing's defaults, the UI's slider ranges)"
_PARAM_SCHEMA = "the parameter-schema API's parameter table (ai_diffusion)"
_WORKERS_AI = "Workers AI's JSON schema (SDXL-Lightning)"
_OPENAI = "OpenAI's images API"
_SERVER = "sfumato's server: a UI's range, narrower than the SDK's"

APIS: Mapping[str, Mapping[str, Limit]] = {
    "job_queue": {
        "steps": Limit(30, 1, 150, _JOB_QUEUE),
        "cfg_scale": Limit(7.0, 0.0, 30.0, _JOB_QUEUE),
        "width": Limit(512, 64, 2048, _JOB_QUEUE),
        "height": Limit(512, 64, 2048, _JOB_QUEUE),
        "jpeg_quality": Limit(85, 1, 100, _JOB_QUEUE),
        "preview_interval": Limit(1, 1, 150, _SERVER),
        # hires and LoRA keys: the API's defaults; their ranges are the SDK's, checked as the job is planned
        "hires.scale": Limit(2.0, source=_JOB_QUEUE),
        "hires.steps": Limit(20, source=_JOB_QUEUE),
        "hires.denoising_strength": Limit(0.4, source=_JOB_QUEUE),
        "loras.scale": Limit(1.0, source=_JOB_QUEUE),
    },
    "a1111": {
        "steps": Limit(50, 1, 150, _A1111),
        "cfg_scale": Limit(7.0, 0.0, 30.0, _A1111),
        "width": Limit(512, 64, 2048, _A1111),
        "height": Limit(512, 64, 2048, _A1111),
        "batch_size": Limit(1, 1, 16, _A1111),
        "n_iter": Limit(1, 1, 16, _A1111),
        "hr_scale": Limit(2.0, source=_A1111),  # its range: the SDK's hires.scale, checked as the job is planned
        "hr_second_pass_steps": Limit(0, 0, 150, _A1111),
        "inpainting_mask_invert": Limit(0, 0, 1, _A1111),
        "denoising_strength": Limit(0.75, 0.0, 1.0, _A1111),
        "image_cfg_scale": Limit(None, 0.0, 50.0, _A1111),
        "weight": Limit(1.0, 0.0, 2.0, "A1111's ControlNet extension"),
        "CLIP_stop_at_last_layers": Limit(1, 1, 12, _A1111),
        "jpeg_quality": Limit(80, 1, 100, _A1111),
        "show_progress_every_n_steps": Limit(10, -1, 1000, _A1111),
        "upscaling_resize": Limit(2.0, None, 16.0, _A1111, gt=0.0),
    },
    "param_schema": {
        "steps": Limit(20, 1, 200, _PARAM_SCHEMA),
        "width": Limit(320, source=_PARAM_SCHEMA),  # one of the listed sides
        "height": Limit(320, source=_PARAM_SCHEMA),
        "guidance": Limit(7.5, 0.1, 10.0, _PARAM_SCHEMA),
        "seed": Limit(1, 1, 1_000_000, _PARAM_SCHEMA),
    },
    "workers_ai": {
        "width": Limit(None, 256, 2048, _WORKERS_AI),
        "height": Limit(None, 256, 2048, _WORKERS_AI),
        "num_steps": Limit(20, 1, 20, _WORKERS_AI),
        "strength": Limit(1.0, 0.0, 1.0, _WORKERS_AI),
        "guidance": Limit(7.5, 0.0, 30.0, _WORKERS_AI),
        "seed": Limit(None, 0, MAX_SEED, _WORKERS_AI),
    },
    "openai": {
        "n": Limit(1, 1, 10, _OPENAI),
        "output_compression": Limit(None, 0, 100, _OPENAI),
        "partial_images": Limit(0, 0, 3, _OPENAI),
        "steps": Limit(None, 1, 1000, "sfumato's extension of OpenAI's body (None: from quality)"),
        "cfg_scale": Limit(7.0, 0.0, 30.0, _SERVER),
    },
}
"""Per HTTP API, by the field's name in that API."""


def limit(api: str | None, name: str) -> Limit:
    """The row of ``name`` in ``api`` (``None``: the SDK), falling back to the SDK's."""
    if api is not None and name in APIS[api]:
        return APIS[api][name]
    return SDK[name]


def field(api: str | None, name: str, **extra: Any) -> Any:
    """A pydantic ``Field`` with the table's default and bounds for ``name`` in ``api``."""
    from pydantic import Field  # the HTTP schemas' library: the SDK alone does not import it

    row = limit(api, name)
    return Field(row.default, ge=row.ge, le=row.le, gt=row.gt, **extra)


def bounds(name: str) -> tuple[float, float]:
    """The SDK's ``(low, high)`` of ``name``."""
    return SDK[name].bounds()


def int_bounds(name: str) -> tuple[int, int]:
    """The SDK's ``(low, high)`` of the integer field ``name``."""
    low, high = SDK[name].bounds()
    assert low == int(low) and high == int(high), name
    return int(low), int(high)

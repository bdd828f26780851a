"""Requests of every API family become one :class:`JobPlan`: what the runner executes.

A plan is checked completely when the request arrives, so a bad field is a 4xx
with its name at once, never a failed job later.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from sfumato import images as imaging
from sfumato.errors import InvalidParameterError
from sfumato.families.detect import check_lora_file
from sfumato.params import (
    HIRES_UPSCALERS,
    REFINER_SWITCH_AT,
    DiffusionParams,
    check_hires,
    check_number,
    check_side,
    validate_diffusion,
)
from sfumato.server import names
from sfumato.server.jobplan import FileType, Generation, Hires, JobPlan, Lora, Refiner
from sfumato.server.state import ServerState


def decode_image(data: str, field: str) -> bytes:
    """Base64 (optionally a ``data:`` URL) to image bytes, checked readable and within the pixel limit."""
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidParameterError(field, "is not valid base64") from None
    return check_image(raw, field)


def check_image(raw: bytes, field: str) -> bytes:
    """``raw``, once it is known to be a readable image within the pixel limit."""
    imaging.to_array(raw, field)
    return raw


LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^>]*))?>")


def prompt_loras(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """A1111's ``<lora:name:scale>`` tags: the prompt without them, and the LoRAs."""
    found = []
    for name, scale in LORA_TAG.findall(prompt):
        try:
            found.append((name.strip(), float(scale) if scale else 1.0))
        except ValueError:
            raise InvalidParameterError("prompt", f"<lora:{name}:{scale}> has a scale that is not a number") from None
    return LORA_TAG.sub("", prompt).strip(), found


def _lora_paths(state: ServerState, loras: Sequence[tuple[str, float]]) -> tuple[Lora, ...]:
    """LoRA names looked up in the LoRA folder's listing (never joined onto a path)."""
    found = {e.name: e.path for e in state.catalog.loras()}
    out = []
    for i, (name, scale) in enumerate(loras):
        if name not in found:
            have = ", ".join(found) or f"none (the LoRA folder {state.settings.loras_dir} is empty)"
            raise InvalidParameterError(f"loras[{i}]", f"no LoRA named {name!r}; available: {have}")
        check_lora_file(found[name], f"loras[{i}]")
        out.append(Lora(str(found[name].resolve()), check_number(f"loras[{i}].scale", scale, -10, 10)))
    return tuple(out)


def _hires(state: ServerState, hires: Mapping[str, Any]) -> Hires | None:
    """Seed 002's hires fields, checked, with an upscaler name resolved in the upscalers folder."""
    config = check_hires("hires", dict(hires))
    if config is None:
        return None
    upscaler = config.upscaler
    if upscaler not in HIRES_UPSCALERS:
        found = {e.name: e.path for e in state.catalog.upscalers()}
        if upscaler not in found:
            have = ", ".join([*HIRES_UPSCALERS, *found])
            raise InvalidParameterError("hires.upscaler", f"no upscaler named {upscaler!r}; available: {have}")
        upscaler = str(found[upscaler])
    return Hires(scale=config.scale, upscaler=upscaler, steps=config.steps,
                 denoising_strength=config.denoising_strength)  # fmt: skip


def pick_model(state: ServerState, requested: str | None, field: str = "model") -> str:
    """The catalog name to run: the requested one, else the server's default, else the first listed."""
    available = state.catalog.models()
    name = requested or state.runner.default_model or (available[0].name if available else None)
    if name is not None and not any(e.name == name for e in available):
        stem = name.rsplit(" [", 1)[0].rsplit(".", 1)[0]  # A1111 titles: "name.safetensors [hash]"
        name = stem if any(e.name == stem for e in available) else name
    if name is None or not any(e.name == name for e in available):
        have = ", ".join(e.name for e in available) or f"none (the models folder {state.settings.models_dir} is empty)"
        raise InvalidParameterError(field, f"no model named {name!r}; available: {have}")
    return name


@contextmanager
def _named_as_sent(fields: Mapping[str, str]) -> Iterator[None]:
    """Re-raise an :class:`InvalidParameterError` under the request's name for its field."""
    try:
        yield
    except InvalidParameterError as exc:
        if exc.field not in fields:
            raise
        raise InvalidParameterError(fields[exc.field], exc.message) from None


def diffusion_plan(
    state: ServerState,
    *,
    model: str | None,
    prompt: str,
    negative_prompt: str = "",
    width: int,
    height: int,
    steps: int,
    cfg_scale: float,
    sampler_name: str | None,
    scheduler_name: str | None,
    seed: int,
    batch_count: int = 1,
    init_image: bytes | None = None,
    mask: bytes | None = None,
    strength: float | None = None,
    hires: Mapping[str, Any] | None = None,
    loras: Sequence[tuple[str, float]] = (),
    refiner: str | None = None,
    refiner_switch_at: float = REFINER_SWITCH_AT,
    file_type: FileType = "png",
    jpeg_quality: int = 85,
    fields: Mapping[str, str] | None = None,
) -> JobPlan:
    """A checked generation plan. ``scheduler_name`` ``None`` takes the one the sampler implies.
    ``refiner`` names a model of the catalog that refines the images (seed 002's
    ``refiner_checkpoint``), from ``refiner_switch_at`` on.

    ``fields`` maps the SDK's names of fields to the request's (``{"steps":
    "num_steps"}``), so that an error names the field the client sent.

    Raises
    ------
    InvalidParameterError
        Naming the request's field.
    """
    with _named_as_sent(fields or {}):
        settings = state.settings
        limit = settings.max_prompt_chars
        for key, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            if len(text) > limit:
                raise InvalidParameterError(key, f"is {len(text)} characters long; the limit is {limit}")
        engine_hires = _hires(state, hires) if hires is not None else None
        if engine_hires is not None:  # the limit applies to the final size
            scale = engine_hires.scale
            width_out, height_out = (-(-round(side * scale) // 64) * 64 for side in (width, height))
            if width_out * height_out > settings.max_pixels:
                raise InvalidParameterError(
                    "hires.scale",
                    f"makes {width_out}x{height_out} images; this server allows up to {settings.max_pixels} pixels",
                )
            if engine_hires.steps > settings.max_steps:
                raise InvalidParameterError(
                    "hires.steps", f"is {engine_hires.steps}; this server allows up to {settings.max_steps}"
                )
        if width * height > settings.max_pixels:
            raise InvalidParameterError(
                "width", f"{width}x{height} is {width * height} pixels; this server allows up to {settings.max_pixels}"
            )
        if steps > settings.max_steps:
            raise InvalidParameterError("steps", f"is {steps}; this server allows up to {settings.max_steps}")
        if batch_count > settings.max_images:
            raise InvalidParameterError(
                "batch_count", f"asks for {batch_count} images; this server allows up to {settings.max_images}"
            )
        name = pick_model(state, model)
        sampling_method, scheduler = (
            (None, None) if sampler_name is None else names.sampler(sampler_name, "sampler_name")
        )
        if scheduler_name is not None:
            scheduler = names.scheduler(scheduler_name, "scheduler")
        defaults = DiffusionParams(prompt="")
        params = validate_diffusion(
            DiffusionParams(
                prompt=prompt, negative_prompt=negative_prompt, width=width, height=height, steps=steps,
                cfg_scale=cfg_scale, sampling_method=sampling_method, scheduler=scheduler, seed=seed,
                batch_count=batch_count, strength=defaults.strength if strength is None else strength,
                init_image=init_image, mask=mask,
            )
        )  # fmt: skip
        check_side("width", width, 64)
        check_side("height", height, 64)
        work = Generation(
            prompt=params.prompt, negative_prompt=params.negative_prompt, width=width, height=height,
            steps=params.steps, cfg_scale=params.cfg_scale, sampling_method=params.sampling_method,
            scheduler=params.scheduler, seed=params.seed, batch_count=params.batch_count, strength=params.strength,
            init_image=init_image, mask=mask, hires=engine_hires, loras=_lora_paths(state, loras),
        )  # fmt: skip
        refined = None
        if refiner:
            refined = Refiner(
                model=pick_model(state, refiner, field="refiner_checkpoint"),
                switch_at=check_number("refiner_switch_at", refiner_switch_at, 0.0, 1.0),
            )
        return JobPlan(model=name, work=work, refiner=refined, file_type=file_type, jpeg_quality=jpeg_quality)

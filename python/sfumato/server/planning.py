"""Requests of every API family become one :class:`JobPlan`: what the runner executes.

A plan is checked completely when the request arrives, so a bad field is a 4xx
with its name at once, never a failed job later.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from sfumato import images as imaging
from sfumato.errors import InvalidParameterError
from sfumato.families.detect import CONTROLLED_VARIANTS
from sfumato.families.embeddings import TEXT_WIDTHS, refuse_skipped, sort_out
from sfumato.images import ImageInput
from sfumato.params import (
    ANY_FAMILY_SIDE_MULTIPLE,
    DEFAULT_SIZE,
    FAMILY_CFG_SCALE,
    FLOW_FAMILIES,
    HIRES_UPSCALERS,
    REFINER_SWITCH_AT,
    DiffusionParams,
    HiresConfig,
    check_flow_shift,
    check_hires,
    check_images,
    check_loras,
    check_number,
    check_side,
    check_upscale_repeats,
    validate_diffusion,
)
from sfumato.server.errors import ApiError
from sfumato.server.jobs.plan import FileType, JobPlan, Refiner
from sfumato.server.models import names
from sfumato.server.models.catalog import CONTROL_NET, LORA, UPSCALER, VAE, Entry
from sfumato.server.models.config import DEFAULTED_FIELDS
from sfumato.server.settings import ServerSettings
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


def prompt_loras(prompt: str) -> tuple[str, list[dict[str, Any]]]:
    """A1111's ``<lora:name:scale>`` tags: the prompt without them, and the LoRAs (``name``, ``scale``)."""
    found = []
    for name, scale in LORA_TAG.findall(prompt):
        try:
            found.append({"name": name.strip(), "scale": float(scale) if scale else 1.0})
        except ValueError:
            raise InvalidParameterError("prompt", f"<lora:{name}:{scale}> has a scale that is not a number") from None
    return LORA_TAG.sub("", prompt).strip(), found


def refuse_unknown(state: ServerState, key: str, field: str, message: str) -> InvalidParameterError:
    """The error for a name no listing holds: a 503 ``no_worker`` when the catalog says a
    worker that held it is gone (or none registered yet), else ``message`` on ``field``."""
    gone = state.catalog.absent(key)
    if gone is not None:
        raise ApiError(503, "no_worker", gone, field)
    return InvalidParameterError(field, message)


def _loras(state: ServerState, loras: Sequence[tuple[Any, float]]) -> tuple[dict[str, Any], ...]:
    """LoRA names looked up in the LoRA folder's listing (never joined onto a path), each
    checked, as the SDK's ``{"name", "scale"}`` items: the worker that runs the job finds
    the file of that name (and sha256) in its own folder."""
    found = {e.name: e for e in state.catalog.loras()}
    out = []
    for i, (name, scale) in enumerate(loras):
        if name not in found:
            have = ", ".join(found) or f"none (the LoRA folder {state.settings.loras_dir} is empty)"
            raise refuse_unknown(state, LORA + str(name), f"loras[{i}]", f"no LoRA named {name!r}; available: {have}")
        state.catalog.check_lora(found[name], f"loras[{i}]")
        out.append({"name": name, "scale": scale})
    return tuple(out)


def _hires(state: ServerState, hires: object) -> HiresConfig | None:
    """The request's hires fields, checked; an ESRGAN upscaler named in the upscalers folder."""
    config = check_hires("hires", hires)
    if config is None:
        return None
    upscaler = config.upscaler
    if upscaler not in HIRES_UPSCALERS:
        found = [e.name for e in state.catalog.upscalers()]
        if upscaler not in found:
            have = ", ".join([*HIRES_UPSCALERS, *found])
            raise refuse_unknown(
                state, UPSCALER + str(upscaler), "hires.upscaler", f"no upscaler named {upscaler!r}; available: {have}"
            )
    return config


def _control_net(state: ServerState, requested: str | None, model: Entry) -> str:
    """The catalog name of the ControlNet a control image needs, checked against the model's family."""
    found = {e.name: e for e in state.catalog.controlnets()}
    if requested is None:
        raise InvalidParameterError("control_image", "needs a ControlNet: name one of the ControlNet folder")
    name = requested.rsplit(" [", 1)[0]  # A1111 lists "name [hash]"
    if name not in found:
        have = ", ".join(found) or f"none (the ControlNet folder {state.settings.controlnets_dir} is empty)"
        raise refuse_unknown(
            state, CONTROL_NET + name, "control_net", f"no ControlNet named {requested!r}; available: {have}"
        )
    if model.info is not None:
        state.catalog.check_fits(found[name], "control_net", model.info)
    return name


def _vae(state: ServerState, requested: str, model: Entry) -> str:
    """The catalog name of a VAE of the VAEs folder, checked against the model's latents."""
    found = state.catalog.vae(requested)
    if found is None:
        have = (
            ", ".join(e.path.name for e in state.catalog.vaes())
            or f"none (the VAE folder {state.settings.vaes_dir} is empty)"
        )
        raise refuse_unknown(state, VAE + requested, "vae", f"no VAE named {requested!r}; available: {have}")
    if model.info is not None:
        state.catalog.check_fits(found, "vae", model.info)
    return found.name


def _file_bytes(image: ImageInput | None) -> bytes | None:
    """An image of a request's params: the file bytes each schema decoded and checked."""
    if image is None or isinstance(image, bytes):
        return image
    raise TypeError(f"a server plan takes an image file's bytes, not {type(image).__name__}")


def pick_model(state: ServerState, requested: str | None, field: str = "model") -> str:
    """The catalog name to run: the requested one, else the server's default, else the first listed."""
    return pick_entry(state, requested, field).name


def pick_entry(state: ServerState, requested: str | None, field: str = "model") -> Entry:
    """The catalog entry of :func:`pick_model`'s choice, from one listing of the folder."""
    available = {e.name: e for e in state.catalog.models()}
    name = requested or state.runner.default_model or next(iter(available), None)
    if name is not None and name not in available:
        stem = name.rsplit(" [", 1)[0].rsplit(".", 1)[0]  # A1111 titles: "name.safetensors [hash]"
        name = stem if stem in available else name
    if name is None:
        gone = state.catalog.absent("")
        if gone is not None:
            raise ApiError(503, "no_worker", gone, field)
        raise InvalidParameterError(
            field,
            f"no model was named, and the models folder {state.settings.models_dir} holds none to default to: put "
            "a checkpoint there (.gguf, .safetensors) or start the server with --models DIR",
        )
    if name not in available:
        have = ", ".join(available) or f"none (the models folder {state.settings.models_dir} is empty)"
        raise refuse_unknown(state, name, field, f"no model named {name!r}; available: {have}")
    return available[name]


def carried(request: object, names: Iterable[str], sent_as: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The SDK's fields ``names`` as ``request`` carries them: each from the request's
    field that ``sent_as`` names for it, else from the field of the same name."""
    renamed = sent_as or {}
    return {name: getattr(request, renamed.get(name, name)) for name in names}


def left_unset(sent: Collection[str], sent_as: Mapping[str, str], sampler: str | None = None) -> frozenset[str]:
    """The fields a model's configured defaults may fill: those of
    :data:`DEFAULTED_FIELDS` whose request field (``sent_as`` renames the SDK's
    names) is not among the fields the client ``sent``. A ``sampler`` the client
    sent whose title names a scheduler ("DPM++ 2M Karras") sets the scheduler too."""
    unset = {f for f in DEFAULTED_FIELDS if sent_as.get(f, f) not in sent}
    if sampler is not None and "sampling_method" not in unset and names.sampler(sampler, "sampler")[1] is not None:
        unset.discard("scheduler")
    return frozenset(unset)


def with_defaults(params: DiffusionParams, entry: Entry, unset: Collection[str]) -> DiffusionParams:
    """``params`` with the configured defaults of the model of ``entry`` in the fields
    the client left ``unset``. When the model sets a sampler or a scheduler and the
    request chose neither, the scheduler is the model's (or the engine's for its family).
    A ``cfg_scale`` neither the client nor the model sets is the family's where it has its
    own (:data:`~sfumato.params.FAMILY_CFG_SCALE`: 1 for the distilled transformers), as in
    the SDK; so is the sampler and schedule of a flow-matching family
    (:data:`~sfumato.params.FLOW_FAMILIES`). A model that ``edits`` (FLUX.1 Kontext) takes an
    img2img request's image as its reference (with a mask, the request stays inpainting)."""
    defaults = entry.config.defaults if entry.config is not None else {}
    filled: dict[str, Any] = {f: value for f, value in defaults.items() if f in unset}
    family = entry.info.family if entry.info is not None else None
    if "cfg_scale" in unset and "cfg_scale" not in filled and family in FAMILY_CFG_SCALE:
        filled["cfg_scale"] = FAMILY_CFG_SCALE[family]
    if {"sampling_method", "scheduler"} <= set(unset) and {"sampling_method", "scheduler"} & set(defaults):
        filled["scheduler"] = defaults.get("scheduler")
    elif {"sampling_method", "scheduler"} <= set(unset) and family in FLOW_FAMILIES:
        filled.update(sampling_method=None, scheduler=None)  # the engine's own for the family
    if entry.config is not None and entry.config.edits and params.init_image is not None and params.mask is None:
        filled.update(init_image=None, init_images=[params.init_image, *params.init_images])
    return replace(params, **filled) if filled else params


@contextmanager
def _named_as_sent(sent_as: Mapping[str, str]) -> Iterator[None]:
    """Re-raise an :class:`InvalidParameterError` under the request's name for its field."""
    try:
        yield
    except InvalidParameterError as exc:
        if exc.field not in sent_as:
            raise
        raise InvalidParameterError(sent_as[exc.field], exc.message) from None


def _check_prompts(settings: ServerSettings, params: DiffusionParams) -> None:
    """Refuse prompts longer than the server allows."""
    limit = settings.max_prompt_chars
    for key, text in (("prompt", params.prompt), ("negative_prompt", params.negative_prompt)):
        if len(text) > limit:
            raise InvalidParameterError(key, f"is {len(text)} characters long; the limit is {limit}")


def _check_limits(
    settings: ServerSettings, params: DiffusionParams, width: int, height: int, hires: HiresConfig | None
) -> None:
    """Refuse what passes the server's limits: pixels (the hires pass's output
    included), steps and images."""
    if hires is not None:  # the limit applies to the final size
        step = ANY_FAMILY_SIDE_MULTIPLE
        width_out, height_out = (-(-round(side * hires.scale) // step) * step for side in (width, height))
        if width_out * height_out > settings.max_pixels:
            raise InvalidParameterError(
                "hires.scale",
                f"makes {width_out}x{height_out} images; this server allows up to {settings.max_pixels} pixels",
            )
        if hires.steps > settings.max_steps:
            raise InvalidParameterError(
                "hires.steps", f"is {hires.steps}; this server allows up to {settings.max_steps}"
            )
    if width * height > settings.max_pixels:
        raise InvalidParameterError(
            "width", f"{width}x{height} is {width * height} pixels; this server allows up to {settings.max_pixels}"
        )
    if params.steps > settings.max_steps:
        raise InvalidParameterError("steps", f"is {params.steps}; this server allows up to {settings.max_steps}")
    if params.batch_count > settings.max_images:
        raise InvalidParameterError(
            "batch_count", f"asks for {params.batch_count} images; this server allows up to {settings.max_images}"
        )


def _generation(
    state: ServerState, params: DiffusionParams, width: int, height: int, hires: HiresConfig | None
) -> DiffusionParams:
    """The stored generation of checked ``params``: the size resolved, files as bytes, LoRAs
    and a hires ESRGAN as paths in their folders."""
    repeats = check_upscale_repeats("upscale", params.upscale)
    return replace(
        params,
        width=width,
        height=height,
        init_image=_file_bytes(params.init_image),
        mask=_file_bytes(params.mask),
        control_image=_file_bytes(params.control_image),
        init_images=tuple(image for image in map(_file_bytes, params.init_images) if image is not None),
        hires=hires,
        loras=_loras(state, check_loras("loras", params.loras)),
        upscale={"repeats": repeats} if repeats else None,
    )


def job_plan(
    state: ServerState,
    params: DiffusionParams,
    *,
    model: str | None,
    sent_as: Mapping[str, str] | None = None,
    refiner: str | None = None,
    refiner_switch_at: float = REFINER_SWITCH_AT,
    control_net: str | None = None,
    vae: str | None = None,
    esrgan: str | None = None,
    file_type: FileType = "png",
    jpeg_quality: int = 85,
    unset: Collection[str] = (),
) -> JobPlan:
    """A checked plan for the params a request's schema made (its ``to_params()``).

    ``params.loras`` and a hires ``upscaler`` are names in the server's LoRA and
    upscaler folders; ``model`` and ``refiner`` (the job-queue API's ``refiner_checkpoint``,
    which refines from ``refiner_switch_at`` on) are catalog names, ``None``
    taking the server's default model; ``control_net`` names a ControlNet of the
    ControlNet folder for ``params.control_image``, ``vae`` a VAE of the VAEs
    folder that replaces the model's own, and ``esrgan`` the upscaler of the
    upscalers folder that runs ``params.upscale``'s passes. The server's limits apply here.
    ``sent_as`` maps the SDK's names of fields to the request's (``{"steps":
    "num_steps"}``), so that an error names the field the client sent.
    ``unset`` names the fields the client left out (:func:`left_unset`): a
    model of the models config fills them with its defaults.

    Raises
    ------
    InvalidParameterError
        Naming the request's field.
    """
    with _named_as_sent(sent_as or {}):
        settings = state.settings
        entry = pick_entry(state, model)
        params = with_defaults(params, entry, unset)
        _check_prompts(settings, params)
        width = DEFAULT_SIZE if params.width is None else params.width
        height = DEFAULT_SIZE if params.height is None else params.height
        hires = _hires(state, params.hires)
        _check_limits(settings, params, width, height, hires)
        name = entry.name
        if entry.info is not None and entry.info.family in TEXT_WIDTHS:
            skipped = sort_out(*state.catalog.embeddings(), entry.info.family)[1]
            refuse_skipped({"prompt": params.prompt, "negative_prompt": params.negative_prompt}, skipped, repr(name))
        validate_diffusion(params)
        check_side("width", width, ANY_FAMILY_SIDE_MULTIPLE)
        check_side("height", height, ANY_FAMILY_SIDE_MULTIPLE)
        work = _generation(state, params, width, height, hires)
        if work.upscale and esrgan not in {e.name for e in state.catalog.upscalers()}:
            have = ", ".join(e.name for e in state.catalog.upscalers()) or "none"
            raise refuse_unknown(
                state,
                UPSCALER + str(esrgan),
                "upscale",
                f"needs an upscaler of the upscalers folder, not {esrgan!r}; available: {have}",
            )
        refined = None
        if refiner:
            refined = Refiner(
                model=pick_model(state, refiner, field="refiner_checkpoint"),
                switch_at=check_number("refiner_switch_at", refiner_switch_at, 0.0, 1.0),
            )
        controlled = entry.info is not None and entry.info.variant in CONTROLLED_VARIANTS
        if entry.info is not None:  # a ControlNet is named, and checked, by the request: below
            prediction = entry.config.prediction if entry.config is not None else None
            check_images(params, entry.info, prediction, control_net=True)
            check_flow_shift(params, entry.info, prediction)
        control = None
        if params.control_image is not None and not (controlled and control_net is None):
            control = _control_net(state, control_net, entry)
        return JobPlan(
            model=name,
            work=work,
            refiner=refined,
            control_net=control,
            vae=_vae(state, vae, entry) if vae else None,
            esrgan=esrgan if work.upscale else None,
            file_type=file_type,
            jpeg_quality=jpeg_quality,
        )

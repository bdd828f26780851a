"""The SDK: QVAC's ``loadModel`` / ``diffusion`` / ``upscale`` / ``unloadModel``
under Python names.

``load_model`` returns a model id; ``diffusion`` and ``upscale`` return a
:class:`~sfumato.results.DiffusionResult` at once, whose progress stream,
outputs (PNG bytes) and stats work from blocking code and from asyncio.
Invalid input raises :class:`~sfumato.errors.InvalidParameterError` from the call
itself, before anything is queued.
"""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sfumato import images as imaging
from sfumato.chain import RefinerPlan, run_with_refiner
from sfumato.engine.devices import check_device
from sfumato.errors import InvalidParameterError, NoUpscalerError, UnknownModelIdError
from sfumato.generation import check_timeout, image_request, submit
from sfumato.loading import LoadProgress, ModelSource, prepare
from sfumato.params import (
    MAX_REPEATS,
    DiffusionParams,
    HiresConfig,
    ModelConfig,
    check_int,
    check_refiner,
    check_upscale_repeats,
    validate_diffusion,
)
from sfumato.registry import cache_dir
from sfumato.results import DiffusionResult
from sfumato.runtime.host import REASON_CANCELLED, ModelHost
from sfumato.runtime.pool import Budget, ModelPool
from sfumato.runtime.protocol import RunJob

_D = DiffusionParams(prompt="")

_pool = ModelPool(Budget.from_env())
atexit.register(_pool.shutdown)  # no worker outlives the process that started it


def load_model(
    model_src: ModelSource,
    model_type: str = "diffusion",
    model_config: ModelConfig | Mapping[str, Any] | None = None,
    on_progress: Callable[[LoadProgress], None] | None = None,
) -> str:
    """Load a model in its own worker process and return its id.

    Loading the same source with the same config again returns the same id
    and counts a reference; :func:`unload_model` drops one.

    Parameters
    ----------
    model_src:
        A local file (all-in-one GGUF or safetensors, ESRGAN ``.pth``), a
        diffusion model alone (an SDXL UNet, an SD3 / FLUX transformer) whose
        text encoders and VAE come from ``model_config``'s companion keys, a
        diffusers folder, or a registry constant such as ``SD_V2_1_1B_Q8_0``.
    model_type:
        ``"diffusion"`` (the only type sfumato serves).
    model_config:
        See :class:`~sfumato.params.ModelConfig`.
    on_progress:
        Receives :class:`LoadProgress` during download and load.

    Raises
    ------
    InvalidParameterError, ModelNotFoundError, InvalidModelError, UnsupportedModelError, EngineError,
    EngineCrashedError
    """
    prepared = prepare(model_src, model_type, model_config, on_progress or (lambda _p: None))
    spec, env, model = prepared.spec, prepared.env, prepared.model

    def create() -> ModelHost:
        host = ModelHost(model, spec, env, before_start=_pool.make_room)
        host.start()
        return host

    key = (repr(dataclasses.replace(spec, model_id="")), tuple(sorted(env.items())))
    model_id, _ = _pool.acquire(key, spec.model_id, create, model.weight_bytes)
    if on_progress is not None:
        on_progress(LoadProgress(100.0, "load"))
    return model_id


def _host(model_id: str) -> ModelHost:
    if not isinstance(model_id, str):
        raise InvalidParameterError("model_id", f"must be a string, got {type(model_id).__name__}")
    return _pool.get(model_id)


def unload_model(model_id: str, clear_storage: bool = False) -> None:
    """Drop a reference to a model. With the last one, its running job is
    cancelled, its queued jobs too (both end with reason "unloaded"), and its
    worker process ends, freeing its memory.

    ``clear_storage=True`` also deletes the model's files from the model cache
    (only files sfumato downloaded there; never a path the caller gave).
    """
    _host(model_id)  # checks the id
    host = _pool.release(model_id)
    if host is not None and clear_storage:
        path = host.model.info.path
        if path.is_file() and path.parent == cache_dir().resolve():
            path.unlink()


def cancel(model_id: str, *, queued: bool = False) -> int:
    """Cancel the running job of a model (and, with ``queued=True``, its queued
    jobs too). Each ends with :class:`~sfumato.errors.JobCancelledError`.
    Returns how many jobs were cancelled."""
    host = _host(model_id)
    # The queued jobs first: a stopped job's worker takes the next one at once.
    count = host.cancel_queued() if queued else 0
    return count + int(host.cancel_running())


def loaded_models() -> list[str]:
    """The ids of the models loaded now (evicted ones included: they reload on use)."""
    return _pool.ids()


@dataclass(frozen=True)
class ModelStatus:
    """What :func:`models_info` reports of one loaded model.

    Attributes
    ----------
    model_id, path, family:
        The id, the ``model_src`` file or folder, and its detected family.
    device:
        The ``model_config.device`` asked for.
    engine_device:
        The engine device its worker runs on (``"CPU"``, ``"CUDA0"``), once loaded.
    decoder:
        What decodes its latents, as the engine reported at load: ``"vae"``, or
        ``"taesd"`` (``model_config.taesd_src``); ``None`` for an upscaler alone.
    references:
        How many ``load_model`` calls hold it.
    resident:
        Whether it is in memory now (``False`` after an eviction, until its next job).
    pid, rss_bytes:
        Its worker process and that process's resident memory.
    running, queued:
        Whether a job runs, and how many wait.
    restarts:
        How many times its worker was replaced after a cancel or a crash.
    """

    model_id: str
    path: Path
    family: str
    device: str
    engine_device: str | None
    decoder: str | None
    references: int
    resident: bool
    pid: int | None
    rss_bytes: int
    running: bool
    queued: int
    restarts: int


def models_info() -> list[ModelStatus]:
    """The status of every loaded model."""
    out = []
    for model_id in _pool.ids():
        try:
            host = _pool.get(model_id)
        except UnknownModelIdError:
            continue
        queued = host.queued
        out.append(
            ModelStatus(
                model_id=model_id,
                path=host.model.info.path,
                family=host.model.info.family,
                device=host.model.config.device,
                engine_device=host.ready.device if host.ready else None,
                decoder=host.ready.decoder if host.ready else None,
                references=_pool.refs(model_id),
                resident=host.resident,
                pid=host.pid,
                rss_bytes=host.rss_bytes(),
                running=host.running,
                queued=queued,
                restarts=host.restarts,
            )
        )
    return out


def set_memory_budget(
    max_loaded_models: int | None = None, max_loaded_bytes: int | None = None, device: str | None = None
) -> None:
    """Limit what stays in a device's memory: when a model is about to load (or
    reload) there and the limit would be passed, the least recently used idle
    models of that device are evicted first; a model that cannot fit even so is
    refused (:class:`~sfumato.errors.InsufficientMemoryError`). Busy models are
    never evicted.

    ``device`` names one device (``"CPU"``, ``"Vulkan0"``); ``None`` sets the budget
    of every device without one of its own. Bytes are the workers' resident memory
    on the CPU and the weights' estimate on a GPU; ``None`` lifts a limit (the bytes
    limit is then the device's memory). The defaults come from
    ``SFUMATO_MAX_LOADED_MODELS`` and ``SFUMATO_MAX_LOADED_BYTES``."""
    if max_loaded_models is not None:
        check_int("max_loaded_models", max_loaded_models, 1, 1 << 16)
    if max_loaded_bytes is not None:
        check_int("max_loaded_bytes", max_loaded_bytes, 1, 1 << 62)
    budget = Budget(max_loaded_models, max_loaded_bytes)
    if device is None:
        _pool.budget = budget
        _pool.device_budgets.clear()
    else:
        _pool.device_budgets[check_device(device).name] = budget


def diffusion(
    model_id: str,
    *,
    prompt: str,
    negative_prompt: str = _D.negative_prompt,
    width: int | None = _D.width,
    height: int | None = _D.height,
    steps: int = _D.steps,
    cfg_scale: float | None = _D.cfg_scale,
    guidance: float = _D.guidance,
    sampling_method: str | None = _D.sampling_method,
    scheduler: str | None = _D.scheduler,
    seed: int = _D.seed,
    batch_count: int = _D.batch_count,
    vae_tiling: bool = _D.vae_tiling,
    cache_preset: str | None = _D.cache_preset,
    init_image: imaging.ImageInput | None = _D.init_image,
    mask: imaging.ImageInput | None = _D.mask,
    strength: float = _D.strength,
    upscale: bool | Mapping[str, Any] | None = _D.upscale,
    hires: bool | Mapping[str, Any] | HiresConfig | None = _D.hires,
    loras: Sequence[Any] = _D.loras,
    clip_skip: int = _D.clip_skip,
    eta: float | None = _D.eta,
    img_cfg_scale: float | None = _D.img_cfg_scale,
    flow_shift: float | None = _D.flow_shift,
    init_images: Sequence[imaging.ImageInput] = _D.init_images,
    control_image: imaging.ImageInput | None = _D.control_image,
    control_strength: float = _D.control_strength,
    preview: str | None = _D.preview,
    preview_interval: int = _D.preview_interval,
    refiner: Mapping[str, Any] | None = None,
    timeout: float | None = None,
) -> DiffusionResult:
    """Generate images with a loaded model. Returns at once.

    The fields, their defaults and their meaning are those of
    :class:`~sfumato.params.DiffusionParams`: an ``init_image`` makes it img2img (or
    FLUX.2's in-context conditioning), a ``mask`` inpainting, ``hires`` a second pass,
    ``loras`` names LoRAs, ``upscale`` runs the model's paired ESRGAN on every image,
    ``preview`` puts PNGs of the image as it forms on the progress ticks. Image ``i`` of
    a batch is generated with ``seed + i``, exactly as a single call with that seed.
    ``refiner`` (``{"model_id": <a loaded model>, "switch_at": 0.8}``) refines every
    image on a second model, as :mod:`sfumato.chain` describes. ``timeout`` (seconds
    of running, queueing excluded, for each model's part) cancels the job with reason
    ``"timeout"``.

    Raises
    ------
    InvalidParameterError
        For any invalid field, naming it and what it allows.
    UnknownModelIdError, NoUpscalerError
    """
    called = time.perf_counter()
    fields = DiffusionParams(
        prompt=prompt, negative_prompt=negative_prompt, width=width, height=height, steps=steps,
        cfg_scale=cfg_scale, guidance=guidance, sampling_method=sampling_method, scheduler=scheduler, seed=seed,
        batch_count=batch_count, vae_tiling=vae_tiling, cache_preset=cache_preset, init_image=init_image,
        mask=mask, strength=strength, upscale=upscale, hires=hires, loras=loras, clip_skip=clip_skip, eta=eta,
        img_cfg_scale=img_cfg_scale, flow_shift=flow_shift, init_images=init_images, control_image=control_image,
        control_strength=control_strength, preview=preview, preview_interval=preview_interval,
    )  # fmt: skip
    return _generate(model_id, validate_diffusion(fields), refiner, called, timeout)


def diffusion_checked(
    model_id: str, params: DiffusionParams, *, refiner: Mapping[str, Any] | None = None, timeout: float | None = None
) -> DiffusionResult:
    """:func:`diffusion` of ``params`` that :func:`~sfumato.params.validate_diffusion` has
    already checked (the server checks a request once, when it plans the job): only what
    depends on the loaded model is checked here, as the engine request is built.

    Raises
    ------
    InvalidParameterError, UnknownModelIdError, NoUpscalerError
    """
    return _generate(model_id, params, refiner, time.perf_counter(), timeout)


def _generate(
    model_id: str, params: DiffusionParams, refiner: Mapping[str, Any] | None, called: float, timeout: float | None
) -> DiffusionResult:
    """:func:`diffusion` of validated ``params``: the models' checks, then the job (and its refiner pass)."""
    host = _host(model_id)
    if not host.model.has_diffusion:
        raise InvalidParameterError("model_id", f"model {model_id!r} was loaded with mode='upscale'; call upscale()")
    refine = check_refiner("refiner", refiner)
    second = _refiner_host(refine.model_id) if refine is not None else None
    repeats = check_upscale_repeats("upscale", params.upscale)
    if repeats and not host.model.has_upscaler:
        raise NoUpscalerError(
            f"upscale: model {model_id!r} has no upscaler; load it with model_config.upscaler={{'model_src': ...}}"
        )
    request = image_request(params, host.model, second.model if second is not None else None)
    if refine is None or second is None or refine.switch_at >= 1.0:  # switching at the end: no refiner pass
        return submit(host, RunJob(request=request, repeats=repeats), called, timeout)
    check_timeout(timeout)
    plan = RefinerPlan(
        base=lambda job: submit(host, job, called, timeout),
        refiner=lambda job: submit(second, job, called, timeout),
        request=request,
        switch_at=refine.switch_at,
        upscale_repeats=repeats,
    )
    return run_with_refiner(plan, called, REASON_CANCELLED)


def _refiner_host(model_id: str) -> ModelHost:
    """The host of the loaded model named as ``refiner.model_id``, which must generate."""
    try:
        host = _pool.get(model_id)
    except UnknownModelIdError:
        raise InvalidParameterError("refiner.model_id", f"no loaded model has the id {model_id!r}") from None
    if not host.model.has_diffusion:
        raise InvalidParameterError("refiner.model_id", "that model was loaded with mode='upscale'")
    return host


def upscale(
    model_id: str, *, image: imaging.ImageInput, repeats: int = 1, timeout: float | None = None
) -> DiffusionResult:
    """Upscale one image with the model's ESRGAN, ``repeats`` times in a row
    (x4 twice gives x16). Returns at once; the result has the shape of
    :func:`diffusion`'s, ``timeout`` too.

    Raises
    ------
    InvalidParameterError, UnknownModelIdError, NoUpscalerError
    """
    called = time.perf_counter()
    n = check_int("repeats", repeats, 1, MAX_REPEATS)
    host = _host(model_id)
    if not host.model.has_upscaler:
        raise NoUpscalerError(
            f"model {model_id!r} has no upscaler: load an ESRGAN with model_config={{'mode': 'upscale'}}, "
            "or pair one with model_config.upscaler"
        )
    source = imaging.to_array(image, "image")
    return submit(host, RunJob(image=source, repeats=n), called, timeout)


async def load_model_async(
    model_src: ModelSource,
    model_type: str = "diffusion",
    model_config: ModelConfig | Mapping[str, Any] | None = None,
    on_progress: Callable[[LoadProgress], None] | None = None,
) -> str:
    """:func:`load_model` for asyncio: loads in a worker thread."""
    return await asyncio.to_thread(load_model, model_src, model_type, model_config, on_progress)


async def unload_model_async(model_id: str, clear_storage: bool = False) -> None:
    """:func:`unload_model` for asyncio."""
    await asyncio.to_thread(unload_model, model_id, clear_storage)

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
import dataclasses
import os
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from sfumato import images as imaging
from sfumato.engine.context import (
    PHASE_CONDITIONING,
    PHASE_HIRES,
    PHASE_SAMPLING,
    PHASE_UPSCALE,
    PHASE_VAE,
    ContextParams,
    DiffusionContext,
    ImageArray,
    ImageRequest,
    ProgressTick,
    UpscalerContext,
)
from sfumato.engine.devices import check_device
from sfumato.errors import (
    InvalidModelError,
    InvalidParameterError,
    ModelNotFoundError,
    NoUpscalerError,
    UnknownModelIdError,
)
from sfumato.families.detect import (
    FAMILY_ESRGAN,
    FAMILY_NAMES,
    FAMILY_SD1,
    FAMILY_SD2,
    ModelInfo,
    detect,
    read_tensor_table,
)
from sfumato.params import (
    CACHE_PRESETS,
    DEFAULT_SIZE,
    MAX_REPEATS,
    PREDICTIONS,
    DiffusionParams,
    ModelConfig,
    UpscalerConfig,
    check_int,
    check_side,
    check_upscale_repeats,
    parse_model_config,
    validate_diffusion,
)
from sfumato.registry import REGISTRY, RegistryModel, cache_dir, resolve
from sfumato.results import DiffusionResult, DiffusionStats
from sfumato.runtime.host import LoadedModel, ModelHost

ModelSource = Union[str, "os.PathLike[str]", RegistryModel]
"""A local file, a diffusers folder, or a registry constant (or its name)."""

_D = DiffusionParams(prompt="")
_SIZE_MULTIPLE = {FAMILY_SD1: 64, FAMILY_SD2: 64}

_hosts: dict[str, ModelHost] = {}
_hosts_lock = threading.Lock()


@dataclass(frozen=True)
class LoadProgress:
    """A ``load_model`` progress report: ``stage`` is "download" or "load"."""

    percentage: float
    stage: str


def resolve_source(
    source: ModelSource, field: str, on_progress: Callable[[float], None] | None = None
) -> tuple[Path, RegistryModel | None]:
    """Turn a model source into a local path (downloading registry constants).

    Raises
    ------
    ModelNotFoundError
        When a path does not exist, or a constant is not cached and cannot be downloaded.
    """
    if isinstance(source, RegistryModel):
        return resolve(source, on_progress), source
    if isinstance(source, str) and source in REGISTRY and not Path(source).exists():
        return resolve(REGISTRY[source], on_progress), REGISTRY[source]
    if not isinstance(source, (str, os.PathLike)):
        raise InvalidParameterError(field, f"must be a path or a registry constant, got {type(source).__name__}")
    path = Path(source).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"{field}: no file or folder at {str(path)!r} (registry constants: {', '.join(sorted(REGISTRY))})"
        )
    return path, None


def _detect_family(path: Path, field: str, expected: tuple[str, ...], hint: str) -> ModelInfo:
    info = detect(path)
    if info.family not in expected:
        name = FAMILY_NAMES[info.family]
        article = "an" if name[0] in "AEIOUS" else "a"
        raise InvalidModelError(f"{field}: {path} is {article} {name} model; {hint}")
    return info


def _reject_companions(config: ModelConfig, family: str) -> None:
    for key in ("clip_l_model_src", "clip_g_model_src", "t5xxl_model_src", "llm_model_src"):
        if getattr(config, key) is not None:
            raise InvalidParameterError(
                f"model_config.{key}",
                f"{family} models carry their own text encoder; this companion is not used by them",
            )


def load_model(
    model_src: ModelSource,
    model_type: str = "diffusion",
    model_config: ModelConfig | Mapping[str, Any] | None = None,
    on_progress: Callable[[LoadProgress], None] | None = None,
) -> str:
    """Load a model and return its id.

    Parameters
    ----------
    model_src:
        A local file (all-in-one GGUF or safetensors, ESRGAN ``.pth``), a
        diffusers folder, or a registry constant such as ``SD_V2_1_1B_Q8_0``.
    model_type:
        ``"diffusion"`` (the only type sfumato serves).
    model_config:
        See :class:`~sfumato.params.ModelConfig`.
    on_progress:
        Receives :class:`LoadProgress` during download and load.

    Raises
    ------
    InvalidParameterError, ModelNotFoundError, InvalidModelError, UnsupportedModelError, EngineError
    """
    if model_type != "diffusion":
        raise InvalidParameterError("model_type", f"must be 'diffusion', got {model_type!r}")
    config = parse_model_config(model_config)
    check_device(config.device)
    report = on_progress or (lambda _p: None)
    started = time.perf_counter()
    path, registered = resolve_source(model_src, "model_src", lambda pct: report(LoadProgress(pct, "download")))
    report(LoadProgress(0.0, "load"))
    threads = config.threads or -1
    tile = (config.upscaler or UpscalerConfig()).tile_size
    diffusion_ctx: DiffusionContext | None = None
    upscaler_ctx: UpscalerContext | None = None
    if config.mode == "upscale":
        info = _detect_family(path, "model_src", (FAMILY_ESRGAN,), "mode='upscale' needs an ESRGAN upscaler")
        upscaler_ctx = UpscalerContext(str(path), n_threads=threads, tile_size=tile)
    else:
        info = _detect_family(
            path, "model_src", (FAMILY_SD1, FAMILY_SD2),
            "load ESRGAN upscalers with model_config={'mode': 'upscale'}",
        )  # fmt: skip
        _reject_companions(config, FAMILY_NAMES[info.family])
        vae_path = None
        if config.vae_model_src is not None:
            vae_path, _ = resolve_source(config.vae_model_src, "model_config.vae_model_src")
            read_tensor_table(vae_path)
        elif not info.has_vae:
            raise InvalidModelError(f"model_src: {path} has no VAE; pass model_config.vae_model_src")
        prediction = PREDICTIONS[config.prediction]
        if prediction is None and registered is not None:
            prediction = registered.prediction
        upscaler_path = None
        if config.upscaler is not None:
            upscaler_path, _ = resolve_source(config.upscaler.model_src, "model_config.upscaler.model_src")
            _detect_family(upscaler_path, "model_config.upscaler.model_src", (FAMILY_ESRGAN,), "an ESRGAN is needed")
        diffusion_ctx = DiffusionContext(
            ContextParams(
                model_path=str(path),
                vae_path=str(vae_path) if vae_path else None,
                n_threads=threads,
                wtype=config.weight_type,
                prediction=prediction,
                flash_attn=config.flash_attn,
                diffusion_flash_attn=config.flash_attn,
            )
        )
        if upscaler_path is not None:
            try:
                upscaler_ctx = UpscalerContext(
                    str(upscaler_path), n_threads=threads, tile_size=tile, parent=diffusion_ctx
                )
            except BaseException:
                diffusion_ctx.close()
                raise
    model_id = uuid.uuid4().hex
    loaded = LoadedModel(
        model_id=model_id,
        info=info,
        config=config,
        diffusion=diffusion_ctx,
        upscaler=upscaler_ctx,
        load_ms=(time.perf_counter() - started) * 1000.0,
        size_multiple=_SIZE_MULTIPLE.get(info.family, 8),
    )
    with _hosts_lock:
        _hosts[model_id] = ModelHost(loaded)
    report(LoadProgress(100.0, "load"))
    return model_id


def _host(model_id: str) -> ModelHost:
    if not isinstance(model_id, str):
        raise InvalidParameterError("model_id", f"must be a string, got {type(model_id).__name__}")
    with _hosts_lock:
        host = _hosts.get(model_id)
    if host is None:
        raise UnknownModelIdError(f"no loaded model has id {model_id!r} (never loaded, or unloaded)")
    return host


def unload_model(model_id: str, clear_storage: bool = False) -> None:
    """Unload a model: queued jobs fail with :class:`UnknownModelIdError`, the
    running one finishes, then its memory is freed.

    ``clear_storage=True`` also deletes the model's files from the model cache
    (only files sfumato downloaded there; never a path the caller gave).
    """
    host = _host(model_id)
    with _hosts_lock:
        _hosts.pop(model_id, None)
    host.close()
    if clear_storage:
        path = host.model.info.path
        if path.is_file() and path.parent == cache_dir():
            path.unlink()


def loaded_models() -> list[str]:
    """The ids of the models loaded now."""
    with _hosts_lock:
        return list(_hosts)


def _elapsed_ms(since: float) -> float:
    return (time.perf_counter() - since) * 1000.0


def _upscale_all(
    upscaler: UpscalerContext,
    pictures: list[ImageArray],
    repeats: int,
    tick: Callable[[ProgressTick], None],
    since: float,
) -> list[ImageArray]:
    total = len(pictures) * repeats
    out = []
    for i, picture in enumerate(pictures):
        for r in range(repeats):
            picture = upscaler.upscale(picture)
            tick(ProgressTick(i * repeats + r + 1, total, _elapsed_ms(since), PHASE_UPSCALE))
        out.append(picture)
    return out


def diffusion(
    model_id: str,
    *,
    prompt: str,
    negative_prompt: str = _D.negative_prompt,
    width: int | None = _D.width,
    height: int | None = _D.height,
    steps: int = _D.steps,
    cfg_scale: float = _D.cfg_scale,
    guidance: float = _D.guidance,
    sampling_method: str | None = _D.sampling_method,
    scheduler: str | None = _D.scheduler,
    seed: int = _D.seed,
    batch_count: int = _D.batch_count,
    vae_tiling: bool = _D.vae_tiling,
    cache_preset: str | None = _D.cache_preset,
    init_image: imaging.ImageInput | None = _D.init_image,
    strength: float = _D.strength,
    upscale: bool | Mapping[str, Any] | None = _D.upscale,
) -> DiffusionResult:
    """Generate images with a loaded model. Returns at once.

    The fields and their defaults are those of
    :class:`~sfumato.params.DiffusionParams`. ``init_image`` (PNG/JPEG bytes, a
    path, a PIL image or a numpy array) turns the call into img2img, with
    ``strength`` (0 keeps the source, 1 ignores it); when it differs from
    ``width`` x ``height`` it is resized (Lanczos) to that size. ``upscale``
    (``True`` or ``{"repeats": N}``) runs the model's paired ESRGAN N times on
    every image.

    Raises
    ------
    InvalidParameterError
        For any invalid field, naming it and what it allows.
    UnknownModelIdError, NoUpscalerError
    """
    called = time.perf_counter()
    params = validate_diffusion(
        DiffusionParams(
            prompt=prompt, negative_prompt=negative_prompt, width=width, height=height, steps=steps,
            cfg_scale=cfg_scale, guidance=guidance, sampling_method=sampling_method, scheduler=scheduler,
            seed=seed, batch_count=batch_count, vae_tiling=vae_tiling, cache_preset=cache_preset,
            init_image=init_image, strength=strength, upscale=upscale,
        )
    )  # fmt: skip
    host = _host(model_id)
    model = host.model
    if model.diffusion is None:
        raise InvalidParameterError("model_id", f"model {model_id!r} was loaded with mode='upscale'; call upscale()")
    repeats = check_upscale_repeats("upscale", params.upscale)
    if repeats and model.upscaler is None:
        raise NoUpscalerError(
            f"upscale: model {model_id!r} has no upscaler; load it with model_config.upscaler={{'model_src': ...}}"
        )
    source = None
    if params.init_image is not None:
        source = imaging.to_array(params.init_image, "init_image")
    w = params.width or (source.shape[1] if source is not None else DEFAULT_SIZE)
    h = params.height or (source.shape[0] if source is not None else DEFAULT_SIZE)
    check_side("width", w, model.size_multiple)
    check_side("height", h, model.size_multiple)
    if source is not None:
        source = imaging.resize(source, w, h)
    request = ImageRequest(
        prompt=params.prompt,
        negative_prompt=params.negative_prompt,
        width=w,
        height=h,
        steps=params.steps,
        cfg_scale=params.cfg_scale,
        guidance=params.guidance,
        sample_method=params.sampling_method,
        scheduler=params.scheduler,
        batch_count=params.batch_count,
        strength=params.strength,
        init_image=source,
        vae_tiling=params.vae_tiling,
        cache_threshold=CACHE_PRESETS[params.cache_preset] if params.cache_preset else None,
        seed=params.seed if params.seed >= 0 else secrets.randbelow(2**31),
    )
    result = DiffusionResult()

    def tick(t: ProgressTick) -> None:
        result.progress_stream.push(dataclasses.replace(t, elapsed_ms=_elapsed_ms(called)))

    def run() -> None:
        try:
            assert model.diffusion is not None
            out = model.diffusion.generate(request, on_tick=tick)
            post_start = time.perf_counter()
            pictures = out.images
            if repeats:
                assert model.upscaler is not None
                pictures = _upscale_all(model.upscaler, pictures, repeats, result.progress_stream.push, called)
            pngs = [imaging.encode_png(p) for p in pictures]
            post_ms = _elapsed_ms(post_start)
            denoise_ms = out.phase_ms.get(PHASE_SAMPLING, 0.0) + out.phase_ms.get(PHASE_HIRES, 0.0)
            stats = DiffusionStats(
                model_load_ms=model.load_ms,
                generation_ms=out.total_ms,
                total_generation_ms=out.total_ms + post_ms,
                total_wall_ms=_elapsed_ms(called),
                total_steps=out.sampling_steps,
                total_generations=1,
                total_images=len(pictures),
                total_pixels=sum(p.shape[0] * p.shape[1] for p in pictures),
                width=pictures[0].shape[1],
                height=pictures[0].shape[0],
                seed=out.seed,
                conditioning_ms=out.phase_ms.get(PHASE_CONDITIONING, 0.0),
                denoise_ms=denoise_ms,
                vae_decode_ms=out.phase_ms.get(PHASE_VAE, 0.0),
                postprocess_ms=post_ms,
                steps_per_second=out.sampling_steps / (denoise_ms / 1000.0) if denoise_ms > 0 else None,
            )
        except BaseException as exc:  # noqa: BLE001 - handed to the caller through the result
            result._fail(exc)
            return
        result._finish(pngs, stats)

    host.submit(run, result._fail)
    return result


def upscale(model_id: str, *, image: imaging.ImageInput, repeats: int = 1) -> DiffusionResult:
    """Upscale one image with the model's ESRGAN, ``repeats`` times in a row
    (x4 twice gives x16). Returns at once; the result has the shape of
    :func:`diffusion`'s.

    Raises
    ------
    InvalidParameterError, UnknownModelIdError, NoUpscalerError
    """
    called = time.perf_counter()
    n = check_int("repeats", repeats, 1, MAX_REPEATS)
    host = _host(model_id)
    model = host.model
    if model.upscaler is None:
        raise NoUpscalerError(
            f"model {model_id!r} has no upscaler: load an ESRGAN with model_config={{'mode': 'upscale'}}, "
            "or pair one with model_config.upscaler"
        )
    source = imaging.to_array(image, "image")
    result = DiffusionResult()

    def run() -> None:
        try:
            assert model.upscaler is not None
            start = time.perf_counter()
            (picture,) = _upscale_all(model.upscaler, [source], n, result.progress_stream.push, called)
            upscale_ms = _elapsed_ms(start)
            png = imaging.encode_png(picture)
            stats = DiffusionStats(
                model_load_ms=model.load_ms,
                generation_ms=upscale_ms,
                total_generation_ms=_elapsed_ms(start),
                total_wall_ms=_elapsed_ms(called),
                total_images=1,
                total_pixels=picture.shape[0] * picture.shape[1],
                width=picture.shape[1],
                height=picture.shape[0],
                postprocess_ms=_elapsed_ms(start),
            )
        except BaseException as exc:  # noqa: BLE001 - handed to the caller through the result
            result._fail(exc)
            return
        result._finish([png], stats)

    host.submit(run, result._fail)
    return result


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

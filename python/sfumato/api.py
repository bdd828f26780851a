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
import os
import secrets
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union, cast

import gguf
from PIL import Image

from sfumato import images as imaging
from sfumato.chain import RefinerPlan, run_with_refiner
from sfumato.engine.cpu_variants import ENV_CPU_VARIANT, bf16_variants, check_variant
from sfumato.engine.devices import Device, check_device, device_env
from sfumato.engine.kernels import ENV_PRECISION
from sfumato.engine.library import load_engine
from sfumato.engine.requests import (
    PHASE_CONDITIONING,
    PHASE_HIRES,
    PHASE_SAMPLING,
    PHASE_VAE,
    ContextParams,
    HiresParams,
    ImageRequest,
    PreviewMode,
    ProgressTick,
)
from sfumato.errors import (
    InvalidModelError,
    InvalidParameterError,
    ModelNotFoundError,
    NoUpscalerError,
    UnknownModelIdError,
)
from sfumato.families.companions import ROLES, check_companion, family_files, split_unet_hint
from sfumato.families.detect import (
    DIFFUSION_FAMILIES,
    FAMILY_ESRGAN,
    FAMILY_FLUX2,
    FAMILY_NAMES,
    FAMILY_SDXL,
    ModelInfo,
    check_lora_file,
    detect,
)
from sfumato.families.embeddings import TEXT_WIDTHS, Embedding, refuse_skipped, sort_out
from sfumato.families.embeddings import scan as scan_embeddings
from sfumato.params import (
    CACHE_PRESETS,
    DEFAULT_CFG_SCALE,
    DEFAULT_SIZE,
    FAMILY_CFG_SCALE,
    FAMILY_SIZE_MULTIPLE,
    HIRES_UPSCALERS,
    LORA_SUFFIXES,
    MAX_REPEATS,
    PREDICTION_NAMES,
    DiffusionParams,
    ModelConfig,
    UpscalerConfig,
    check_hires,
    check_int,
    check_loras,
    check_refiner,
    check_side,
    check_upscale_repeats,
    parse_model_config,
    validate_diffusion,
)
from sfumato.registry import REGISTRY, RegistryModel, cache_dir, resolve
from sfumato.results import DiffusionResult, DiffusionStats
from sfumato.runtime.host import REASON_CANCELLED, CancelReason, HostJob, LoadedModel, ModelHost
from sfumato.runtime.pool import Budget, ModelPool
from sfumato.runtime.protocol import ImageDone, JobDone, LoadSpec, Ready, RunJob

ModelSource = Union[str, "os.PathLike[str]", RegistryModel]
"""A local file, a diffusers folder, or a registry constant (or its name)."""

_D = DiffusionParams(prompt="")

_pool = ModelPool(Budget.from_env())
atexit.register(_pool.shutdown)  # no worker outlives the process that started it


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


def companion_files(
    sources: Mapping[str, Any],
    info: ModelInfo,
    key: Callable[[str], str] = lambda role: f"model_config.{ROLES[role].key}",
) -> dict[str, Path]:
    """Resolve and check the companion files ``sources`` (role -> path or registry
    constant) names for the model of ``info``; ``key`` names a role's field in errors.

    Raises
    ------
    InvalidParameterError
        For a required companion missing, one the model does not take, or one of the wrong kind.
    ModelNotFoundError
        For a path that does not exist.
    """
    files = family_files(info)
    family = FAMILY_NAMES[info.family]
    found: dict[str, Path] = {}
    for role in ROLES.values():
        source = sources.get(role.name)
        if source is None:
            if role.name in files.required:
                what = "a diffusion model alone" if info.split else f"a {family} checkpoint without its {role.label}"
                raise InvalidParameterError(
                    key(role.name), f"required: {info.path} is {what}; pass its {role.label} here"
                )
            continue
        if role.name not in files.accepted:
            takes = ", ".join(f"{key(r)} ({ROLES[r].label})" for r in files.accepted)
            why = (
                f"{info.path} carries its own {role.label}" if role.name in info.carries else f"{family} takes {takes}"
            )
            raise InvalidParameterError(key(role.name), f"not used: {why}")
        path, _ = resolve_source(source, key(role.name))
        try:
            check_companion(path, role.name, info)
        except InvalidParameterError as exc:
            raise InvalidParameterError(key(role.name), exc.message) from None
        found[role.name] = path.resolve()
    return found


def _embeddings(config: ModelConfig, info: ModelInfo) -> tuple[dict[str, Embedding], dict[str, str]]:
    """The embeddings of ``model_config.embedding_dir`` that the model's text encoders
    take, by name, and why each other file of the folder is skipped."""
    if config.embedding_dir is None:
        return {}, {}
    if info.family not in TEXT_WIDTHS:
        takes = ", ".join(FAMILY_NAMES[f] for f in TEXT_WIDTHS)
        raise InvalidParameterError(
            "model_config.embedding_dir",
            f"{FAMILY_NAMES[info.family]} has no CLIP text encoder to take textual-inversion embeddings ({takes} do)",
        )
    return sort_out(*scan_embeddings(config.embedding_dir), info.family)


def check_precision(precision: str, device: Device, variants: dict[str, Path], cpu_variant: str | None) -> None:
    """Refuse ``model_config.precision='bf16'`` where it cannot run: a GPU device, a CPU
    without AVX512-BF16 or AMX-BF16, or a named CPU variant without the bf16 kernels.

    Raises
    ------
    InvalidParameterError
        Naming ``model_config.precision`` (or ``model_config.cpu_variant``) and why.
    """
    if precision != "bf16":
        return
    if device.type != "cpu":
        raise InvalidParameterError(
            "model_config.precision", f"'bf16' is a mode of sfumato's CPU kernels, and this model runs on {device.name}"
        )
    carriers = bf16_variants(variants, "model_config.precision")
    if cpu_variant is not None and cpu_variant not in carriers:
        raise InvalidParameterError(
            "model_config.cpu_variant", f"{cpu_variant!r} has no bf16 kernels; precision 'bf16' runs {sorted(carriers)}"
        )


def weight_bytes(file_bytes: int, weight_type: str | None) -> int:
    """A model's weights in memory: its files' size, scaled by ``weight_type``'s bits
    per weight (gguf's block sizes) over 16 when it is converted at load (releases are
    f16 files)."""
    if weight_type is None:
        return file_bytes
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[weight_type.upper()]]
    return int(file_bytes * (size * 8 / block) / 16.0)


def _file_bytes(path: Path | None) -> int:
    if path is None:
        return 0
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


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
    if model_type != "diffusion":
        raise InvalidParameterError("model_type", f"must be 'diffusion', got {model_type!r}")
    config = parse_model_config(model_config)
    device = check_device(config.device)
    variants = load_engine().cpu_variants
    cpu_variant = check_variant(config.cpu_variant, variants, "model_config.cpu_variant")
    weight_type = config.weight_type
    check_precision(config.precision, device, variants, cpu_variant)
    if config.precision == "bf16":
        weight_type = weight_type or "bf16"
    report = on_progress or (lambda _p: None)
    path, registered = resolve_source(model_src, "model_src", lambda pct: report(LoadProgress(pct, "download")))
    report(LoadProgress(0.0, "load"))
    path = path.resolve()
    threads = config.threads or -1
    tile = (config.upscaler or UpscalerConfig()).tile_size
    context: ContextParams | None = None
    upscaler_path = None
    companions: dict[str, Path] = {}
    embeddings: dict[str, Embedding] = {}
    skipped_embeddings: dict[str, str] = {}
    if config.mode == "upscale":
        info = _detect_family(path, "model_src", (FAMILY_ESRGAN,), "mode='upscale' needs an ESRGAN upscaler")
        upscaler_path = path
    else:
        info = _detect_family(
            path, "model_src", DIFFUSION_FAMILIES, "load ESRGAN upscalers with model_config={'mode': 'upscale'}"
        )
        companions = companion_files({r.name: getattr(config, r.key) for r in ROLES.values()}, info)
        prediction = PREDICTION_NAMES[config.prediction]
        if prediction is None and registered is not None:
            prediction = registered.prediction
        if config.upscaler is not None:
            upscaler_path, _ = resolve_source(config.upscaler.model_src, "model_config.upscaler.model_src")
            _detect_family(upscaler_path, "model_config.upscaler.model_src", (FAMILY_ESRGAN,), "an ESRGAN is needed")
            upscaler_path = upscaler_path.resolve()
        embeddings, skipped_embeddings = _embeddings(config, info)
        named = {role: str(file) for role, file in companions.items()}
        model_path = None if info.split else str(path)
        if info.split and info.family == FAMILY_SDXL:
            model_path = str(split_unet_hint(cache_dir() / "hints"))
        context = ContextParams(
            model_path=model_path,
            diffusion_model_path=str(path) if info.split else None,
            clip_l_path=named.get("clip_l"),
            clip_g_path=named.get("clip_g"),
            t5xxl_path=named.get("t5xxl"),
            llm_path=named.get("llm"),
            vae_path=named.get("vae"),
            taesd_path=named.get("taesd"),
            tae_preview_only=config.taesd_preview_only,
            control_net_path=named.get("control_net"),
            embeddings=tuple((e.name, str(e.path)) for e in embeddings.values()),
            n_threads=threads,
            wtype=weight_type,
            prediction=prediction,
            flash_attn=config.flash_attn,
            diffusion_flash_attn=config.flash_attn,
            offload_params_to_cpu=config.offload_to_cpu,
            keep_clip_on_cpu=config.keep_clip_on_cpu,
            keep_vae_on_cpu=config.keep_vae_on_cpu,
            max_vram=float(config.max_vram),
            diffusion_conv_direct=config.conv_direct,
            vae_conv_direct=config.conv_direct,
            rng=config.rng,
        )
    spec = LoadSpec(
        model_id=uuid.uuid4().hex,
        context=context,
        upscaler_path=str(upscaler_path) if upscaler_path else None,
        threads=threads,
        tile_size=tile,
    )
    env = device_env(device)
    if cpu_variant is not None:
        env[ENV_CPU_VARIANT] = cpu_variant
    env[ENV_PRECISION] = config.precision
    model = LoadedModel(
        model_id=spec.model_id,
        info=info,
        config=config,
        has_diffusion=context is not None,
        has_upscaler=upscaler_path is not None,
        size_multiple=FAMILY_SIZE_MULTIPLE.get(info.family, 8),
        skipped_embeddings=skipped_embeddings,
        device=device.name,
        device_bytes=device.memory_total,
        weight_bytes=weight_bytes(
            sum(_file_bytes(p) for p in {path, upscaler_path, *companions.values()}), weight_type
        ),
    )

    def create() -> ModelHost:
        host = ModelHost(model, spec, env, before_start=_pool.make_room)
        host.start()
        return host

    key = (repr(dataclasses.replace(spec, model_id="")), tuple(sorted(env.items())))
    model_id, _ = _pool.acquire(key, spec.model_id, create, model.weight_bytes)
    report(LoadProgress(100.0, "load"))
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


def _elapsed_ms(since: float) -> float:
    return (time.perf_counter() - since) * 1000.0


class _Report:
    """Hands one job's events to its :class:`DiffusionResult`."""

    def __init__(self, result: DiffusionResult, called: float, upscale_only: bool) -> None:
        self.result = result
        self.called = called
        self.upscale_only = upscale_only
        self.sizes: dict[int, tuple[int, int]] = {}

    def started(self) -> None:
        self.result._start()

    def tick(self, tick: ProgressTick) -> None:
        self.result.progress_stream.push(dataclasses.replace(tick, elapsed_ms=_elapsed_ms(self.called)))

    def image(self, image: ImageDone) -> None:
        self.sizes[image.index] = (image.width, image.height)
        self.result._add_image(image.index, image.png)

    def failed(self, error: BaseException) -> None:
        self.result._fail(error)

    def cancelled(self, reason: CancelReason) -> None:
        self.result._cancelled(reason)

    def finished(self, done: JobDone, ready: Ready) -> None:
        pngs = self.result.partial_outputs
        width, height = self.sizes[0]
        common = dict(
            model_load_ms=ready.load_ms,
            generation_ms=done.generation_ms,
            total_generation_ms=done.generation_ms + done.postprocess_ms,
            total_wall_ms=_elapsed_ms(self.called),
            total_images=len(pngs),
            total_pixels=sum(w * h for w, h in self.sizes.values()),
            width=width,
            height=height,
            device=ready.device,
        )
        if self.upscale_only:
            stats = DiffusionStats(**common, postprocess_ms=done.generation_ms + done.postprocess_ms)  # type: ignore[arg-type]
        else:
            denoise_ms = done.phase_ms.get(PHASE_SAMPLING, 0.0) + done.phase_ms.get(PHASE_HIRES, 0.0)
            stats = DiffusionStats(
                **common,  # type: ignore[arg-type]
                total_steps=done.sampling_steps,
                total_generations=len(pngs),
                seed=done.seed,
                conditioning_ms=done.phase_ms.get(PHASE_CONDITIONING, 0.0),
                denoise_ms=denoise_ms,
                vae_decode_ms=done.phase_ms.get(PHASE_VAE, 0.0),
                postprocess_ms=done.postprocess_ms,
                steps_per_second=done.sampling_steps / (denoise_ms / 1000.0) if denoise_ms > 0 else None,
                decoder=ready.decoder,
            )
        self.result._finish(pngs, stats)


def _check_timeout(timeout: object) -> None:
    """``timeout``: ``None`` or a positive number of seconds."""
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise InvalidParameterError("timeout", f"must be a positive number of seconds or None, got {timeout!r}")


def _submit(host: ModelHost, run: RunJob, called: float, timeout: float | None) -> DiffusionResult:
    _check_timeout(timeout)
    result = DiffusionResult()
    job = HostJob(run, _Report(result, called, run.request is None), timeout)
    result._bind(lambda: host.cancel(job, REASON_CANCELLED))
    host.submit(job)
    return result


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
    hires: bool | Mapping[str, Any] | None = _D.hires,
    loras: Sequence[Any] = _D.loras,
    clip_skip: int = _D.clip_skip,
    eta: float | None = _D.eta,
    img_cfg_scale: float | None = _D.img_cfg_scale,
    init_images: Sequence[imaging.ImageInput] = _D.init_images,
    control_image: imaging.ImageInput | None = _D.control_image,
    control_strength: float = _D.control_strength,
    preview: str | None = _D.preview,
    preview_interval: int = _D.preview_interval,
    refiner: Mapping[str, Any] | None = None,
    timeout: float | None = None,
) -> DiffusionResult:
    """Generate images with a loaded model. Returns at once.

    The fields and their defaults are those of
    :class:`~sfumato.params.DiffusionParams`. ``init_image`` (PNG/JPEG bytes, a
    path, a PIL image or a numpy array) turns the call into img2img, with
    ``strength`` (0 keeps the source, 1 ignores it); when it differs from
    ``width`` x ``height`` it is resized (Lanczos) to that size. On FLUX.2
    (loaded with ``model_config.prediction="flux2_flow"``), ``init_image`` and
    the ``init_images`` list are reference images for in-context
    conditioning, taken as they are, and ``strength`` is ignored. ``mask`` (an
    image in the same forms, read as grey levels, resized bilinearly) makes it
    inpainting: white pixels are generated anew, black ones keep the source.
    ``hires`` (``True`` or :class:`~sfumato.params.HiresConfig` fields) adds a
    second pass at ``scale`` times the size, rounded up to the model's size
    multiple; its ticks have phase ``"hires"``. ``loras`` applies LoRAs: names
    (looked up in ``model_config.lora_dir``, never outside it), absolute paths,
    or ``{"name" | "path": ..., "scale": 1.0}``. ``upscale``
    (``True`` or ``{"repeats": N}``) runs the model's paired ESRGAN N times on
    every image. Image ``i`` of a batch is generated with ``seed + i``, on its
    own, exactly as a single call with that seed would be. ``control_image``
    (an image in the same forms, resized to the output size) guides a model
    loaded with ``model_config.control_net_src``, scaled by ``control_strength``.
    ``preview="proj"`` (or ``"tae"``, ``"vae"``) puts a PNG of the image as it forms on the
    sampling ticks of the progress stream (``tick.preview``), every
    ``preview_interval`` steps.
    ``refiner``
    (``{"model_id": <a loaded model>, "switch_at": 0.8}``) refines every image
    on a second model, as :mod:`sfumato.chain` describes: img2img at strength
    ``1 - switch_at`` with the same prompt and seed, ticks of phase
    ``"refiner"``; any ``upscale`` passes run after it. ``timeout`` (seconds
    of running, queueing excluded, for each model's part) cancels the job
    with reason ``"timeout"``.

    Raises
    ------
    InvalidParameterError
        For any invalid field, naming it and what it allows.
    UnknownModelIdError, NoUpscalerError
    """
    called = time.perf_counter()
    given = locals()
    params = validate_diffusion(DiffusionParams(**{f.name: given[f.name] for f in dataclasses.fields(DiffusionParams)}))
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
        return _submit(host, RunJob(request=request, repeats=repeats), called, timeout)
    _check_timeout(timeout)
    plan = RefinerPlan(
        base=lambda job: _submit(host, job, called, timeout),
        refiner=lambda job: _submit(second, job, called, timeout),
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


def image_request(params: DiffusionParams, model: LoadedModel, refiner: LoadedModel | None = None) -> ImageRequest:
    """The engine's request for validated ``params`` on a loaded ``model``: the
    FLUX.2 reference rules, the size (given, else the source image's, else the
    default; a multiple of what both models take), the source and mask resized to
    it, LoRA files and hires resolved, the family's cfg default and a drawn seed.

    Raises
    ------
    InvalidParameterError
        Naming the field at fault.
    """
    prompts = {"prompt": params.prompt, "negative_prompt": params.negative_prompt}
    refuse_skipped(prompts, model.skipped_embeddings, "this model")
    if params.preview == "tae" and model.config.taesd_src is None:
        raise InvalidParameterError("preview", "'tae' needs a tiny autoencoder: load the model with its taesd_src")
    source = None
    if params.init_image is not None:
        source = imaging.to_array(params.init_image, "init_image")
    references = [imaging.to_array(image, f"init_images[{i}]") for i, image in enumerate(params.init_images)]
    if model.info.family == FAMILY_FLUX2:
        if (source is not None or references) and model.config.prediction != "flux2_flow":
            raise InvalidParameterError(
                "init_image" if source is not None else "init_images",
                "FLUX.2 transforms images by in-context conditioning, which needs "
                "model_config.prediction='flux2_flow' at load_model time",
            )
        if params.mask is not None:
            raise InvalidParameterError("mask", "FLUX.2 [klein] has no inpainting path; use an SD-family model")
        references = ([source] if source is not None else []) + references
        source = None
    elif references:
        raise InvalidParameterError(
            "init_images", "several reference images need FLUX.2 (in-context conditioning); img2img takes init_image"
        )
    first = source if source is not None else (references[0] if references else None)
    w = params.width or (first.shape[1] if first is not None else DEFAULT_SIZE)
    h = params.height or (first.shape[0] if first is not None else DEFAULT_SIZE)
    multiple = max(model.size_multiple, refiner.size_multiple if refiner else 1)
    check_side("width", w, multiple)
    check_side("height", h, multiple)
    if source is not None:
        source = imaging.resize(source, w, h)
    mask_array = None
    if params.mask is not None:
        # Bilinear: a mask must not ring past its edges as Lanczos would.
        grey = imaging.to_array(params.mask, "mask", mode="L")
        mask_array = imaging.resize(grey, w, h, Image.Resampling.BILINEAR)
    control = None
    if params.control_image is not None:
        if model.config.control_net_src is None:
            raise InvalidParameterError(
                "control_image", "needs a ControlNet: load the model with model_config.control_net_src"
            )
        control = imaging.resize(imaging.to_array(params.control_image, "control_image"), w, h)
    return ImageRequest(
        control_image=control,
        control_strength=params.control_strength,
        preview=cast("PreviewMode | None", params.preview),
        preview_interval=params.preview_interval,
        hires=_engine_hires(params.hires),
        loras=_lora_files(params.loras, model.config.lora_dir),
        prompt=params.prompt,
        negative_prompt=params.negative_prompt,
        width=w,
        height=h,
        steps=params.steps,
        cfg_scale=FAMILY_CFG_SCALE.get(model.info.family, DEFAULT_CFG_SCALE)
        if params.cfg_scale is None
        else params.cfg_scale,
        guidance=params.guidance,
        clip_skip=params.clip_skip,
        eta=params.eta,
        img_cfg_scale=params.img_cfg_scale,
        ref_images=references,
        sample_method=params.sampling_method,
        scheduler=params.scheduler,
        batch_count=params.batch_count,
        strength=params.strength,
        init_image=source,
        mask_image=mask_array,
        vae_tiling=params.vae_tiling,
        cache_threshold=CACHE_PRESETS[params.cache_preset] if params.cache_preset else None,
        seed=params.seed if params.seed >= 0 else secrets.randbelow(2**31),
    )


def _lora_files(value: object, folder: Path | None) -> list[tuple[str, float]]:
    """``loras`` as ``(file, scale)``: names are matched against the folder's
    listing (never joined onto it); every file must hold LoRA tensors."""
    out = []
    for i, (item, scale) in enumerate(check_loras("loras", value)):
        field = f"loras[{i}]"
        path = Path(item).expanduser()
        if not path.is_absolute():
            if folder is None:
                raise InvalidParameterError(
                    field, f"{item!r} is a name; set model_config.lora_dir, or give an absolute path"
                )
            listing = {p.stem: p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in LORA_SUFFIXES}
            listing.update({p.name: p for p in listing.values()})
            if str(item) not in listing:
                have = ", ".join(sorted(p.stem for p in set(listing.values()))) or "none"
                raise InvalidParameterError(field, f"no LoRA named {str(item)!r} in {folder}; available: {have}")
            path = listing[str(item)]
        check_lora_file(path, field)
        out.append((str(path), scale))
    return out


def _engine_hires(value: object) -> HiresParams | None:
    """``hires`` in engine terms; an ESRGAN upscaler is resolved and checked from its header."""
    config = check_hires("hires", value)
    if config is None:
        return None
    upscaler, model_path = config.upscaler, None
    if not (isinstance(upscaler, str) and upscaler in HIRES_UPSCALERS):
        path, _ = resolve_source(upscaler, "hires.upscaler")
        hint = f"hires.upscaler takes one of {', '.join(HIRES_UPSCALERS)} or an ESRGAN model"
        _detect_family(path, "hires.upscaler", (FAMILY_ESRGAN,), hint)
        upscaler, model_path = "Model", str(path)
    return HiresParams(
        upscaler=upscaler, model_path=model_path, scale=config.scale, steps=config.steps,
        denoising_strength=config.denoising_strength, tile_size=config.tile_size,
    )  # fmt: skip


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
    return _submit(host, RunJob(image=source, repeats=n), called, timeout)


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

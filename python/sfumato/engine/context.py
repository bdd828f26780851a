"""Native handles: :class:`DiffusionContext` and :class:`UpscalerContext`.

These run the engine in the calling process and thread, synchronously, one job
per context at a time. They are the lowest tier of sfumato, for library authors
who want no worker processes and no IPC. Each object owns one native handle:
``close()`` may be called any number of times, both are context managers, and
any use after close raises :class:`~sfumato.errors.ClosedError`.

Images cross the boundary as ``numpy`` arrays of shape ``(height, width,
channels)`` and dtype ``uint8``. Engine buffers are copied into Python memory
and freed at once; nothing returned points into engine memory.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt

from sfumato.engine import callbacks
from sfumato.engine.library import PREDICTIONS, SAMPLE_METHODS, SCHEDULERS, Engine, load_engine
from sfumato.errors import ClosedError, EngineError, InvalidParameterError

ImageArray = npt.NDArray[np.uint8]

# Weight types offered for ``wtype``: the engine's own names.
WEIGHT_TYPES: dict[str, str] = {
    "f32": "SD_TYPE_F32", "f16": "SD_TYPE_F16", "bf16": "SD_TYPE_BF16",
    "q8_0": "SD_TYPE_Q8_0", "q5_0": "SD_TYPE_Q5_0", "q5_1": "SD_TYPE_Q5_1",
    "q4_0": "SD_TYPE_Q4_0", "q4_1": "SD_TYPE_Q4_1", "q2_k": "SD_TYPE_Q2_K",
    "q3_k": "SD_TYPE_Q3_K", "q4_k": "SD_TYPE_Q4_K", "q5_k": "SD_TYPE_Q5_K",
    "q6_k": "SD_TYPE_Q6_K",
}  # fmt: skip
RNG_TYPES: dict[str, str] = {"std_default": "STD_DEFAULT_RNG", "cuda": "CUDA_RNG", "cpu": "CPU_RNG"}

PHASE_CONDITIONING = "conditioning"
PHASE_SAMPLING = "sampling"
PHASE_HIRES = "hires"
PHASE_VAE = "vae"
PHASE_UPSCALE = "upscale"


@dataclass(frozen=True)
class ProgressTick:
    """One progress report of a running job.

    Attributes
    ----------
    step:
        Units of work done in this phase (sampling steps across the whole
        batch, latents decoded, upscale passes done).
    total_steps:
        Units of work this phase has in all.
    elapsed_ms:
        Milliseconds since the job started.
    phase:
        ``"sampling"``, ``"hires"``, ``"vae"`` or ``"upscale"``.
    """

    step: int
    total_steps: int
    elapsed_ms: float
    phase: str = PHASE_SAMPLING


TickCallback = Callable[[ProgressTick], None]


@dataclass
class ContextParams:
    """What a :class:`DiffusionContext` is created from (``sd_ctx_params_t``).

    Paths left ``None`` are not passed. ``n_threads=-1`` lets the engine use
    its count of physical cores. ``wtype=None`` keeps each tensor's own type.
    ``prediction=None`` lets the engine detect it from the weights.
    """

    model_path: str | None = None
    diffusion_model_path: str | None = None
    clip_l_path: str | None = None
    clip_g_path: str | None = None
    t5xxl_path: str | None = None
    llm_path: str | None = None
    vae_path: str | None = None
    taesd_path: str | None = None
    n_threads: int = -1
    wtype: str | None = None
    rng: str = "cuda"
    prediction: str | None = None
    vae_decode_only: bool = False
    flash_attn: bool = False
    diffusion_flash_attn: bool = False
    diffusion_conv_direct: bool = False
    vae_conv_direct: bool = False
    offload_params_to_cpu: bool = False
    keep_clip_on_cpu: bool = False
    keep_vae_on_cpu: bool = False
    enable_mmap: bool = False
    # LoRAs are applied in the graph, never merged into the weights: merging and
    # unmerging between requests drifts the weights (a request without a LoRA
    # after one with it did not give the same image).
    lora_apply_mode: str = "at_runtime"


LORA_APPLY_MODES = ("auto", "immediately", "at_runtime")


@dataclass
class HiresParams:
    """Hires fix as the engine runs it (``sd_hires_params_t``)."""

    upscaler: str = "Latent"
    model_path: str | None = None
    scale: float = 2.0
    steps: int = 0
    denoising_strength: float = 0.7
    tile_size: int = 128


@dataclass
class ImageRequest:
    """One ``generate_image`` call, in engine terms (``sd_img_gen_params_t``).

    ``sample_method`` / ``scheduler`` / ``eta`` / ``img_cfg_scale`` left ``None``
    take the engine's choice for the loaded model. ``seed`` must be >= 0 here:
    choosing a random seed is the caller's job, so that it can be reported.
    """

    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    steps: int = 20
    cfg_scale: float = 7.0
    img_cfg_scale: float | None = None
    guidance: float = 3.5
    sample_method: str | None = None
    scheduler: str | None = None
    eta: float | None = None
    seed: int = 0
    batch_count: int = 1
    clip_skip: int = -1
    strength: float = 0.75
    init_image: ImageArray | None = None
    mask_image: ImageArray | None = None
    ref_images: Sequence[ImageArray] = ()
    vae_tiling: bool = False
    cache_threshold: float | None = None
    loras: Sequence[tuple[str, float]] = ()
    hires: HiresParams | None = None


@dataclass
class GenerationOutput:
    """What one ``generate_image`` call produced.

    Attributes
    ----------
    images:
        ``batch_count`` arrays of shape ``(height, width, 3)``, uint8, owned by Python.
    seed:
        The seed of the first image; image ``i`` used ``seed + i``.
    phase_ms:
        Milliseconds spent in each engine phase that ran (conditioning,
        sampling, hires, vae), measured from the engine's own phase reports.
    total_ms:
        Wall time of the whole call.
    sampling_steps:
        Sampling steps the engine ran, over the whole batch.
    """

    images: list[ImageArray]
    seed: int
    phase_ms: dict[str, float] = field(default_factory=dict)
    total_ms: float = 0.0
    sampling_steps: int = 0


_DECODED = re.compile(r"^latent (\d+) decoded")


class _PhaseTracker:
    """Turns the engine's progress and log events of one call into phase timings
    and phase-tagged ticks.

    The engine reports sampling steps through the progress callback and marks
    phase boundaries in its log; this pins both to the exact engine version
    sfumato requires (the ABI check guards that version).
    """

    def __init__(self, on_tick: TickCallback | None, batch_count: int, started: float) -> None:
        self.error: BaseException | None = None
        self._on_tick = on_tick
        self._batch = batch_count
        self._started = started
        self._phase = PHASE_CONDITIONING
        self._phase_start = started
        self.phase_ms: dict[str, float] = {}
        self._images_sampled = 0
        self._last_steps = 0
        self.sampling_steps = 0

    def _elapsed_ms(self) -> float:
        return (time.perf_counter() - self._started) * 1000.0

    def _enter(self, phase: str) -> None:
        now = time.perf_counter()
        self.phase_ms[self._phase] = self.phase_ms.get(self._phase, 0.0) + (now - self._phase_start) * 1000
        self._phase, self._phase_start = phase, now

    def finish(self) -> None:
        self._enter("done")
        self.phase_ms.pop("done", None)

    def _tick(self, step: int, total: int, phase: str) -> None:
        if self._on_tick is not None:
            self._on_tick(ProgressTick(step, total, self._elapsed_ms(), phase))

    def on_progress(self, step: int, steps: int, seconds_per_step: float) -> None:
        if self._phase not in (PHASE_SAMPLING, PHASE_HIRES) or step <= 0:
            return
        self._last_steps = steps
        self.sampling_steps += 1
        self._tick(self._images_sampled * steps + step, self._batch * steps, self._phase)

    def on_log(self, level: int, message: str) -> None:
        if message.startswith("get_learned_condition completed"):
            self._enter(PHASE_SAMPLING)
        elif message.startswith(("sampling completed", "hires sampling ")):
            self._images_sampled += 1
        elif message.startswith("hires fix: upscaling"):
            self._images_sampled = 0
            self._enter(PHASE_HIRES)
        elif message.startswith("decoding ") and message.endswith("latents"):
            self._enter(PHASE_VAE)
        elif match := _DECODED.match(message):
            self._tick(int(match.group(1)), self._batch, PHASE_VAE)


class _NativeHandle:
    """Shared ownership logic: one native pointer, freed exactly once."""

    _handle: Any = None  # NULL until opened, and again after close().
    _engine: Engine | None = None

    def _free(self, handle: Any) -> None:
        raise NotImplementedError

    @property
    def engine(self) -> Engine:
        """The engine library this handle belongs to."""
        assert self._engine is not None
        return self._engine

    def close(self) -> None:
        """Free the native handle. Safe to call more than once."""
        handle, self._handle = self._handle, None
        if handle is not None:
            self._free(handle)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run."""
        return self._handle is None

    def _require_open(self) -> Any:
        if self._handle is None:
            raise ClosedError(f"{type(self).__name__} is closed")
        return self._handle

    def __enter__(self) -> _NativeHandle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def _enum(lib: Any, table: dict[str, str], value: str, field_name: str) -> int:
    try:
        return int(getattr(lib, table[value]))
    except KeyError:
        raise InvalidParameterError(field_name, f"{value!r} is not one of {sorted(table)}") from None


def _index(names: tuple[str, ...], value: str, field_name: str) -> int:
    try:
        return names.index(value)
    except ValueError:
        raise InvalidParameterError(field_name, f"{value!r} is not one of {list(names)}") from None


def _as_image(array: ImageArray, channels: int, field_name: str) -> ImageArray:
    image = np.ascontiguousarray(array, dtype=np.uint8)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] != channels:
        raise InvalidParameterError(
            field_name, f"expected an image of shape (height, width, {channels}), got {array.shape}"
        )
    return np.ascontiguousarray(image)


class DiffusionContext(_NativeHandle):
    """A loaded diffusion model (``sd_ctx_t``), run in this process.

    Parameters
    ----------
    params:
        Model files and engine options.
    engine:
        An opened engine; the default opens the one the locator finds.

    Raises
    ------
    EngineError
        When the engine fails to create the context (it says why in its log,
        which :mod:`logging` receives under ``sfumato.engine``).
    """

    def __init__(self, params: ContextParams, engine: Engine | None = None) -> None:
        self._engine = engine or load_engine()
        self.params = params
        self._lock = threading.Lock()
        ffi, lib = self._engine.ffi, self._engine.lib
        callbacks.install(self._engine)
        keep: list[Any] = []
        c = ffi.new("sd_ctx_params_t*")
        lib.sd_ctx_params_init(c)
        for name in (
            "model_path", "diffusion_model_path", "clip_l_path", "clip_g_path",
            "t5xxl_path", "llm_path", "vae_path", "taesd_path",
        ):  # fmt: skip
            value = getattr(params, name)
            if value is not None:
                keep.append(ffi.new("char[]", value.encode()))
                setattr(c, name, keep[-1])
        if params.n_threads > 0:
            c.n_threads = params.n_threads
        if params.wtype is not None:
            c.wtype = _enum(lib, WEIGHT_TYPES, params.wtype, "wtype")
        c.rng_type = _enum(lib, RNG_TYPES, params.rng, "rng")
        if params.prediction is not None:
            c.prediction = _index(PREDICTIONS, params.prediction, "prediction")
        c.vae_decode_only = params.vae_decode_only
        # Keep weights resident so the context serves many generations.
        c.free_params_immediately = False
        c.flash_attn = params.flash_attn
        c.diffusion_flash_attn = params.diffusion_flash_attn
        c.diffusion_conv_direct = params.diffusion_conv_direct
        c.vae_conv_direct = params.vae_conv_direct
        c.offload_params_to_cpu = params.offload_params_to_cpu
        c.keep_clip_on_cpu = params.keep_clip_on_cpu
        c.keep_vae_on_cpu = params.keep_vae_on_cpu
        c.enable_mmap = params.enable_mmap
        c.lora_apply_mode = _index(LORA_APPLY_MODES, params.lora_apply_mode, "lora_apply_mode")
        self.n_threads = int(c.n_threads)
        with callbacks.listening(None):
            handle = lib.new_sd_ctx(c)
        if handle == ffi.NULL:
            raise EngineError(
                "the engine could not load the model "
                f"({params.model_path or params.diffusion_model_path}); see the "
                "'sfumato.engine' log for its reason"
            )
        self._handle = handle

    def _free(self, handle: Any) -> None:
        self.engine.lib.free_sd_ctx(handle)

    def default_sample_method(self) -> str:
        """The sampler the engine picks for this model when none is given."""
        handle = self._require_open()
        return SAMPLE_METHODS[int(self.engine.lib.sd_get_default_sample_method(handle))]

    def default_scheduler(self, sample_method: str) -> str:
        """The scheduler the engine picks for this model and sampler."""
        handle = self._require_open()
        index = _index(SAMPLE_METHODS, sample_method, "sampling_method")
        return SCHEDULERS[int(self.engine.lib.sd_get_default_scheduler(handle, index))]

    def generate(self, request: ImageRequest, on_tick: TickCallback | None = None) -> GenerationOutput:
        """Run one generation and return its images, copied into Python memory.

        ``on_tick`` receives :class:`ProgressTick` events on this thread. An
        exception it raises stops the reporting and is re-raised here once the
        engine returns (the engine itself cannot be interrupted).

        Raises
        ------
        EngineError
            When the engine returns no images.
        """
        handle = self._require_open()
        if request.seed < 0:
            raise InvalidParameterError("seed", "the engine layer needs a seed >= 0")
        ffi, lib = self.engine.ffi, self.engine.lib
        keep: list[Any] = []

        def cstr(text: str) -> Any:
            keep.append(ffi.new("char[]", text.encode()))
            return keep[-1]

        def image(array: ImageArray, channels: int, field_name: str) -> Any:
            data = _as_image(array, channels, field_name)
            keep.append(data)
            return (data.shape[1], data.shape[0], channels, ffi.from_buffer("uint8_t[]", data))

        p = ffi.new("sd_img_gen_params_t*")
        lib.sd_img_gen_params_init(p)
        p.prompt = cstr(request.prompt)
        p.negative_prompt = cstr(request.negative_prompt)
        p.clip_skip = request.clip_skip
        p.width, p.height = request.width, request.height
        p.strength = request.strength
        p.seed = request.seed
        p.batch_count = request.batch_count
        sample = p.sample_params
        sample.sample_steps = request.steps
        sample.guidance.txt_cfg = request.cfg_scale
        sample.guidance.distilled_guidance = request.guidance
        if request.img_cfg_scale is not None:
            sample.guidance.img_cfg = request.img_cfg_scale
        if request.sample_method is not None:
            sample.sample_method = _index(SAMPLE_METHODS, request.sample_method, "sampling_method")
        if request.scheduler is not None:
            sample.scheduler = _index(SCHEDULERS, request.scheduler, "scheduler")
        if request.eta is not None:
            sample.eta = request.eta
        if request.init_image is not None:
            p.init_image = image(request.init_image, 3, "init_image")
        if request.mask_image is not None:
            p.mask_image = image(request.mask_image, 1, "mask")
        if request.ref_images:
            refs = ffi.new("sd_image_t[]", len(request.ref_images))
            for i, ref in enumerate(request.ref_images):
                refs[i] = image(ref, 3, f"init_images[{i}]")
            keep.append(refs)
            p.ref_images, p.ref_images_count = refs, len(request.ref_images)
        p.vae_tiling_params.enabled = request.vae_tiling
        if request.cache_threshold is not None:
            p.cache.mode = lib.SD_CACHE_EASYCACHE
            p.cache.reuse_threshold = request.cache_threshold
        if request.loras:
            loras = ffi.new("sd_lora_t[]", len(request.loras))
            for i, (path, multiplier) in enumerate(request.loras):
                loras[i].path, loras[i].multiplier = cstr(path), multiplier
            keep.append(loras)
            p.loras, p.lora_count = loras, len(request.loras)
        if request.hires is not None:
            hires = request.hires
            names = {bytes(ffi.string(lib.sd_hires_upscaler_name(i))).decode(): i
                     for i in range(lib.SD_HIRES_UPSCALER_COUNT)}  # fmt: skip
            if hires.upscaler not in names:
                raise InvalidParameterError("hires.upscaler", f"{hires.upscaler!r} is not one of {sorted(names)}")
            p.hires.enabled = True
            p.hires.upscaler = names[hires.upscaler]
            if hires.model_path is not None:
                p.hires.model_path = cstr(hires.model_path)
            p.hires.scale = hires.scale
            p.hires.target_width = round(request.width * hires.scale)
            p.hires.target_height = round(request.height * hires.scale)
            p.hires.steps = hires.steps
            p.hires.denoising_strength = hires.denoising_strength
            p.hires.upscale_tile_size = hires.tile_size

        started = time.perf_counter()
        tracker = _PhaseTracker(on_tick, request.batch_count, started)
        with self._lock:
            self._require_open()
            with callbacks.listening(tracker):
                result = lib.generate_image(handle, p)
                try:
                    images = self._copy_images(result, request.batch_count)
                finally:
                    tracker.finish()
        if not images:
            raise EngineError("the engine returned no images; see the 'sfumato.engine' log for its reason")
        return GenerationOutput(
            images=images,
            seed=request.seed,
            phase_ms=tracker.phase_ms,
            total_ms=(time.perf_counter() - started) * 1000.0,
            sampling_steps=tracker.sampling_steps,
        )

    def _copy_images(self, result: Any, count: int) -> list[ImageArray]:
        ffi, lib = self.engine.ffi, self.engine.lib
        if result == ffi.NULL:
            return []
        images: list[ImageArray] = []
        try:
            for i in range(count):
                if result[i].data != ffi.NULL:
                    images.append(_copy_image(ffi, result[i]))
        finally:
            for i in range(count):
                if result[i].data != ffi.NULL:
                    lib.free(result[i].data)
            lib.free(result)
        return images if len(images) == count else []


def _copy_image(ffi: Any, image: Any) -> ImageArray:
    shape = (int(image.height), int(image.width), int(image.channel))
    size = math.prod(shape)
    return np.frombuffer(ffi.buffer(image.data, size), dtype=np.uint8).reshape(shape).copy()


class UpscalerContext(_NativeHandle):
    """A loaded ESRGAN upscaler (``upscaler_ctx_t``), run in this process.

    Parameters
    ----------
    model_path:
        The ESRGAN weights (``.pth``, ``.safetensors`` or ``.gguf``).
    n_threads:
        CPU threads; ``-1`` uses the engine's count of physical cores.
    tile_size:
        Side of the tiles the image is processed in; larger tiles mean fewer
        seams and more memory.
    parent:
        The diffusion context this upscaler is paired with, kept alive as long
        as the upscaler is.
    """

    def __init__(
        self,
        model_path: str,
        n_threads: int = -1,
        tile_size: int = 128,
        offload_params_to_cpu: bool = False,
        conv_direct: bool = False,
        engine: Engine | None = None,
        parent: DiffusionContext | None = None,
    ) -> None:
        self._engine = engine or load_engine()
        self.parent = parent
        self.model_path = model_path
        self.tile_size = tile_size
        self._lock = threading.Lock()
        ffi, lib = self._engine.ffi, self._engine.lib
        callbacks.install(self._engine)
        threads = n_threads if n_threads > 0 else int(lib.sd_get_num_physical_cores())
        with callbacks.listening(None):
            handle = lib.new_upscaler_ctx(model_path.encode(), offload_params_to_cpu, conv_direct, threads, tile_size)
        if handle == ffi.NULL:
            raise EngineError(f"the engine could not load the upscaler {model_path}; see the 'sfumato.engine' log")
        self._handle = handle

    def _free(self, handle: Any) -> None:
        self.engine.lib.free_upscaler_ctx(handle)

    @property
    def factor(self) -> int:
        """The model's native scale factor (4 for RealESRGAN_x4plus)."""
        return int(self.engine.lib.get_upscale_factor(self._require_open()))

    def upscale(self, image: ImageArray) -> ImageArray:
        """Upscale one ``(height, width, 3)`` uint8 image by :attr:`factor`.

        Raises
        ------
        EngineError
            When the engine returns no image.
        """
        handle = self._require_open()
        ffi, lib = self.engine.ffi, self.engine.lib
        data = _as_image(image, 3, "image")
        source = ffi.new("sd_image_t*", (data.shape[1], data.shape[0], 3, ffi.from_buffer("uint8_t[]", data)))
        with self._lock:
            self._require_open()
            with callbacks.listening(None):
                result = lib.upscale(handle, source[0], self.factor)
        if result.data == ffi.NULL:
            raise EngineError("the engine failed to upscale the image; see the 'sfumato.engine' log")
        try:
            return _copy_image(ffi, result)
        finally:
            lib.free(result.data)

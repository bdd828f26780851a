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
import threading
import time
from typing import Any, Literal

import numpy as np

from sfumato.engine import callbacks
from sfumato.engine.abi import PREDICTION_ENUM, SAMPLE_METHOD_ENUM, SCHEDULER_ENUM
from sfumato.engine.handle import NativeHandle
from sfumato.engine.library import Engine, load_engine
from sfumato.engine.phases import PhaseTracker
from sfumato.engine.requests import (
    LORA_APPLY_MODES,
    RNG_TYPES,
    WEIGHT_TYPES,
    ContextParams,
    GenerationOutput,
    ImageRequest,
    TickCallback,
)
from sfumato.errors import EngineError, InvalidParameterError
from sfumato.images import ImageArray


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


Decoder = Literal["vae", "taesd"]
"""What turns latents into pixels (and images into latents): the full VAE or the tiny autoencoder."""


# The engine's log lines naming the device its main backend was created on.
_BACKEND_LINE = "Initializing backend: "
_CPU_FALLBACK_LINE = "loading CPU backend"


class _LoadLog:
    """Reads the engine's load log for what it chose: the device its backend runs
    on and the decoder it built."""

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self.decoder: Decoder | None = None
        self.device: str | None = None

    def on_progress(self, step: int, steps: int, seconds_per_step: float) -> None:
        pass

    def on_preview(self, step: int, image: ImageArray) -> None:
        pass

    def on_log(self, level: int, message: str) -> None:
        if message.startswith(_BACKEND_LINE) and message[len(_BACKEND_LINE) :].strip():
            self.device = message[len(_BACKEND_LINE) :].strip()
        elif message.startswith(_CPU_FALLBACK_LINE):
            self.device = "CPU"
        elif message.startswith("using TAE for encoding / decoding"):
            self.decoder = "taesd"
        elif message.startswith("using VAE for encoding / decoding"):
            self.decoder = "vae"


class DiffusionContext(NativeHandle):
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
            "model_path",
            "diffusion_model_path",
            "clip_l_path",
            "clip_g_path",
            "t5xxl_path",
            "llm_path",
            "vae_path",
            "taesd_path",
            "control_net_path",
        ):
            value = getattr(params, name)
            if value is not None:
                keep.append(ffi.new("char[]", value.encode()))
                setattr(c, name, keep[-1])
        if params.embeddings:
            table = ffi.new("sd_embedding_t[]", len(params.embeddings))
            keep.append(table)
            for i, (name, path) in enumerate(params.embeddings):
                keep.extend((ffi.new("char[]", name.encode()), ffi.new("char[]", path.encode())))
                table[i].name, table[i].path = keep[-2], keep[-1]
            c.embeddings, c.embedding_count = table, len(params.embeddings)
        if params.n_threads > 0:
            c.n_threads = params.n_threads
        if params.wtype is not None:
            c.wtype = _enum(lib, WEIGHT_TYPES, params.wtype, "wtype")
        c.rng_type = _enum(lib, RNG_TYPES, params.rng, "rng")
        if params.prediction is not None:
            c.prediction = _index(PREDICTION_ENUM, params.prediction, "prediction")
        c.vae_decode_only = params.vae_decode_only
        c.tae_preview_only = params.tae_preview_only
        # Keep weights resident so the context serves many generations.
        c.free_params_immediately = False
        c.flash_attn = params.flash_attn
        fused = params.fused_attention and self._engine.fused_attention
        c.diffusion_flash_attn = params.diffusion_flash_attn or fused
        c.chroma_use_dit_mask = params.chroma_use_dit_mask
        direct = self._engine.direct_convolutions
        c.diffusion_conv_direct = params.diffusion_conv_direct or direct
        c.vae_conv_direct = params.vae_conv_direct or direct
        c.offload_params_to_cpu = params.offload_params_to_cpu
        c.keep_clip_on_cpu = params.keep_clip_on_cpu
        c.keep_vae_on_cpu = params.keep_vae_on_cpu
        c.max_vram = params.max_vram
        c.enable_mmap = params.enable_mmap
        c.lora_apply_mode = _index(LORA_APPLY_MODES, params.lora_apply_mode, "lora_apply_mode")
        self.n_threads = int(c.n_threads)
        load = _LoadLog()
        with callbacks.listening(load):
            handle = lib.new_sd_ctx(c)
        self.decoder: Decoder | None = load.decoder
        """The decoder the engine reported building (``None`` if it did not say)."""
        self.device: str | None = load.device
        """The device the engine reported creating its backend on (``"CPU"``,
        ``"Vulkan0"``), from its own log; ``None`` if it did not say."""
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
        return SAMPLE_METHOD_ENUM[int(self.engine.lib.sd_get_default_sample_method(handle))]

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
        lib = self.engine.lib
        native = _Native(self.engine)
        p = _gen_params(native, request)
        started = time.perf_counter()
        tracker = PhaseTracker(on_tick, request.batch_count, started, request.preview_interval)
        with self._lock:
            self._require_open()
            with callbacks.listening(tracker), callbacks.previews(self.engine, request.preview):
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


class UpscalerContext(NativeHandle):
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
        load = _LoadLog()
        with callbacks.listening(load):
            handle = lib.new_upscaler_ctx(
                model_path.encode(),
                offload_params_to_cpu,
                conv_direct or self._engine.direct_convolutions,
                threads,
                tile_size,
            )
        self.device: str | None = load.device
        """The device the engine reported creating the upscaler's backend on."""
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


class _Native:
    """The engine's ffi and lib, and the C memory a call's parameters point to (kept alive with it)."""

    def __init__(self, engine: Engine) -> None:
        self.ffi, self.lib = engine.ffi, engine.lib
        self.keep: list[Any] = []

    def cstr(self, text: str) -> Any:
        self.keep.append(self.ffi.new("char[]", text.encode()))
        return self.keep[-1]

    def image(self, array: ImageArray, channels: int, field_name: str) -> Any:
        data = _as_image(array, channels, field_name)
        self.keep.append(data)
        return (data.shape[1], data.shape[0], channels, self.ffi.from_buffer("uint8_t[]", data))

    def array(self, ctype: str, count: int) -> Any:
        self.keep.append(self.ffi.new(f"{ctype}[]", count))
        return self.keep[-1]


def _gen_params(native: _Native, request: ImageRequest) -> Any:
    """The engine's ``sd_img_gen_params_t`` of ``request``."""
    lib = native.lib
    p = native.ffi.new("sd_img_gen_params_t*")
    lib.sd_img_gen_params_init(p)
    p.prompt = native.cstr(request.prompt)
    p.negative_prompt = native.cstr(request.negative_prompt)
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
        sample.sample_method = _index(SAMPLE_METHOD_ENUM, request.sample_method, "sampling_method")
    if request.scheduler is not None:
        sample.scheduler = _index(SCHEDULER_ENUM, request.scheduler, "scheduler")
    if request.eta is not None:
        sample.eta = request.eta
    if request.flow_shift is not None:
        sample.flow_shift = request.flow_shift
    _set_images(native, p, request)
    p.vae_tiling_params.enabled = request.vae_tiling
    if request.cache_threshold is not None:
        p.cache.mode = lib.SD_CACHE_EASYCACHE
        p.cache.reuse_threshold = request.cache_threshold
    if request.loras:
        loras = native.array("sd_lora_t", len(request.loras))
        for i, (path, multiplier) in enumerate(request.loras):
            loras[i].path, loras[i].multiplier = native.cstr(path), multiplier
        p.loras, p.lora_count = loras, len(request.loras)
    if request.hires is not None:
        _set_hires(native, p, request)
    return p


def _set_images(native: _Native, p: Any, request: ImageRequest) -> None:
    """The request's source, mask, control and reference images into ``p``."""
    if request.init_image is not None:
        p.init_image = native.image(request.init_image, 3, "init_image")
    if request.mask_image is not None:
        p.mask_image = native.image(request.mask_image, 1, "mask")
    if request.control_image is not None:
        p.control_image = native.image(request.control_image, 3, "control_image")
        p.control_strength = request.control_strength
    if request.ref_images:
        refs = native.array("sd_image_t", len(request.ref_images))
        for i, ref in enumerate(request.ref_images):
            refs[i] = native.image(ref, 3, f"init_images[{i}]")
        p.ref_images, p.ref_images_count = refs, len(request.ref_images)


def _set_hires(native: _Native, p: Any, request: ImageRequest) -> None:
    """The request's hires pass into ``p``."""
    ffi, lib = native.ffi, native.lib
    hires = request.hires
    assert hires is not None
    names = {bytes(ffi.string(lib.sd_hires_upscaler_name(i))).decode(): i for i in range(lib.SD_HIRES_UPSCALER_COUNT)}
    if hires.upscaler not in names:
        raise InvalidParameterError("hires.upscaler", f"{hires.upscaler!r} is not one of {sorted(names)}")
    p.hires.enabled = True
    p.hires.upscaler = names[hires.upscaler]
    if hires.model_path is not None:
        p.hires.model_path = native.cstr(hires.model_path)
    p.hires.scale = hires.scale
    p.hires.target_width = round(request.width * hires.scale)
    p.hires.target_height = round(request.height * hires.scale)
    p.hires.steps = hires.steps
    p.hires.denoising_strength = hires.denoising_strength
    p.hires.upscale_tile_size = hires.tile_size

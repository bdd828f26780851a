"""Request fields of the SDK, their defaults, and their validation.

This module is the one place where sfumato's defaults are written down; the
SDK functions, the CLI flags and the HTTP schemas take them from here. Every
check raises :class:`~sfumato.errors.InvalidParameterError` naming the field and
what it allows; nothing is clamped or silently corrected.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from sfumato.engine.abi import SAMPLE_METHOD_ENUM, SCHEDULER_ENUM
from sfumato.engine.kernels import PRECISIONS
from sfumato.engine.requests import PREVIEW_MODES, RNG_TYPES
from sfumato.errors import InvalidParameterError
from sfumato.families.detect import (
    CONTROLLED_VARIANTS,
    FAMILY_ANIMA,
    FAMILY_CHROMA,
    FAMILY_ERNIE_IMAGE,
    FAMILY_FLUX1,
    FAMILY_FLUX2,
    FAMILY_NAMES,
    FAMILY_OVIS,
    FAMILY_QWEN_IMAGE,
    FAMILY_SD1,
    FAMILY_SD2,
    FAMILY_SD3,
    FAMILY_SDXL,
    FAMILY_Z_IMAGE,
    Family,
    ModelInfo,
)
from sfumato.images import ImageInput
from sfumato.limits import SDK, bounds, int_bounds

SAMPLING_METHODS: tuple[str, ...] = SAMPLE_METHOD_ENUM
"""Every sampler name the engine knows: the 14 of the QVAC reference plus ``er_sde``."""

SCHEDULER_NAMES: tuple[str, ...] = SCHEDULER_ENUM
"""Every scheduler name the engine knows (the 11 of the QVAC reference)."""

CACHE_PRESETS: dict[str, float] = {"slow": 0.60, "medium": 0.40, "fast": 0.25, "ultra": 0.15}
"""``cache_preset`` name -> the engine's easycache reuse threshold. Faster presets
reuse more steps and so change the image more."""

PREDICTION_NAMES: dict[str, str | None] = {
    "auto": None, "eps": "eps", "v": "v", "edm_v": "edm_v",
    "flow": "sd3_flow", "flux_flow": "flux_flow", "flux2_flow": "flux2_flow",
}  # fmt: skip
"""``model_config.prediction`` -> the engine's prediction name (``None``: detect)."""

RNG_NAMES: tuple[str, ...] = tuple(RNG_TYPES)

WEIGHT_TYPE_NAMES: tuple[str, ...] = ("f32", "f16", "bf16", "q8_0", "q5_0", "q5_1", "q4_0", "q4_1", "q4_k", "q6_k")

REFINER_SWITCH_AT: float = SDK["refiner_switch_at"].default
"""The fraction of the denoising the base model does before a refiner takes over."""
MAX_BATCH = int_bounds("batch_count")[1]
MAX_STEPS = int_bounds("steps")[1]
MAX_SIDE = int_bounds("width")[1]
MAX_REPEATS = int_bounds("upscale.repeats")[1]


@dataclass(frozen=True)
class DiffusionParams:
    """The fields of a ``diffusion()`` request, with their defaults.

    ``width`` / ``height`` default to 512, or to the size of ``init_image``.
    ``cfg_scale`` defaults to what the loaded family needs: 7, or 1 for the
    guidance-distilled FLUX.1 and FLUX.2 [klein]. ``sampling_method`` / ``scheduler``
    default to the engine's choice for the loaded family (``euler_a`` +
    ``discrete`` for SD 1.x / 2.x). ``seed=-1`` picks a random seed, reported
    in the stats. ``clip_skip`` (-1 or 0: the family's own; 2 skips CLIP's last
    layer), ``eta`` (the noise of ``euler_a``, ``ddim_trailing``, ``tcd``;
    ``None``: the engine's) and ``img_cfg_scale`` (the image guidance of
    instruct-pix2pix models; ``None``: ``cfg_scale``) have the engine's
    semantics. ``flow_shift`` shifts a flow-matching family's sigmas toward noise
    (``None``: the engine's for the family, 3 for SD3, Qwen-Image, Z-Image and Anima,
    4 for ERNIE-Image; ComfyUI's ``ModelSamplingSD3`` shift). ``init_images`` are
    FLUX.2's extra reference images.
    ``control_image`` guides the model's ControlNet (``model_config.control_net_src``),
    resized to the output size, with ``control_strength`` (0..2, the engine's 0.9).
    ``preview`` (``"proj"``: the latent projected to RGB, cheap, an eighth of the
    side; ``"tae"``: the model's tiny autoencoder, ``model_config.taesd_src``;
    ``"vae"``: a full decode; the engine decodes on every step whatever the
    interval) puts a PNG of the image as it forms on every
    ``preview_interval``-th sampling tick (and the last); off by default.
    """

    prompt: str
    negative_prompt: str = ""
    width: int | None = SDK["width"].default
    height: int | None = SDK["height"].default
    steps: int = SDK["steps"].default
    cfg_scale: float | None = SDK["cfg_scale"].default
    guidance: float = SDK["guidance"].default
    sampling_method: str | None = None
    scheduler: str | None = None
    seed: int = SDK["seed"].default
    batch_count: int = SDK["batch_count"].default
    vae_tiling: bool = False
    cache_preset: str | None = None
    init_image: ImageInput | None = None
    mask: ImageInput | None = None
    strength: float = SDK["strength"].default
    upscale: bool | Mapping[str, Any] | None = None
    hires: bool | Mapping[str, Any] | HiresConfig | None = None
    loras: Sequence[Any] = ()
    clip_skip: int = SDK["clip_skip"].default
    eta: float | None = SDK["eta"].default
    img_cfg_scale: float | None = SDK["img_cfg_scale"].default
    flow_shift: float | None = SDK["flow_shift"].default
    init_images: Sequence[Any] = ()
    control_image: ImageInput | None = None
    control_strength: float = SDK["control_strength"].default
    preview: str | None = None
    preview_interval: int = SDK["preview_interval"].default


DEFAULT_CFG_SCALE = 7.0
MAX_CONTROL_STRENGTH = bounds("control_strength")[1]
FAMILY_CFG_SCALE: dict[Family, float] = {
    FAMILY_FLUX1: 1.0, FAMILY_CHROMA: 4.0, FAMILY_OVIS: 5.0, FAMILY_Z_IMAGE: 1.0, FAMILY_QWEN_IMAGE: 4.0,
    FAMILY_FLUX2: 1.0,
}  # fmt: skip
"""``cfg_scale`` when the caller gives none, where a family needs another than :data:`DEFAULT_CFG_SCALE`:
FLUX.1, FLUX.2 [klein] and Z-Image Turbo are distilled (FLUX.1 [dev] takes ``guidance``), Chroma,
Ovis-Image and Qwen-Image are not and guide by classifier-free guidance at a lower scale."""
FLOW_FAMILIES: tuple[Family, ...] = (
    FAMILY_SD3, FAMILY_FLUX1, FAMILY_CHROMA, FAMILY_OVIS, FAMILY_Z_IMAGE, FAMILY_ERNIE_IMAGE, FAMILY_QWEN_IMAGE,
    FAMILY_ANIMA, FAMILY_FLUX2,
)  # fmt: skip
"""The flow-matching families: the engine picks their sampler and schedule (euler on the
family's shifted flow sigmas) when a request names none; an HTTP API's default sampler,
chosen for the SD UNets (the job queue's "DPM++ 2M Karras"), gives way to it."""
FAMILY_SIZE_MULTIPLE: dict[Family, int] = {
    FAMILY_SD1: 64, FAMILY_SD2: 64, FAMILY_SDXL: 64, FAMILY_SD3: 16, FAMILY_FLUX1: 16, FAMILY_CHROMA: 16,
    FAMILY_OVIS: 16, FAMILY_Z_IMAGE: 16, FAMILY_ERNIE_IMAGE: 16, FAMILY_QWEN_IMAGE: 16, FAMILY_ANIMA: 16,
    FAMILY_FLUX2: 16,
}  # fmt: skip
"""Image sides must be multiples of these: the engine rounds a UNet's up to 64, and
the transformers patchify 2x2 latents of an 8x VAE."""
ANY_FAMILY_SIDE_MULTIPLE = max(FAMILY_SIZE_MULTIPLE.values())
"""A multiple every family takes: the server checks sides against it before it knows the model's family."""
MAX_CLIP_SKIP = int_bounds("clip_skip")[1]
MAX_REFERENCES = 8


DEFAULT_SIZE = 512


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_int(name: str, value: object, low: int, high: int) -> int:
    """``value`` as an int in ``[low, high]``."""
    if not _is_int(value):
        raise InvalidParameterError(name, f"must be an integer, got {value!r}")
    assert isinstance(value, int)
    if not low <= value <= high:
        raise InvalidParameterError(name, f"must be between {low} and {high}, got {value}")
    return value


def check_number(name: str, value: object, low: float, high: float) -> float:
    """``value`` as a finite float in ``[low, high]``."""
    if not _is_number(value):
        raise InvalidParameterError(name, f"must be a finite number, got {value!r}")
    assert isinstance(value, (int, float))
    if not low <= value <= high:
        raise InvalidParameterError(name, f"must be between {low} and {high}, got {value}")
    return float(value)


def check_bool(name: str, value: object) -> bool:
    """``value`` as a bool (only ``True`` or ``False``)."""
    if not isinstance(value, bool):
        raise InvalidParameterError(name, f"must be true or false, got {value!r}")
    return value


def check_choice(name: str, value: object, choices: tuple[str, ...] | Mapping[str, Any]) -> str:
    """``value`` as one of ``choices``."""
    allowed = list(choices)
    if not isinstance(value, str) or value not in allowed:
        raise InvalidParameterError(name, f"must be one of {allowed}, got {value!r}")
    return value


def check_side(name: str, value: object, multiple: int) -> int:
    """An image side: an integer multiple of ``multiple`` in ``[multiple, MAX_SIDE]``."""
    side = check_int(name, value, multiple, MAX_SIDE)
    if side % multiple:
        raise InvalidParameterError(name, f"must be a multiple of {multiple}, got {side}")
    return side


def check_upscale_repeats(name: str, value: object) -> int:
    """``upscale`` (``True``, ``{}`` or ``{"repeats": N}``) as a repeat count; 0 = off."""
    if value is None or value is False:
        return 0
    if value is True:
        return 1
    if isinstance(value, Mapping):
        unknown = set(value) - {"repeats"}
        if unknown:
            raise InvalidParameterError(name, f"unknown key(s) {sorted(unknown)}; the only key is 'repeats'")
        return check_int(f"{name}.repeats", value.get("repeats", 1), *int_bounds("upscale.repeats"))
    raise InvalidParameterError(name, f"must be true, false or {{'repeats': N}}, got {value!r}")


HIRES_UPSCALERS = (
    "Latent", "Latent (nearest)", "Latent (nearest-exact)", "Latent (antialiased)", "Latent (bicubic)",
    "Latent (bicubic antialiased)", "Lanczos", "Nearest",
)  # fmt: skip
MAX_HIRES_SCALE = bounds("hires.scale")[1]


@dataclass(frozen=True)
class HiresConfig:
    """``hires``: a second sampling pass at ``scale`` times the size (hires fix).

    ``upscaler`` is one of :data:`HIRES_UPSCALERS` (latent or pixel resampling)
    or an ESRGAN model (a path or registry constant). ``steps`` 0 takes the
    request's ``steps``; as in A1111, ``denoising_strength`` of them are run.
    """

    scale: float = SDK["hires.scale"].default
    upscaler: Any = "Latent"
    steps: int = SDK["hires.steps"].default
    denoising_strength: float = SDK["hires.denoising_strength"].default
    tile_size: int = 128


def check_hires(name: str, value: object) -> HiresConfig | None:
    """``hires`` (``True``, a :class:`HiresConfig`, or a mapping of its fields, the job-queue
    API's ``enabled`` too) as a :class:`HiresConfig`; ``None`` when off."""
    if value is None or value is False:
        return None
    if isinstance(value, HiresConfig):
        value = asdict(value)
    if value is True:
        return HiresConfig()
    if not isinstance(value, Mapping):
        raise InvalidParameterError(name, f"must be true, false or a mapping of hires fields, got {value!r}")
    known = {f.name for f in fields(HiresConfig)} | {"enabled"}
    unknown = set(value) - known
    if unknown:
        raise InvalidParameterError(name, f"unknown key(s) {sorted(unknown)}; the keys are {sorted(known)}")
    if not check_bool(f"{name}.enabled", value.get("enabled", True)):
        return None
    config = HiresConfig(**{k: v for k, v in value.items() if k != "enabled"})
    scale = check_number(f"{name}.scale", config.scale, *bounds("hires.scale"))
    if scale <= 1.0:
        raise InvalidParameterError(f"{name}.scale", f"must be over 1 (up to {MAX_HIRES_SCALE}), got {scale}")
    check_int(f"{name}.steps", config.steps, *int_bounds("hires.steps"))
    check_number(f"{name}.denoising_strength", config.denoising_strength, *bounds("hires.denoising_strength"))
    check_int(f"{name}.tile_size", config.tile_size, 32, 2048)
    if isinstance(config.upscaler, str) and config.upscaler.startswith("Latent"):  # a mode, not a file
        check_choice(f"{name}.upscaler", config.upscaler, HIRES_UPSCALERS)
    return config


@dataclass(frozen=True)
class RefinerConfig:
    """``refiner``: a second pass on another loaded model (the SDXL refiner).

    ``model_id`` is a loaded diffusion model; ``switch_at`` is the fraction of
    the denoising the base model stands for (the job-queue API's ``refiner_switch_at``).
    """

    model_id: str
    switch_at: float = REFINER_SWITCH_AT


def check_refiner(name: str, value: object) -> RefinerConfig | None:
    """``refiner`` (``None`` or a mapping of :class:`RefinerConfig` fields) as a
    :class:`RefinerConfig`; ``None`` when off."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise InvalidParameterError(name, f"must be a mapping with model_id and switch_at, got {value!r}")
    known = {f.name for f in fields(RefinerConfig)}
    unknown = set(value) - known
    if unknown:
        raise InvalidParameterError(name, f"unknown key(s) {sorted(unknown)}; the keys are {sorted(known)}")
    model_id = value.get("model_id")
    if not isinstance(model_id, str):
        raise InvalidParameterError(f"{name}.model_id", f"must be the id of a loaded model, got {model_id!r}")
    switch_at = check_number(
        f"{name}.switch_at", value.get("switch_at", RefinerConfig.switch_at), *bounds("refiner_switch_at")
    )
    return RefinerConfig(model_id, switch_at)


MAX_LORAS = 16
LORA_SUFFIXES = (".safetensors", ".gguf", ".ckpt", ".pt", ".pth")


def check_loras(name: str, value: object) -> list[tuple[Any, float]]:
    """``loras`` as ``(name or path, scale)`` pairs. Each item is a name (looked
    up in ``model_config.lora_dir``), an absolute path, or a mapping with
    ``name`` or ``path`` and ``scale`` (default 1.0)."""
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise InvalidParameterError(name, f"must be a list of LoRA names, paths or {{name, scale}}, got {value!r}")
    if len(value) > MAX_LORAS:
        raise InvalidParameterError(name, f"at most {MAX_LORAS} LoRAs, got {len(value)}")
    out = []
    for i, item in enumerate(value):
        field = f"{name}[{i}]"
        scale: object = 1.0
        if isinstance(item, Mapping):
            unknown = set(item) - {"name", "path", "scale"}
            if unknown or ("name" in item) == ("path" in item):
                raise InvalidParameterError(field, "must have 'name' or 'path', and optionally 'scale'")
            scale = item.get("scale", 1.0)
            item = item.get("name", item.get("path"))
        if not isinstance(item, (str, os.PathLike)) or not str(item):
            raise InvalidParameterError(field, f"must be a LoRA name or path, got {item!r}")
        out.append((item, check_number(f"{field}.scale", scale, *bounds("loras.scale"))))
    return out


def validate_diffusion(params: DiffusionParams) -> DiffusionParams:
    """Check every field that does not depend on the loaded model.

    Size multiples and image decoding, which do, are checked when the job is
    prepared for a model (:func:`sfumato.api.diffusion` does both before
    returning).
    """
    if not isinstance(params.prompt, str):
        raise InvalidParameterError("prompt", f"must be a string, got {type(params.prompt).__name__}")
    if not isinstance(params.negative_prompt, str):
        raise InvalidParameterError("negative_prompt", f"must be a string, got {type(params.negative_prompt).__name__}")
    for name in ("width", "height"):
        value = getattr(params, name)
        if value is not None:
            check_side(name, value, 8)
    check_int("steps", params.steps, *int_bounds("steps"))
    if params.cfg_scale is not None:
        check_number("cfg_scale", params.cfg_scale, *bounds("cfg_scale"))
    check_number("guidance", params.guidance, *bounds("guidance"))
    check_int("clip_skip", params.clip_skip, *int_bounds("clip_skip"))
    if params.eta is not None:
        check_number("eta", params.eta, *bounds("eta"))
    if params.img_cfg_scale is not None:
        check_number("img_cfg_scale", params.img_cfg_scale, *bounds("img_cfg_scale"))
    if params.flow_shift is not None:
        check_number("flow_shift", params.flow_shift, *bounds("flow_shift"))
    if isinstance(params.init_images, (str, bytes)) or not isinstance(params.init_images, Sequence):
        raise InvalidParameterError("init_images", f"must be a list of images, got {type(params.init_images).__name__}")
    if len(params.init_images) > MAX_REFERENCES:
        raise InvalidParameterError("init_images", f"at most {MAX_REFERENCES} images, got {len(params.init_images)}")
    if params.sampling_method is not None:
        check_choice("sampling_method", params.sampling_method, SAMPLING_METHODS)
    if params.scheduler is not None:
        check_choice("scheduler", params.scheduler, SCHEDULER_NAMES)
    check_int("seed", params.seed, *int_bounds("seed"))
    check_int("batch_count", params.batch_count, *int_bounds("batch_count"))
    check_bool("vae_tiling", params.vae_tiling)
    if params.cache_preset is not None:
        check_choice("cache_preset", params.cache_preset, CACHE_PRESETS)
    check_number("strength", params.strength, *bounds("strength"))
    if params.mask is not None and params.init_image is None:
        raise InvalidParameterError("mask", "inpainting needs init_image: the mask marks which of its pixels change")
    check_number("control_strength", params.control_strength, *bounds("control_strength"))
    if params.preview is not None:
        check_choice("preview", params.preview, PREVIEW_MODES)
    check_int("preview_interval", params.preview_interval, *int_bounds("preview_interval"))
    check_upscale_repeats("upscale", params.upscale)
    check_hires("hires", params.hires)
    check_loras("loras", params.loras)
    return params


@dataclass(frozen=True)
class UpscalerConfig:
    """``model_config.upscaler``: an ESRGAN paired with the model (or, with
    ``mode="upscale"``, the options of a standalone upscaler)."""

    type: str = "esrgan"
    model_src: Any = None
    tile_size: int = 128


@dataclass(frozen=True)
class ModelConfig:
    """``load_model(model_config=...)``.

    Attributes
    ----------
    mode:
        ``"diffusion"``, or ``"upscale"`` for a standalone ESRGAN ``model_src``.
    device:
        ``"auto"``, ``"cpu"``, ``"gpu"``, or an engine device name (``"CUDA0"``).
    cpu_variant:
        The engine build's CPU variant the model's worker runs (``"haswell"``,
        ``"skylakex"``, ``"zen4"``, ``"sapphirerapids"``), or ``"auto"`` (the default): the one a timed
        probe found fastest on this machine (``SFUMATO_CPU_VARIANT`` otherwise).
    threads:
        CPU threads; ``None`` uses the engine's count of physical cores.
    flash_attn:
        Flash attention in every model of the context (text encoders, diffusion model,
        VAE). Off by default: on GPUs it was never measured, and off is the engine's
        default. On the CPU, where sfumato's FLASH_ATTN_EXT kernel runs, the diffusion
        model's attention is flash attention whatever this says (faster there).
    offload_to_cpu:
        Keep the weights in RAM and copy each part to the device when it runs (the
        engine's ``offload_params_to_cpu``): less VRAM, slower steps.
    keep_clip_on_cpu, keep_vae_on_cpu:
        Run the text encoders, or the VAE, on the CPU while the rest runs on the
        model's device (the engine's options of those names).
    max_vram:
        GiB of device memory a graph may take before the engine runs it in
        segments (the engine's ``max_vram``); 0 (the default) never splits.
    conv_direct:
        The engine's direct convolutions (UNet and VAE) instead of im2col + matmul.
    rng:
        The noise generator: ``"cuda"`` (default) draws what ``torch.randn`` on a
        CUDA device draws for the same seed, ``"cpu"`` what a seeded torch CPU
        generator draws (diffusers on CPU), ``"std_default"`` the C++ library's own.
    weight_type:
        Convert weights to this type at load (``None`` keeps the file's types, or
        converts them to bf16 where ``precision`` is ``"bf16"``).
    precision:
        The CPU kernels' arithmetic: ``"exact"`` (the default) multiplies and sums in
        f32; ``"bf16"`` rounds each product's operands to bf16 and sums in f32, as
        PyTorch's bf16 does, with the weights converted to bf16 once at load. ``"bf16"``
        needs a CPU with AVX512-BF16 or AMX-BF16 and a CPU device; it is refused elsewhere.
    prediction:
        ``"auto"`` (detect) or one of :data:`PREDICTION_NAMES`.
    vae_model_src, clip_l_model_src, clip_g_model_src, t5xxl_model_src, llm_model_src:
        Companion files, each a path or a registry constant.
    control_net_src:
        A ControlNet (a path or a registry constant) for SD 1.x, SD 2.x or SDXL,
        guided per request by ``diffusion(control_image=...)``.
    taesd_src:
        A tiny autoencoder (TAESD for SD 1.x / 2.x, TAESDXL for SDXL, TAESD3 /
        TAEF1 / TAEF2 for the transformers) that decodes latents, and encodes
        img2img sources, in the full VAE's place: much faster, an approximation.
    taesd_preview_only:
        With ``taesd_src``: the tiny autoencoder only draws the live previews
        (``diffusion(preview="tae")``), and the VAE decodes the images.
    lora_dir:
        The folder LoRA names in ``diffusion(loras=...)`` are looked up in.
    embedding_dir:
        A folder of textual-inversion embeddings (``.pt``, ``.safetensors``;
        SD 1.x, SD 2.x and SDXL): a prompt that says a file's name (its stem,
        any case) uses its vectors. Files the model's text encoders cannot take
        are skipped, and a prompt that names one is refused.
    upscaler:
        An ESRGAN to pair with the model, for ``diffusion(upscale=...)``.
    """

    mode: str = "diffusion"
    device: str = "auto"
    cpu_variant: str = "auto"
    threads: int | None = None
    flash_attn: bool = False
    offload_to_cpu: bool = False
    keep_clip_on_cpu: bool = False
    keep_vae_on_cpu: bool = False
    max_vram: float = 0.0
    conv_direct: bool = False
    rng: str = "cuda"
    weight_type: str | None = None
    precision: str = "exact"
    prediction: str = "auto"
    vae_model_src: Any = None
    clip_l_model_src: Any = None
    clip_g_model_src: Any = None
    t5xxl_model_src: Any = None
    llm_model_src: Any = None
    taesd_src: Any = None
    taesd_preview_only: bool = False
    control_net_src: Any = None
    upscaler: UpscalerConfig | None = None
    lora_dir: Any = None
    embedding_dir: Any = None


def parse_model_config(raw: ModelConfig | Mapping[str, Any] | None) -> ModelConfig:
    """Validate ``model_config`` (a mapping or a :class:`ModelConfig`)."""
    if raw is None:
        return ModelConfig()
    if isinstance(raw, ModelConfig):
        values: dict[str, Any] = {f.name: getattr(raw, f.name) for f in fields(ModelConfig)}
    elif isinstance(raw, Mapping):
        known = {f.name for f in fields(ModelConfig)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise InvalidParameterError(f"model_config.{unknown[0]}", f"unknown key; allowed keys are {sorted(known)}")
        values = dict(raw)
    else:
        raise InvalidParameterError("model_config", f"must be a mapping, got {type(raw).__name__}")
    config = ModelConfig(**values)
    check_choice("model_config.mode", config.mode, ("diffusion", "upscale"))
    if not isinstance(config.device, str) or not config.device:
        raise InvalidParameterError(
            "model_config.device", f"must be 'auto', 'cpu', 'gpu' or a device name, got {config.device!r}"
        )
    if not isinstance(config.cpu_variant, str) or not config.cpu_variant:
        raise InvalidParameterError(
            "model_config.cpu_variant", f"must be 'auto' or a CPU variant's name, got {config.cpu_variant!r}"
        )
    if config.threads is not None:
        check_int("model_config.threads", config.threads, 1, 512)
    check_bool("model_config.flash_attn", config.flash_attn)
    for name in ("offload_to_cpu", "keep_clip_on_cpu", "keep_vae_on_cpu"):
        check_bool(f"model_config.{name}", getattr(config, name))
    check_number("model_config.max_vram", config.max_vram, 0.0, 1e6)
    check_bool("model_config.conv_direct", config.conv_direct)
    check_bool("model_config.taesd_preview_only", config.taesd_preview_only)
    if config.taesd_preview_only and config.taesd_src is None:
        raise InvalidParameterError("model_config.taesd_preview_only", "needs model_config.taesd_src")
    check_choice("model_config.rng", config.rng, RNG_NAMES)
    if config.weight_type is not None:
        check_choice("model_config.weight_type", config.weight_type, WEIGHT_TYPE_NAMES)
    check_choice("model_config.precision", config.precision, PRECISIONS)
    check_choice("model_config.prediction", config.prediction, PREDICTION_NAMES)
    upscaler = config.upscaler
    if upscaler is not None and not isinstance(upscaler, UpscalerConfig):
        if not isinstance(upscaler, Mapping):
            raise InvalidParameterError("model_config.upscaler", "must be a mapping {type, model_src, tile_size}")
        unknown = sorted(set(upscaler) - {"type", "model_src", "tile_size"})
        if unknown:
            raise InvalidParameterError(
                f"model_config.upscaler.{unknown[0]}",
                "unknown key; allowed keys are ['model_src', 'tile_size', 'type']",
            )
        upscaler = UpscalerConfig(**upscaler)
    if upscaler is not None:
        check_choice("model_config.upscaler.type", upscaler.type, ("esrgan",))
        check_int("model_config.upscaler.tile_size", upscaler.tile_size, 16, 2048)
        if config.mode == "diffusion" and upscaler.model_src is None:
            raise InvalidParameterError("model_config.upscaler.model_src", "is required to pair an upscaler")
    folders = {key: _folder(f"model_config.{key}", getattr(config, key)) for key in ("lora_dir", "embedding_dir")}
    return ModelConfig(**{**values, "upscaler": upscaler, **folders})


def _folder(name: str, value: object) -> Path | None:
    """An existing folder (``None`` stays ``None``), resolved."""
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)) or not Path(value).expanduser().is_dir():
        raise InvalidParameterError(name, f"must be an existing folder, got {value!r}")
    return Path(value).expanduser().resolve()


FLOW_PREDICTIONS = ("flow", "flux_flow", "flux2_flow")
"""The ``model_config.prediction`` values that make any model flow matching."""


def check_flow_shift(params: DiffusionParams, info: ModelInfo, prediction: str | None) -> None:
    """``flow_shift`` only where the model samples by flow matching (:data:`FLOW_FAMILIES`,
    or a model loaded with a flow prediction); elsewhere the engine would ignore it.

    Raises
    ------
    InvalidParameterError
        Naming ``flow_shift``.
    """
    if params.flow_shift is not None and info.family not in FLOW_FAMILIES and prediction not in FLOW_PREDICTIONS:
        flows = ", ".join(FAMILY_NAMES[f] for f in FLOW_FAMILIES)
        raise InvalidParameterError(
            "flow_shift", f"shifts a flow-matching model's sigmas ({flows}); {FAMILY_NAMES[info.family]} is not one"
        )


def check_images(params: DiffusionParams, info: ModelInfo, prediction: str | None, control_net: bool) -> None:
    """The image inputs the model of ``info`` takes (loaded with ``prediction`` and, or
    not, a ControlNet): on FLUX.2 (with ``flux2_flow``) every given image is a reference;
    an instruct-pix2pix model edits one image (``init_images[0]``, else ``init_image``);
    FLUX.1 takes ``init_images`` as references (Kontext edits them; the file's header
    does not tell Kontext from [dev]) beside an ``init_image`` source; FLUX.1 Fill needs
    a source and its mask, Depth/Canny a control image and no ControlNet; elsewhere only
    ``init_image``, a source. The SDK and the server's planning both check by it.

    Raises
    ------
    InvalidParameterError
        Naming the field at fault.
    """
    source, references = params.init_image is not None, len(params.init_images)
    if info.family == FAMILY_FLUX2:
        if (source or references) and prediction != "flux2_flow":
            raise InvalidParameterError(
                "init_image" if source else "init_images",
                "FLUX.2 transforms images by in-context conditioning, which needs "
                "model_config.prediction='flux2_flow' at load_model time",
            )
        if params.mask is not None:
            raise InvalidParameterError("mask", "FLUX.2 [klein] has no inpainting path; use an SD-family model")
    elif info.variant == "pix2pix":
        if references > 1:
            raise InvalidParameterError("init_images", "an instruct-pix2pix model edits one image: give one")
        if not references and not source:
            raise InvalidParameterError(
                "init_images", "an instruct-pix2pix model edits an image: give init_images=[image] (or init_image)"
            )
    elif references and info.family not in (FAMILY_FLUX1, FAMILY_QWEN_IMAGE):
        raise InvalidParameterError(
            "init_images",
            "reference images need FLUX.2, FLUX.1 Kontext or Qwen-Image-Edit (in-context conditioning); "
            "img2img takes init_image",
        )
    if info.variant == "fill" and (not source or params.mask is None):
        raise InvalidParameterError(
            "mask" if source else "init_image", "FLUX.1 Fill paints inside a mask: give init_image and mask"
        )
    if params.control_image is not None and not control_net and info.variant not in CONTROLLED_VARIANTS:
        raise InvalidParameterError(
            "control_image", "needs a ControlNet: load the model with model_config.control_net_src"
        )
    if params.control_image is None and info.variant == "controls":
        raise InvalidParameterError(
            "control_image", "FLUX.1 Depth/Canny is steered by a control image (a depth map or Canny edges): give one"
        )

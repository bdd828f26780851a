"""sfumato: local image generation on the stable-diffusion.cpp engine.

Three tiers, each usable alone:

- the SDK (this module): :func:`load_model`, :func:`diffusion`, :func:`upscale`,
  :func:`unload_model`, in the shape of the QVAC SDK, each model in its own
  worker process;
- model objects of the binding, :class:`sfumato.engine.DiffusionContext` and
  :class:`sfumato.engine.UpscalerContext`, run in-process and synchronously;
- the raw cffi binding, :func:`sfumato.engine.load_engine` (``ffi`` and ``lib``).
"""

from sfumato import presets
from sfumato.api import (
    ModelStatus,
    cancel,
    diffusion,
    load_model,
    load_model_async,
    loaded_models,
    models_info,
    set_memory_budget,
    unload_model,
    unload_model_async,
    upscale,
)
from sfumato.engine.devices import Device, list_devices
from sfumato.engine.requests import ProgressTick
from sfumato.errors import (
    ClosedError,
    EngineABIError,
    EngineCrashedError,
    EngineError,
    EngineNotFoundError,
    InvalidModelError,
    InvalidParameterError,
    JobCancelledError,
    ModelNotFoundError,
    NoUpscalerError,
    SfumatoError,
    UnknownModelIdError,
    UnsupportedModelError,
)
from sfumato.loading import LoadProgress
from sfumato.params import (
    CACHE_PRESETS,
    SAMPLING_METHODS,
    SCHEDULER_NAMES,
    DiffusionParams,
    ModelConfig,
    UpscalerConfig,
)
from sfumato.registry import (
    ANIMA_BASE_V1_0,
    CHROMA1_HD,
    CLIP_L,
    ERNIE_IMAGE,
    ERNIE_IMAGE_TURBO,
    ERNIE_IMAGE_VAE,
    FLUX_1_AE,
    FLUX_1_CANNY_DEV,
    FLUX_1_DEPTH_DEV,
    FLUX_1_DEV_Q4_0,
    FLUX_1_FILL_DEV_Q4_0,
    FLUX_1_KONTEXT_DEV_Q4_0,
    FLUX_2_KLEIN_4B_Q4_0,
    FLUX_2_KLEIN_4B_Q4_K_M,
    FLUX_2_KLEIN_4B_Q6_K,
    FLUX_2_KLEIN_4B_Q8_0,
    FLUX_2_KLEIN_4B_VAE,
    MINISTRAL_3_3B,
    OVIS_2_5,
    OVIS_IMAGE_BF16,
    QWEN3_4B,
    QWEN3_4B_Q4_K_M,
    QWEN_2_5_VL_7B,
    QWEN_3_06B_BASE,
    QWEN_IMAGE_Q3_K_M,
    QWEN_IMAGE_VAE,
    REALESRGAN_X4PLUS,
    REALESRGAN_X4PLUS_ANIME_6B,
    REGISTRY,
    SD_V2_1_1B_Q4_0,
    SD_V2_1_1B_Q8_0,
    SDXL_BASE_1_0_3B_Q4_0,
    SDXL_BASE_1_0_3B_Q8_0,
    T5_XXL_FP16,
    Z_IMAGE_TURBO_BF16,
    RegistryModel,
)
from sfumato.results import DiffusionResult, DiffusionStats, Pending, ProgressStream

__version__ = "0.1.0"

__all__ = [
    "CACHE_PRESETS", "CHROMA1_HD", "CLIP_L", "FLUX_1_AE", "FLUX_1_CANNY_DEV", "FLUX_1_DEPTH_DEV",
    "FLUX_1_DEV_Q4_0", "FLUX_1_FILL_DEV_Q4_0", "FLUX_1_KONTEXT_DEV_Q4_0", "T5_XXL_FP16", "QWEN3_4B",
    "Z_IMAGE_TURBO_BF16", "OVIS_IMAGE_BF16", "OVIS_2_5", "ERNIE_IMAGE", "ERNIE_IMAGE_TURBO", "MINISTRAL_3_3B",
    "ERNIE_IMAGE_VAE", "QWEN_IMAGE_Q3_K_M", "QWEN_IMAGE_VAE", "QWEN_2_5_VL_7B", "ANIMA_BASE_V1_0", "QWEN_3_06B_BASE",
    "FLUX_2_KLEIN_4B_Q4_0",
    "FLUX_2_KLEIN_4B_Q4_K_M", "FLUX_2_KLEIN_4B_Q6_K",
    "FLUX_2_KLEIN_4B_Q8_0", "FLUX_2_KLEIN_4B_VAE", "QWEN3_4B_Q4_K_M", "REALESRGAN_X4PLUS",
    "REALESRGAN_X4PLUS_ANIME_6B", "REGISTRY", "SAMPLING_METHODS", "SCHEDULER_NAMES",
    "SDXL_BASE_1_0_3B_Q4_0", "SDXL_BASE_1_0_3B_Q8_0", "SD_V2_1_1B_Q4_0", "SD_V2_1_1B_Q8_0",
    "ClosedError", "Device", "DiffusionParams", "DiffusionResult", "DiffusionStats",
    "EngineABIError", "EngineCrashedError", "EngineError", "EngineNotFoundError",
    "InvalidModelError", "InvalidParameterError", "JobCancelledError", "LoadProgress",
    "ModelConfig", "ModelNotFoundError", "ModelStatus", "NoUpscalerError", "Pending",
    "ProgressStream", "ProgressTick", "RegistryModel", "SfumatoError", "UnknownModelIdError",
    "UnsupportedModelError", "UpscalerConfig", "cancel", "diffusion", "list_devices",
    "load_model", "load_model_async", "loaded_models", "models_info", "set_memory_budget",
    "presets", "unload_model", "unload_model_async", "upscale",
]  # fmt: skip

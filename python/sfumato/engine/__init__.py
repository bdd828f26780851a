"""The in-process binding: the engine library, its checks, and the native handles.

Use :func:`load_engine` for the raw ``ffi`` / ``lib`` pair, or the model objects
:class:`DiffusionContext` and :class:`UpscalerContext`.
"""

from sfumato.engine.abi import check_abi
from sfumato.engine.context import DiffusionContext, UpscalerContext
from sfumato.engine.devices import Device, list_devices
from sfumato.engine.library import Engine, load_engine, locate_library
from sfumato.engine.requests import ContextParams, GenerationOutput, HiresParams, ImageRequest, ProgressTick

__all__ = [
    "ContextParams", "Device", "DiffusionContext", "Engine", "GenerationOutput", "HiresParams",
    "ImageRequest", "ProgressTick", "UpscalerContext", "check_abi", "list_devices",
    "load_engine", "locate_library",
]  # fmt: skip

"""The compute devices the engine library can use, from ggml's device registry."""

from __future__ import annotations

from dataclasses import dataclass

from sfumato.engine.library import Engine, load_engine
from sfumato.errors import InvalidParameterError

_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel"}


@dataclass(frozen=True)
class Device:
    """One device of the engine's backend registry.

    Attributes
    ----------
    name:
        The registry name (``"CPU"``, ``"CUDA0"``, ``"Vulkan0"``).
    description:
        The backend's description (CPU model, GPU name).
    type:
        ``"cpu"``, ``"gpu"``, ``"igpu"`` or ``"accel"``.
    memory_free, memory_total:
        Bytes, as the backend reports them.
    """

    name: str
    description: str
    type: str
    memory_free: int
    memory_total: int


def list_devices(engine: Engine | None = None) -> list[Device]:
    """List the devices of the engine library's backend registry."""
    engine = engine or load_engine()
    ffi, lib = engine.ffi, engine.lib
    free, total = ffi.new("size_t*"), ffi.new("size_t*")
    devices = []
    for i in range(int(lib.ggml_backend_dev_count())):
        dev = lib.ggml_backend_dev_get(i)
        lib.ggml_backend_dev_memory(dev, free, total)
        devices.append(
            Device(
                name=engine.string(lib.ggml_backend_dev_name(dev)),
                description=engine.string(lib.ggml_backend_dev_description(dev)),
                type=_TYPES.get(int(lib.ggml_backend_dev_type(dev)), "unknown"),
                memory_free=int(free[0]),
                memory_total=int(total[0]),
            )
        )
    return devices


def check_device(requested: str, engine: Engine | None = None) -> Device | None:
    """Check that ``requested`` (``auto``, ``cpu``, ``gpu`` or a device name) is
    available in this engine build; return the matching device (``None`` for auto).

    Raises
    ------
    InvalidParameterError
        When the build has no such device, naming what it has.
    """
    engine = engine or load_engine()
    devices = list_devices(engine)
    if requested == "auto":
        return None
    if requested in ("cpu", "gpu"):
        kinds = ("cpu",) if requested == "cpu" else ("gpu", "igpu")
        match = next((d for d in devices if d.type in kinds), None)
    else:
        match = next((d for d in devices if d.name == requested), None)
    if match is None:
        have = ", ".join(f"{d.name} ({d.type})" for d in devices) or "none"
        hint = ""
        if requested != "cpu":
            hint = (
                "; this engine build has no GPU backend: build stable-diffusion-cpp-python with "
                'CMAKE_ARGS="-DSD_CUDA=ON" (or -DSD_VULKAN=ON) and point SFUMATO_ENGINE_LIB at that library'
            )
        raise InvalidParameterError(
            "model_config.device", f"{requested!r} is not available; the engine at {engine.path} has: {have}{hint}"
        )
    return match

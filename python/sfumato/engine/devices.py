"""The compute devices the engine library can use, from ggml's device registry."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from sfumato.engine.library import ENV_BACKENDS, Engine, load_engine
from sfumato.errors import InvalidParameterError

_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel"}

# Software rasterizers that present themselves as GPUs (Mesa's lavapipe names its
# device "llvmpipe"); never chosen by "auto" or "gpu".
SOFTWARE_DEVICES = ("llvmpipe", "lavapipe", "softpipe", "swiftshader")


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
    software:
        A software emulation of a GPU (Mesa's lavapipe): used only when named.
    """

    name: str
    description: str
    type: str
    memory_free: int
    memory_total: int
    software: bool = False


def list_devices(engine: Engine | None = None) -> list[Device]:
    """List the devices of the engine library's backend registry."""
    engine = engine or load_engine()
    ffi, lib = engine.ffi, engine.lib
    free, total = ffi.new("size_t*"), ffi.new("size_t*")
    devices = []
    for i in range(int(lib.ggml_backend_dev_count())):
        dev = lib.ggml_backend_dev_get(i)
        lib.ggml_backend_dev_memory(dev, free, total)
        description = engine.string(lib.ggml_backend_dev_description(dev))
        devices.append(
            Device(
                name=engine.string(lib.ggml_backend_dev_name(dev)),
                description=description,
                type=_TYPES.get(int(lib.ggml_backend_dev_type(dev)), "unknown"),
                memory_free=int(free[0]),
                memory_total=int(total[0]),
                software=any(word in description.lower() for word in SOFTWARE_DEVICES),
            )
        )
    return devices


def _have(engine: Engine, devices: list[Device]) -> str:
    listed = ", ".join(f"{d.name} ({d.description}{', software' if d.software else ''})" for d in devices) or "none"
    # The GPU modules that give no device, and why (the CPU variants not chosen are no news).
    skipped = [f"{m.name} ({m.error})" for m in engine.modules if m.error and not m.name.startswith("cpu")]
    unloaded = f"; modules without a device: {'; '.join(skipped)}" if skipped else ""
    return f"the engine at {engine.path} has: {listed}{unloaded}"


def check_device(requested: str, engine: Engine | None = None) -> Device:
    """Resolve ``requested`` to one device of this engine build.

    ``cpu`` is the CPU; ``gpu`` the first hardware GPU (a dedicated one before an
    integrated one) or an error; ``auto`` that GPU when there is one, else the CPU;
    anything else a registry name (``Vulkan0``, ``CUDA0``). ``auto`` and ``gpu``
    never take a software device (Mesa's lavapipe): it is used only by name.

    Raises
    ------
    InvalidParameterError
        When the build or the machine has no such device, naming what it has.
    """
    engine = engine or load_engine()
    devices = list_devices(engine)
    if requested in ("auto", "gpu"):
        for kind in ("gpu", "igpu"):
            match = next((d for d in devices if d.type == kind and not d.software), None)
            if match is not None:
                return match
        if requested == "gpu":
            raise InvalidParameterError(
                "model_config.device", f"'gpu' asks for a hardware GPU and there is none; {_have(engine, devices)}"
            )
        requested = "cpu"
    if requested == "cpu":
        match = next((d for d in devices if d.type == "cpu"), None)
    else:
        match = next((d for d in devices if d.name == requested), None)
    if match is None:
        hint = ""
        if requested.startswith("Vulkan") and "GGML_VK_VISIBLE_DEVICES" not in os.environ:
            hint = (
                "; ggml hides software Vulkan devices (lavapipe) unless GGML_VK_VISIBLE_DEVICES names "
                "their index, e.g. GGML_VK_VISIBLE_DEVICES=0"
            )
        raise InvalidParameterError(
            "model_config.device",
            f"{requested!r} is not available; {_have(engine, devices)}. Allowed: 'auto', 'cpu', 'gpu' or a "
            f"device name{hint}",
        )
    return match


def device_env(device: Device) -> dict[str, str]:
    """The environment of a worker process whose engine is to run on ``device``.

    Only the device's backend module is loaded there (``SFUMATO_BACKENDS``), so the
    engine, which takes the first GPU it finds, else the CPU, takes this one;
    ``SD_VK_DEVICE`` picks among Vulkan devices, ``CUDA_VISIBLE_DEVICES`` among CUDA
    ones. For an engine with its backends linked in, the visible-device variables
    of the other backends are emptied for the CPU.
    """
    if device.type == "cpu":
        return {
            ENV_BACKENDS: "cpu",
            "CUDA_VISIBLE_DEVICES": "-1",
            "HIP_VISIBLE_DEVICES": "-1",
            "GGML_VK_VISIBLE_DEVICES": "",
        }
    match = re.fullmatch(r"([A-Za-z]+?)(\d*)", device.name)
    backend, index = (match.group(1), match.group(2)) if match else (device.name, "")
    env = {ENV_BACKENDS: f"cpu,{backend.lower()}"}
    if backend == "Vulkan" and index:
        env["SD_VK_DEVICE"] = index
    elif backend == "CUDA" and index:
        env["CUDA_VISIBLE_DEVICES"] = index
    elif backend in ("ROCm", "HIP") and index:
        env["HIP_VISIBLE_DEVICES"] = index
    return env

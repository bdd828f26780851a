"""Devices: the backend modules sfumato loads by path, and the device each model runs on.

The suite's engine carries the CPU and Vulkan backends as modules; Vulkan runs here on
Mesa's software driver, lavapipe. ggml hides a CPU-type Vulkan device unless
``GGML_VK_VISIBLE_DEVICES`` names it, as a user would: the tests that use it run their
SDK in a process of its own with ``GGML_VK_VISIBLE_DEVICES=0`` (in this one, as for a
user who names nothing, there is no Vulkan device, and the engine layer's own default
device stays the CPU). lavapipe computes on the CPU with its own kernels
(LLVM-compiled shaders): its pixels are another implementation's arithmetic, held to
the parity thresholds, and its speed says nothing about a GPU's.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import sfumato
from sfumato import errors
from sfumato.engine.devices import Device, device_env, list_devices
from sfumato.engine.library import load_engine
from sfumato.images import decode_png, encode_png

from .helpers import SIZE, assert_close, assert_far, sdk_script

VULKAN = "Vulkan0"
# ggml's Vulkan shaders compute in f16 where the device has it (lavapipe does), the CPU
# backend in f32: measured here, that alone moves the tiny model's 64x64 image by up to
# 40 levels (31.7 dB) and the ESRGAN's by 3 (55.3 dB). With f16 arithmetic off (ggml's
# GGML_VK_DISABLE_F16, read by the worker's engine) Vulkan meets both parity thresholds:
# it computes what the CPU computes, in another order.
F32_SHADERS = {"GGML_VK_DISABLE_F16": "1"}


def _with_lavapipe(script: str, tmp_path: Path, env: dict[str, str] | None = None, **args: Any) -> tuple[Any, str]:
    """Run an SDK ``script`` (:func:`~tests.helpers.sdk_script`) in a process that shows
    lavapipe as ``Vulkan0``."""
    return sdk_script(script, tmp_path, {"GGML_VK_VISIBLE_DEVICES": "0", **(env or {})}, **args)


def test_the_build_loads_its_modules_by_path_and_lavapipe_only_when_named(tmp_path: Path) -> None:
    engine = load_engine()
    modules = {m.name: m for m in engine.modules}
    assert engine.build is not None and engine.build.backends == ("cpu", "vulkan")
    variants = {f"cpu-{v}" for v in engine.build.cpu_variants}
    assert set(modules) == {*variants, "vulkan"} and len(variants) >= 2, modules
    assert all(m.path.parent == engine.path.parent for m in modules.values()), modules
    # One CPU variant loaded (sfumato chose it), and the Vulkan module.
    assert {name for name, m in modules.items() if m.loaded} == {f"cpu-{engine.cpu_choice.variant}", "vulkan"}
    # Named by nobody, ggml's Vulkan backend shows no CPU-type device: the CPU alone.
    assert [d.name for d in list_devices(engine)] == ["CPU"]

    script = """
from sfumato.engine.devices import check_device, list_devices
try:
    check_device("gpu")
    gpu = None
except errors.InvalidParameterError as exc:
    gpu = str(exc)
print(json.dumps({"devices": [vars(d) for d in list_devices()], "auto": check_device("auto").name,
                  "named": check_device("Vulkan0").name, "gpu": gpu}))
"""
    found, _ = _with_lavapipe(script, tmp_path)
    devices = {d["name"]: d for d in found["devices"]}
    lavapipe = devices[VULKAN]
    assert lavapipe["software"] and "llvmpipe" in lavapipe["description"] and lavapipe["memory_total"] > 0
    # auto and gpu never take a software device; by name it is used.
    assert found["auto"] == "CPU" and found["named"] == VULKAN
    assert "'gpu' asks for a hardware GPU and there is none" in found["gpu"], found["gpu"]


def test_device_env_loads_only_the_devices_backend() -> None:
    cpu = Device("CPU", "a CPU", "cpu", 0, 0)
    assert device_env(cpu)["SFUMATO_BACKENDS"] == "cpu"
    assert device_env(Device("Vulkan2", "a GPU", "gpu", 0, 0)) == {
        "SFUMATO_BACKENDS": "cpu,vulkan", "SD_VK_DEVICE": "2"
    }  # fmt: skip
    cuda = Device("CUDA1", "a GPU", "gpu", 0, 0)
    assert device_env(cuda) == {"SFUMATO_BACKENDS": "cpu,cuda", "CUDA_VISIBLE_DEVICES": "1"}


def test_a_device_the_machine_lacks_is_a_clear_error(esrgan_1b: Path) -> None:
    for device in ("CUDA0", "gpu"):
        with pytest.raises(errors.InvalidParameterError, match=r"model_config\.device: .*has: CPU \("):
            sfumato.load_model(esrgan_1b, model_config={"mode": "upscale", "device": device})
    # A Vulkan name says how to show a software device.
    with pytest.raises(errors.InvalidParameterError, match=r"'Vulkan0' is not available.*GGML_VK_VISIBLE_DEVICES=0"):
        sfumato.load_model(esrgan_1b, model_config={"mode": "upscale", "device": VULKAN})


_PARITY = """
cpu = sfumato.load_model(args["model"], model_config={"device": "cpu", "threads": 2})
vulkan = sfumato.load_model(args["model"], model_config={"device": "Vulkan0", "threads": 2})
run = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 4, "cfg_scale": 7.0}
# Two models loaded at once in one process, running at once on two backends.
jobs = {"cpu": sfumato.diffusion(cpu, seed=7, **run), "vulkan": sfumato.diffusion(vulkan, seed=7, **run)}
stats = {}
for name, job in jobs.items():
    (out / f"{name}.png").write_bytes(job.outputs.result(timeout=600)[0])
    stats[name] = job.stats.result(timeout=60).device
(out / "other-seed.png").write_bytes(sfumato.diffusion(cpu, seed=8, **run).outputs.result(timeout=600)[0])
import psutil
found = {"stats": stats}
for name, model in (("cpu", cpu), ("vulkan", vulkan)):
    found[name] = {"engine_device": status(model).engine_device,
                   "backends": psutil.Process(status(model).pid).environ()["SFUMATO_BACKENDS"]}
    unload(model)
print(json.dumps(found))
"""


def test_vulkan_on_lavapipe_matches_the_cpu_and_its_log_shows_vulkan(sd1_tiny_gguf: Path, tmp_path: Path) -> None:
    # lavapipe takes about 10 s per step of this model at 64x64 (the CPU backend 0.2 s):
    # one Vulkan generation serves every assertion.
    found, log = _with_lavapipe(_PARITY, tmp_path, F32_SHADERS, model=str(sd1_tiny_gguf))
    on_cpu, on_vulkan = (decode_png((tmp_path / f"{n}.png").read_bytes()) for n in ("cpu", "vulkan"))
    assert_close(on_vulkan, on_cpu)
    # The negative control: another seed misses both thresholds.
    assert_far(on_vulkan, decode_png((tmp_path / "other-seed.png").read_bytes()))

    # The device each ran on is the engine's own report, in the stats and models_info(),
    # and each worker loaded only its device's backend module.
    assert found["stats"] == {"cpu": "CPU", "vulkan": VULKAN}
    assert found["cpu"] == {"engine_device": "CPU", "backends": "cpu"}
    assert found["vulkan"] == {"engine_device": VULKAN, "backends": "cpu,vulkan"}
    # The Vulkan worker's engine log: the backend it initialized, the device ggml found,
    # and its compute buffers in that device's memory (the CPU worker's in RAM).
    assert "Initializing backend: Vulkan0" in log, log[-3000:]
    assert "ggml_vulkan: 0 = llvmpipe" in log, log[-3000:]
    assert re.search(r"unet compute buffer size: [\d.]+ MB\(VRAM\)", log), log[-3000:]
    assert re.search(r"unet compute buffer size: [\d.]+ MB\(RAM\)", log), log[-3000:]


_UPSCALE = """
import numpy as np
image = decode_png(Path(args["image"]).read_bytes())
for device in ("cpu", "Vulkan0"):
    model = sfumato.load_model(args["model"], model_config={"mode": "upscale", "device": device, "threads": 2})
    result = sfumato.upscale(model, image=image)
    (out / f"{device}.png").write_bytes(result.outputs.result(timeout=600)[0])
    assert result.stats.result(timeout=60).device == ("CPU" if device == "cpu" else "Vulkan0")
    unload(model)
print(json.dumps({}))
"""


def test_esrgan_upscale_on_vulkan_matches_the_cpu(esrgan_1b: Path, gradient_image: np.ndarray, tmp_path: Path) -> None:
    source = tmp_path / "source.png"
    source.write_bytes(encode_png(gradient_image))
    _with_lavapipe(_UPSCALE, tmp_path, F32_SHADERS, model=str(esrgan_1b), image=str(source))
    on_cpu, on_vulkan = (decode_png((tmp_path / f"{n}.png").read_bytes()) for n in ("cpu", VULKAN))
    assert on_cpu.shape == (SIZE * 4, SIZE * 4, 3)
    assert_close(on_vulkan, on_cpu)


_OPTIONS = """
config = {"device": "Vulkan0", "threads": 2, "offload_to_cpu": True, "keep_clip_on_cpu": True,
          "keep_vae_on_cpu": True, "max_vram": 0.5}
unload(sfumato.load_model(args["model"], model_config=config))
print(json.dumps({}))
"""


def test_the_gpu_options_reach_the_engine(sd1_tiny_gguf: Path, tmp_path: Path) -> None:
    _, log = _with_lavapipe(_OPTIONS, tmp_path, model=str(sd1_tiny_gguf))
    assert "Initializing backend: Vulkan0" in log, log[-3000:]
    assert "CLIP: Using CPU backend" in log and "VAE Autoencoder: Using CPU backend" in log, log[-3000:]
    # Offloaded, the UNet's weights stay in RAM until a step runs.
    assert re.search(r"unet params backend buffer size = +[\d.]+ MB\(RAM\)", log), log[-3000:]
    for key, value in (("max_vram", -1), ("keep_vae_on_cpu", "yes"), ("offload_to_cpu", 1)):
        with pytest.raises(errors.InvalidParameterError, match=rf"model_config\.{key}"):
            sfumato.load_model(sd1_tiny_gguf, model_config={key: value})


_BUDGETS = """
def esrgan(path, device, tile=128):
    config = {"mode": "upscale", "device": device, "threads": 2, "upscaler": {"tile_size": tile}}
    return sfumato.load_model(path, model_config=config)
sfumato.set_memory_budget(max_loaded_models=1, device="Vulkan0")
on_cpu = esrgan(args["small"], "cpu")
first = esrgan(args["small"], "Vulkan0")
second = esrgan(args["large"], "Vulkan0")
resident = [status(m).resident for m in (on_cpu, first, second)]
sfumato.set_memory_budget(max_loaded_bytes=args["half"], device="Vulkan0")
try:
    esrgan(args["large"], "Vulkan0", tile=96)
    refused = None
except errors.InsufficientMemoryError as exc:
    refused = str(exc)
print(json.dumps({"resident": resident, "refused": refused, "cpu_after": status(on_cpu).resident}))
"""


def test_each_device_has_its_own_budget(esrgan_1b: Path, esrgan_6b: Path, tmp_path: Path) -> None:
    found, _ = _with_lavapipe(
        _BUDGETS, tmp_path, small=str(esrgan_1b), large=str(esrgan_6b), half=esrgan_6b.stat().st_size // 2
    )
    # Vulkan0 holds one model: the idle one there went; the CPU's budget is another.
    assert found["resident"] == [True, False, True]
    # A model larger than its device's byte budget is refused, naming both.
    assert re.search(r"does not fit Vulkan0's memory budget .*larger than the budget", found["refused"] or "")
    assert found["cpu_after"]

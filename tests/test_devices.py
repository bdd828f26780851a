"""Devices: the backend modules sfumato loads by path, and the device each model runs on.

The suite's engine carries the CPU and Vulkan backends as modules; Vulkan runs here on
Mesa's software driver, lavapipe, which the suite exposes as ``Vulkan0`` by naming it
in ``GGML_VK_VISIBLE_DEVICES`` (conftest). lavapipe computes on the CPU with its own
kernels (LLVM-compiled shaders), so its pixels are another implementation's arithmetic
held to the parity thresholds, and its speed says nothing about a GPU's.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest

import sfumato
from sfumato import errors
from sfumato.engine.devices import Device, check_device, device_env, list_devices
from sfumato.engine.library import load_engine
from sfumato.images import decode_png

from .helpers import SIZE, assert_close, assert_far

VULKAN = "Vulkan0"
RUN = {"prompt": "a lighthouse", "width": SIZE, "height": SIZE, "steps": 4, "cfg_scale": 7.0}


def _status(model_id: str) -> sfumato.ModelStatus:
    return next(s for s in sfumato.models_info() if s.model_id == model_id)


def _unload(model_id: str) -> None:
    while model_id in sfumato.loaded_models():
        sfumato.unload_model(model_id)


def _image(model_id: str, seed: int) -> tuple[np.ndarray, sfumato.DiffusionStats]:
    result = sfumato.diffusion(model_id, seed=seed, **RUN)  # type: ignore[arg-type]
    return decode_png(result.outputs.result(timeout=600)[0]), result.stats.result(timeout=60)


def test_the_build_loads_its_cpu_and_vulkan_modules_by_path() -> None:
    engine = load_engine()
    modules = {m.name: m for m in engine.modules}
    assert {"cpu", "vulkan"} <= set(modules), modules
    for module in modules.values():
        assert module.path.parent == engine.path.parent and module.loaded, module
    assert engine.build is not None and set(engine.build.backends) == {"cpu", "vulkan"}
    devices = {d.name: d for d in list_devices(engine)}
    assert devices["CPU"].type == "cpu"
    lavapipe = devices[VULKAN]
    assert lavapipe.software and "llvmpipe" in lavapipe.description, lavapipe
    assert lavapipe.memory_total > 0


def test_auto_and_gpu_never_take_a_software_device() -> None:
    assert any(d.software for d in list_devices())
    assert check_device("auto").name == "CPU"
    with pytest.raises(errors.InvalidParameterError, match=r"model_config\.device: 'gpu' asks for a hardware GPU"):
        check_device("gpu")
    assert check_device(VULKAN).name == VULKAN  # by name it is used


def test_device_env_loads_only_the_devices_backend() -> None:
    cpu = check_device("cpu")
    assert device_env(cpu)["SFUMATO_BACKENDS"] == "cpu"
    assert device_env(check_device(VULKAN)) == {"SFUMATO_BACKENDS": "cpu,vulkan", "SD_VK_DEVICE": "0"}
    cuda = Device("CUDA1", "a GPU", "gpu", 0, 0)
    assert device_env(cuda) == {"SFUMATO_BACKENDS": "cpu,cuda", "CUDA_VISIBLE_DEVICES": "1"}


def test_a_device_the_machine_lacks_is_a_clear_error(esrgan_1b: Path) -> None:
    for device in ("CUDA0", "Vulkan7", "gpu"):
        with pytest.raises(errors.InvalidParameterError, match=r"model_config\.device: .*has: CPU \(.*Vulkan0"):
            sfumato.load_model(esrgan_1b, model_config={"mode": "upscale", "device": device})


def test_without_naming_it_lavapipe_is_hidden_and_vulkan0_says_how(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "GGML_VK_VISIBLE_DEVICES"}
    script = (
        "from sfumato.engine.devices import check_device, list_devices\n"
        "print([d.name for d in list_devices()])\n"
        "check_device('Vulkan0')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert done.stdout.strip() == "['CPU']", done.stdout
    assert "'Vulkan0' is not available" in done.stderr and "GGML_VK_VISIBLE_DEVICES" in done.stderr, done.stderr


@pytest.fixture
def f32_shaders(monkeypatch: pytest.MonkeyPatch) -> None:
    """ggml's Vulkan shaders compute in f16 where the device has it (lavapipe does), the
    CPU backend in f32: measured here, that alone moves the tiny model's 64x64 image by up
    to 40 levels (31.7 dB) and the ESRGAN's by 3 (55.3 dB). With f16 arithmetic off
    (ggml's ``GGML_VK_DISABLE_F16``, read by the worker's engine) Vulkan meets both
    parity thresholds: it computes what the CPU computes, in another order."""
    monkeypatch.setenv("GGML_VK_DISABLE_F16", "1")


@pytest.mark.usefixtures("f32_shaders")
def test_vulkan_on_lavapipe_matches_the_cpu_and_its_log_shows_vulkan(
    sd1_tiny_gguf: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    # lavapipe takes about 10 s per step of this model at 64x64 (the CPU backend 0.2 s):
    # one Vulkan generation serves every assertion. Its workers log to the inherited
    # stderr at sfumato's level: DEBUG shows the engine's own lines.
    logger = logging.getLogger("sfumato")
    level = logger.level
    logger.setLevel(logging.DEBUG)
    capfd.readouterr()
    cpu = sfumato.load_model(sd1_tiny_gguf, model_config={"device": "cpu", "threads": 2})
    vulkan = sfumato.load_model(sd1_tiny_gguf, model_config={"device": VULKAN, "threads": 2})
    try:
        # Two models loaded at once from one process, running at once on two backends.
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            on_cpu, on_vulkan = pool.map(lambda model: _image(model, 7), (cpu, vulkan))
        other_seed = _image(cpu, 8)[0]
        cpu_status, vulkan_status = _status(cpu), _status(vulkan)
        cpu_env = psutil.Process(cpu_status.pid).environ()
        vulkan_env = psutil.Process(vulkan_status.pid).environ()
    finally:
        _unload(cpu)
        _unload(vulkan)
        logger.setLevel(level)
    log = capfd.readouterr().err

    assert_close(on_vulkan[0], on_cpu[0])
    # The negative control: another seed misses both thresholds.
    assert_far(on_vulkan[0], other_seed)

    # The device each ran on is the engine's own report, in the stats and models_info().
    assert on_cpu[1].device == "CPU" and on_vulkan[1].device == VULKAN
    assert cpu_status.engine_device == "CPU" and vulkan_status.engine_device == VULKAN
    # Each worker loaded only its device's backend module.
    assert cpu_env["SFUMATO_BACKENDS"] == "cpu" and vulkan_env["SFUMATO_BACKENDS"] == "cpu,vulkan"
    # The Vulkan worker's engine log: the backend it initialized, the device ggml found,
    # and the weights and compute buffers placed in that device's memory.
    assert "Initializing backend: Vulkan0" in log, log[-3000:]
    assert "ggml_vulkan: 0 = llvmpipe" in log, log[-3000:]
    assert re.search(r"unet compute buffer size: [\d.]+ MB\(VRAM\)", log), log[-3000:]
    assert re.search(r"unet compute buffer size: [\d.]+ MB\(RAM\)", log), log[-3000:]  # the CPU worker's


@pytest.mark.usefixtures("f32_shaders")
def test_esrgan_upscale_on_vulkan_matches_the_cpu(esrgan_1b: Path, gradient_image: np.ndarray) -> None:
    images = {}
    for device in ("cpu", VULKAN):
        model_id = sfumato.load_model(esrgan_1b, model_config={"mode": "upscale", "device": device, "threads": 2})
        try:
            result = sfumato.upscale(model_id, image=gradient_image)
            images[device] = decode_png(result.outputs.result(timeout=600)[0])
            assert result.stats.result(timeout=60).device == ("CPU" if device == "cpu" else VULKAN)
        finally:
            _unload(model_id)
    assert images["cpu"].shape == (SIZE * 4, SIZE * 4, 3)
    assert_close(images[VULKAN], images["cpu"])


def test_the_gpu_options_reach_the_engine(sd1_tiny_gguf: Path, capfd: pytest.CaptureFixture[str]) -> None:
    logger = logging.getLogger("sfumato")
    level = logger.level
    logger.setLevel(logging.DEBUG)
    capfd.readouterr()
    config = {"device": VULKAN, "threads": 2, "offload_to_cpu": True, "keep_clip_on_cpu": True,
              "keep_vae_on_cpu": True, "max_vram": 0.5}  # fmt: skip
    try:
        _unload(sfumato.load_model(sd1_tiny_gguf, model_config=config))
    finally:
        logger.setLevel(level)
    log = capfd.readouterr().err
    assert "Initializing backend: Vulkan0" in log, log[-3000:]
    assert "CLIP: Using CPU backend" in log and "VAE Autoencoder: Using CPU backend" in log, log[-3000:]
    # Offloaded, the UNet's weights stay in RAM until a step runs.
    assert re.search(r"unet params backend buffer size = +[\d.]+ MB\(RAM\)", log), log[-3000:]
    for key, value in (("max_vram", -1), ("keep_vae_on_cpu", "yes"), ("offload_to_cpu", 1)):
        with pytest.raises(errors.InvalidParameterError, match=rf"model_config\.{key}"):
            sfumato.load_model(sd1_tiny_gguf, model_config={key: value})

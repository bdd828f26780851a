"""Vulkan on Mesa's lavapipe against the CPU backend: a functional figure, not a GPU's.

lavapipe runs Vulkan's compute shaders on the CPU (LLVM-compiled, its own threads), so
this says that the Vulkan module runs the whole generation and what that costs here,
nothing about the speed of a GPU. The tiny SD 1.x layout at 64x64, 4 steps, each
configuration in its own process; Vulkan with ggml's default f16 shader arithmetic, and
with it off (``GGML_VK_DISABLE_F16=1``, how the parity test runs it).
"""

from __future__ import annotations

from pathlib import Path

from pytest_benchmark.fixture import BenchmarkFixture

from .conftest import Probe, fmt, write_result

BASE = {"kind": "engine", "threads": 2, "steps": 4, "size": 64}
VULKAN = {"SFUMATO_BACKENDS": "cpu,vulkan", "GGML_VK_VISIBLE_DEVICES": "0", "SD_VK_DEVICE": "0"}
CONFIGS: dict[str, dict[str, str]] = {
    "CPU": {"SFUMATO_BACKENDS": "cpu"},
    "Vulkan0 (lavapipe), f16 shaders": VULKAN,
    "Vulkan0 (lavapipe), f32 shaders": {**VULKAN, "GGML_VK_DISABLE_F16": "1"},
}


def test_vulkan_on_lavapipe_against_the_cpu(benchmark: BenchmarkFixture, probe: Probe, sd1_tiny_gguf: Path) -> None:
    figures: dict[str, dict[str, float]] = {}

    def measure_all() -> None:
        for name, env in CONFIGS.items():
            figures[name] = probe(**BASE, model=str(sd1_tiny_gguf), env=env)

    benchmark.pedantic(measure_all, rounds=1, iterations=1)
    cpu = figures["CPU"]
    assert cpu["device"] == "CPU"
    rows: list[dict[str, object]] = []
    for name, found in figures.items():
        assert found["device"] == name.split(" ")[0], found  # the engine's own report
        rows.append({
            "configuration": name,
            "s / step": fmt(found["step_s"], 3),
            "step: this / CPU": fmt(found["step_s"] / cpu["step_s"], 1),
            "s / VAE decode": fmt(found["vae_s"], 3),
            "s / text encoding": fmt(found["conditioning_s"], 3),
            "load s": fmt(found["load_s"], 2),
            "peak RSS MB": round(found["peak_rss_mb"]),
        })  # fmt: skip
    benchmark.extra_info["figures"] = figures
    write_result(
        "devices",
        rows,
        "Vulkan on lavapipe (Mesa's software Vulkan: a CPU emulation, a functional figure) against the CPU "
        "backend: the tiny SD 1.x layout at 64x64, 4 steps, 2 threads, each row in its own process.",
    )

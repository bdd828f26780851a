"""Binding overhead: one generation (SD 1.x layout, 256x256, 2 steps) run
three ways on the same weights, parameters and seed:

- ``sfumato.engine``, sfumato's cffi binding, in this process;
- the SDK, whose model lives in a worker process (job, ticks and PNGs cross a pipe);
- ``stable-diffusion-cpp-python``'s own Python API (ctypes), in this process,
  which drives the same engine library.

Each way ends with PNG bytes, as the SDK does. The ways run interleaved, round
after round, in a rotating order, so that the noise of a shared machine falls
on all alike. Target: sfumato's ways within 1% of the fastest.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

# Imported before sfumato's engine is first used: the package installs its own
# process-wide log callback at import, and sfumato's must be the last installed.
import stable_diffusion_cpp  # isort: skip
from pytest_benchmark.fixture import BenchmarkFixture

import sfumato
from sfumato.engine.context import ContextParams, DiffusionContext, ImageRequest
from sfumato.images import decode_png, encode_png

from .conftest import QUICK, fmt, write_result

SIZE, STEPS, SEED, THREADS = (64, 1, 7, 2) if QUICK else (256, 2, 7, 2)
ROUNDS = 2 if QUICK else 4
PROMPT = "a lighthouse at dusk"
TARGET = 1.01


def test_binding_overhead(benchmark: BenchmarkFixture, sd1_gguf: Path) -> None:
    request = ImageRequest(prompt=PROMPT, width=SIZE, height=SIZE, steps=STEPS, seed=SEED)
    model_id = sfumato.load_model(sd1_gguf, model_config={"threads": THREADS})
    context = DiffusionContext(ContextParams(model_path=str(sd1_gguf), n_threads=THREADS))
    other = stable_diffusion_cpp.StableDiffusion(model_path=str(sd1_gguf), n_threads=THREADS, verbose=False)

    def engine() -> list[bytes]:
        return [encode_png(image) for image in context.generate(request).images]

    def sdk() -> list[bytes]:
        result = sfumato.diffusion(model_id, prompt=PROMPT, width=SIZE, height=SIZE, steps=STEPS, seed=SEED)
        return result.outputs.result()

    def sdcpp_python() -> list[bytes]:
        # That package passes eta=0 unless told; the engine's own default for its
        # default sampler (euler_a) is 1, which sfumato leaves in place.
        images = other.generate_image(
            prompt=PROMPT, width=SIZE, height=SIZE, sample_steps=STEPS, seed=SEED, cfg_scale=7.0, eta=1.0
        )
        return [encode_png(np.asarray(image.convert("RGB"))) for image in images]

    ways: dict[str, Callable[[], list[bytes]]] = {
        "sfumato.engine": engine,
        "sfumato SDK (worker)": sdk,
        "stable-diffusion-cpp-python": sdcpp_python,
    }
    try:
        # Same work every way: the same pixels.
        pixels = {name: [decode_png(png) for png in way()] for name, way in ways.items()}
        first = next(iter(pixels.values()))
        for name, images in pixels.items():
            assert all(np.array_equal(a, b) for a, b in zip(images, first, strict=True)), name
        times: dict[str, list[float]] = {name: [] for name in ways}
        names = list(ways)
        rounds = iter(range(ROUNDS))

        def one_round() -> None:
            shift = next(rounds) % len(names)
            for name in names[shift:] + names[:shift]:
                started = time.perf_counter()
                ways[name]()
                times[name].append(time.perf_counter() - started)

        benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    finally:
        context.close()
        sfumato.unload_model(model_id)

    median = {name: statistics.median(t) for name, t in times.items()}
    fastest = min(median.values())
    benchmark.extra_info.update({name: [round(t, 3) for t in ts] for name, ts in times.items()})
    rows: list[dict[str, object]] = [
        {
            "way": name,
            "median s": fmt(median[name]),
            "best s": fmt(min(times[name])),
            "/ fastest (median)": fmt(median[name] / fastest, 4),
            "runs": len(times[name]),
        }
        for name in ways
    ]
    write_result(
        "binding_overhead",
        rows,
        f"Binding overhead: SD 1.x layout (f16 GGUF), {SIZE}x{SIZE}, {STEPS} steps, {THREADS} threads, "
        f"{ROUNDS} interleaved rounds; each way ends with PNG bytes (target: sfumato <= {TARGET} x the fastest).",
    )
    for row in rows:
        print(row)

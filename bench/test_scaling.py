"""Scaling: generation time and peak RSS against image size (256, 384, 512)
and against ``batch_count`` (1, 2, 4 at 256), with growth exponents fitted on
log-log axes (time ~ pixels^a, time ~ batch^b). Baseline options (f16, 2
threads); 2 sampling steps per image at every size, each configuration in its
own process."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from pytest_benchmark.fixture import BenchmarkFixture

from . import plots
from .conftest import QUICK, RESULTS, Probe, fmt, write_result
from .test_engine_options import BASELINE

SIZES = (64, 96, 128) if QUICK else (256, 384, 512)
BATCHES = (1, 2, 4)
STEPS = 1 if QUICK else 2


def exponent(xs: list[float], ys: list[float]) -> float:
    """The slope of log(y) against log(x), least squares."""
    return float(np.polyfit([math.log(x) for x in xs], [math.log(y) for y in ys], 1)[0])


def test_scaling(benchmark: BenchmarkFixture, probe: Probe, sd1_fp32_folder: Path) -> None:
    by_size: dict[int, dict[str, float]] = {}
    by_batch: dict[int, dict[str, float]] = {}

    def config(size: int, batch: int) -> dict[str, object]:
        return {"kind": "engine", "model": str(sd1_fp32_folder), "size": size, "steps": STEPS, "batch": batch}

    def measure_all() -> None:
        for size in SIZES:
            by_size[size] = probe(**config(size, 1), **BASELINE)
        for batch in BATCHES:
            by_batch[batch] = probe(**config(SIZES[0], batch), **BASELINE)

    benchmark.pedantic(measure_all, rounds=1, iterations=1)
    pixels = [float(s * s) for s in by_size]
    size_time = [f["generate_s"] for f in by_size.values()]
    size_rss = [f["peak_rss_mb"] for f in by_size.values()]
    batch_time = [f["generate_s"] for f in by_batch.values()]
    batch_rss = [f["peak_rss_mb"] for f in by_batch.values()]
    exps = {
        "time ~ pixels^a": exponent(pixels, size_time),
        "step time ~ pixels^a": exponent(pixels, [f["step_s"] for f in by_size.values()]),
        "VAE time ~ pixels^a": exponent(pixels, [f["vae_s"] for f in by_size.values()]),
        "peak RSS ~ pixels^a": exponent(pixels, size_rss),
        "time ~ batch^b": exponent([float(b) for b in by_batch], batch_time),
        "peak RSS ~ batch^b": exponent([float(b) for b in by_batch], batch_rss),
    }
    rows: list[dict[str, object]] = [
        {"size": s, "batch": 1, "generate s": fmt(f["generate_s"]), "s/step": fmt(f["step_s"]),
         "VAE s": fmt(f["vae_s"]), "peak RSS MB": round(f["peak_rss_mb"])}
        for s, f in by_size.items()
    ] + [
        {"size": SIZES[0], "batch": b, "generate s": fmt(f["generate_s"]), "s/step": fmt(f["step_s"]),
         "VAE s": fmt(f["vae_s"]), "peak RSS MB": round(f["peak_rss_mb"])}
        for b, f in by_batch.items()
    ]  # fmt: skip
    rows += [{"size": name, "batch": "", "generate s": fmt(v), "s/step": "", "VAE s": "", "peak RSS MB": ""}
             for name, v in exps.items()]  # fmt: skip
    benchmark.extra_info["exponents"] = exps
    write_result(
        "scaling",
        rows,
        f"Scaling (f16, 2 threads, {STEPS} steps per image). The last rows are the fitted growth exponents "
        "(in the 'generate s' column).",
    )
    plots.lines(
        RESULTS / "scaling.png",
        "Generation time against pixels and batch (log-log)",
        {
            "time vs pixels (batch 1)": (pixels, size_time),
            f"time vs batch x pixels ({SIZES[0]}^2)": ([b * pixels[0] for b in by_batch], batch_time),
        },
        "pixels generated",
        "seconds",
        log=True,
    )

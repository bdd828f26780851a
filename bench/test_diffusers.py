"""sfumato against diffusers (PyTorch CPU, fp32) on identical random SD 1.x
weights: seconds per sampling step at 256 and 512, VAE decode time and peak
RSS, each configuration in its own process, all in one run.

sfumato runs the fp32 folder as fp32 (the same arithmetic as diffusers) and
converted to f16 at load (what a user's f16 checkpoint gives). diffusers runs
as it comes, with attention slicing, and with channels-last memory format.
Ratios are diffusers / sfumato-fp32: above 1, sfumato is faster or smaller.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pytest_benchmark.fixture import BenchmarkFixture

from . import plots
from .conftest import RESULTS, SIZES, Probe, fmt, write_result
from .test_engine_options import engine_config, steps_for

SFUMATO: dict[str, dict[str, Any]] = {"sfumato fp32": {"wtype": "f32"}, "sfumato f16": {}}
DIFFUSERS: dict[str, dict[str, Any]] = {
    "diffusers fp32": {},
    "diffusers + attention slicing": {"attention_slicing": True},
    "diffusers + channels-last": {"channels_last": True},
}


def test_against_diffusers(benchmark: BenchmarkFixture, probe: Probe, sd1_fp32_folder: Path) -> None:
    figures: dict[tuple[str, int], dict[str, float]] = {}

    def measure_all() -> None:
        for size in SIZES:
            for name, changes in SFUMATO.items():
                figures[name, size] = probe(**engine_config(sd1_fp32_folder, size, **changes))
            for name, options in DIFFUSERS.items():
                config = {"kind": "diffusers", "model": str(sd1_fp32_folder), "size": size, "threads": 2}
                figures[name, size] = probe(**config, steps=steps_for(size), **options)

    benchmark.pedantic(measure_all, rounds=1, iterations=1)
    rows: list[dict[str, object]] = []
    for size in SIZES:
        ours = figures["sfumato fp32", size]
        for name in [*SFUMATO, *DIFFUSERS]:
            f = figures[name, size]
            rows.append(
                {
                    "size": size,
                    "implementation": name,
                    "s/step": fmt(f["step_s"]),
                    "VAE s": fmt(f["vae_s"]),
                    "peak RSS MB": round(f["peak_rss_mb"]),
                    "step ratio": fmt(f["step_s"] / ours["step_s"]),
                    "VAE ratio": fmt(f["vae_s"] / ours["vae_s"]),
                    "RSS ratio": fmt(f["peak_rss_mb"] / ours["peak_rss_mb"]),
                }
            )
    benchmark.extra_info["figures"] = {f"{n} @ {s}": v for (n, s), v in figures.items()}
    write_result(
        "diffusers",
        rows,
        "sfumato against diffusers on identical weights, 2 threads each; ratios are this row / sfumato fp32 "
        "(above 1: sfumato fp32 is faster or smaller).",
    )
    names = [*SFUMATO, *DIFFUSERS]
    plots.bars(
        RESULTS / "diffusers.png",
        "sfumato against diffusers (CPU): seconds per step and per VAE decode",
        [f"{kind} {size}" for size in SIZES for kind in ("step", "VAE")],
        {n: [figures[n, size][key] for size in SIZES for key in ("step_s", "vae_s")] for n in names},
        "seconds",
    )

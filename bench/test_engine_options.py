"""Engine options on CPU: seconds per sampling step, VAE decode time and peak
RSS, for each weight type (f32, f16, q8_0, q4_0), flash attention,
conv-direct and 1 or 2 threads, at 256x256 and 512x512 (SD 1.x layout).

Options are varied one at a time from a baseline (f16 weights, 2 threads,
neither flash attention nor conv-direct); every configuration runs in its own
process on the same random weights (one fp32 folder, converted at load).
sfumato's CPU defaults follow these figures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pytest_benchmark.fixture import BenchmarkFixture

from . import plots
from .conftest import QUICK, RESULTS, SIZES, Probe, fmt, write_result

BASELINE: dict[str, Any] = {"wtype": "f16", "threads": 2, "flash_attn": False, "conv_direct": False}
VARIANTS: dict[str, dict[str, Any]] = {
    "f16 (baseline)": {},
    "f32": {"wtype": "f32"},
    "q8_0": {"wtype": "q8_0"},
    "q4_0": {"wtype": "q4_0"},
    "flash attention": {"flash_attn": True},
    "conv-direct": {"conv_direct": True},
    "1 thread": {"threads": 1},
}


def steps_for(size: int) -> int:
    """2 steps at 256 (the first step carries the graph set-up), 1 at 512 (a step there takes a minute)."""
    return 1 if QUICK or size >= 512 else 2


def engine_config(model: Path, size: int, **changes: Any) -> dict[str, Any]:
    return {"kind": "engine", "model": str(model), "size": size, "steps": steps_for(size), **BASELINE, **changes}


def test_engine_options(benchmark: BenchmarkFixture, probe: Probe, sd1_fp32_folder: Path) -> None:
    figures: dict[tuple[str, int], dict[str, float]] = {}

    def measure_all() -> None:
        for size in SIZES:
            for name, changes in VARIANTS.items():
                figures[name, size] = probe(**engine_config(sd1_fp32_folder, size, **changes))

    benchmark.pedantic(measure_all, rounds=1, iterations=1)
    rows: list[dict[str, object]] = []
    for name in VARIANTS:
        row: dict[str, object] = {"option": name}
        for size in SIZES:
            f, base = figures[name, size], figures["f16 (baseline)", size]
            row[f"s/step {size}"] = fmt(f["step_s"])
            row[f"vs base {size}"] = fmt(f["step_s"] / base["step_s"])
            row[f"VAE s {size}"] = fmt(f["vae_s"])
            row[f"peak RSS MB {size}"] = round(f["peak_rss_mb"])
        rows.append(row)
    benchmark.extra_info["figures"] = {f"{n} @ {s}": v for (n, s), v in figures.items()}
    write_result(
        "engine_options",
        rows,
        "Engine options on CPU, one at a time from the baseline (f16, 2 threads, no flash attention, no "
        f"conv-direct); steps per run: {', '.join(f'{steps_for(s)} at {s}' for s in SIZES)}; "
        "each row in its own process.",
    )
    plots.bars(
        RESULTS / "engine_options.png",
        "Engine options on CPU: seconds per sampling step (SD 1.x layout)",
        list(VARIANTS),
        {f"{size}x{size}": [figures[n, size]["step_s"] for n in VARIANTS] for size in SIZES},
        "s / step",
    )

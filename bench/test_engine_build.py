"""How the engine is built decides its speed: the stock dependency build, sfumato's
default (portable) build, sfumato's native build and diffusers fp32, side by side on
the same random SD 1.x weights, at 256 and 512.

Each configuration runs in its own process (its peak RSS is its own), the rounds take
the builds in turn, and the table gives each figure's range over the rounds; ratios
are taken between the best runs. The engine loads the fp32 folder converted to f16 at
load (what an f16 checkpoint gives); diffusers runs it in fp32.

Then a profile: where the default build spends a 512 generation (``perf record`` on
the unstripped library), written to ``engine_profile.md``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from pytest_benchmark.fixture import BenchmarkFixture

from . import engines, plots
from .conftest import QUICK, RESULTS, ROOT, SIZES, Probe, fmt, write_result
from .test_engine_options import engine_config, steps_for

ENGINE_ROWS = tuple(engines.BUILDS)
ROWS = (*ENGINE_ROWS, "diffusers fp32")
ROUNDS = 1 if QUICK else 2

# The targets, for a CPU with AVX-512 (the stock build's -march=native then
# takes ggml's AVX-512 kernels, which lose to AVX2 on SD's head size of 40).
TARGET_STEP_512 = 0.45
TARGET_VAE_512 = 0.55
TARGET_DIFFUSERS_256 = 1.10


def _config(row: str, libraries: dict[str, Path], model: Path, size: int, turn: int) -> dict[str, Any]:
    if row == "diffusers fp32":
        return {"kind": "diffusers", "model": str(model), "size": size, "threads": 2, "steps": steps_for(size),
                "turn": turn}  # fmt: skip
    return {**engine_config(model, size), "engine_lib": str(libraries[row]), "turn": turn}


def _span(values: list[float]) -> str:
    low, high = min(values), max(values)
    return fmt(low) if len(values) == 1 or fmt(low) == fmt(high) else f"{fmt(low)}-{fmt(high)}"


def test_engine_builds(benchmark: BenchmarkFixture, probe: Probe, sd1_fp32_folder: Path) -> None:
    libraries = {name: engines.build_library(name) for name in ENGINE_ROWS}
    figures: dict[tuple[str, int], list[dict[str, float]]] = {}

    def measure_all() -> None:
        for turn in range(ROUNDS):
            for size in SIZES:
                for row in ROWS:
                    figures.setdefault((row, size), []).append(
                        probe(**_config(row, libraries, sd1_fp32_folder, size, turn))
                    )

    benchmark.pedantic(measure_all, rounds=1, iterations=1)

    def best(row: str, size: int, key: str) -> float:
        return min(f[key] for f in figures[row, size])

    rows: list[dict[str, object]] = []
    for size in SIZES:
        for row in ROWS:
            runs = figures[row, size]
            rows.append({
                "size": size,
                "build": row,
                "s/step": _span([f["step_s"] for f in runs]),
                "VAE s": _span([f["vae_s"] for f in runs]),
                "peak RSS MB": round(max(f["peak_rss_mb"] for f in runs)),
                "step / stock": fmt(best(row, size, "step_s") / best("stock", size, "step_s")),
                "VAE / stock": fmt(best(row, size, "vae_s") / best("stock", size, "vae_s")),
                "step / diffusers": fmt(best(row, size, "step_s") / best("diffusers fp32", size, "step_s")),
            })  # fmt: skip
    small, large = SIZES
    step_512 = best("sfumato default", large, "step_s") / best("stock", large, "step_s")
    vae_512 = best("sfumato default", large, "vae_s") / best("stock", large, "vae_s")
    vs_diffusers = best("sfumato default", small, "step_s") / best("diffusers fp32", small, "step_s")
    native_gain = best("sfumato default", large, "step_s") / best("sfumato native", large, "step_s")
    verdicts = [
        f"default / stock per step at {large}: {step_512:.2f} (target <= {TARGET_STEP_512} on AVX-512 CPUs)",
        f"default / stock per VAE decode at {large}: {vae_512:.2f} (target <= {TARGET_VAE_512})",
        f"default / diffusers fp32 per step at {small}: {vs_diffusers:.2f} (target <= {TARGET_DIFFUSERS_256})",
        f"native / default per step at {large}: {1 / native_gain:.2f}",
    ]
    benchmark.extra_info["figures"] = {f"{n} @ {s}": v for (n, s), v in figures.items()}
    benchmark.extra_info["ratios"] = verdicts
    write_result(
        "engine_build",
        rows,
        f"Engine builds on {engines.cpu_description()}, 2 threads, SD 1.x layout (f16 at load; diffusers fp32); "
        f"steps per run: {', '.join(f'{steps_for(s)} at {s}' for s in SIZES)}; {ROUNDS} rounds taking the builds "
        "in turn, each run in its own process; ranges over the rounds, ratios between the best runs.\n\n"
        + "\n".join(f"- {line}" for line in verdicts),
    )
    plots.bars(
        RESULTS / "engine_build.png",
        "Engine builds (CPU): seconds per step and per VAE decode, best run",
        [f"{kind} {size}" for size in SIZES for kind in ("step", "VAE")],
        {r: [best(r, size, key) for size in SIZES for key in ("step_s", "vae_s")] for r in ROWS},
        "seconds",
    )


PROFILE_TOP = 15


def test_where_a_512_generation_goes(benchmark: BenchmarkFixture, sd1_fp32_folder: Path, tmp_path: Path) -> None:
    perf = shutil.which("perf")
    assert perf, "perf is missing: apt-get install linux-perf"
    library = engines.unstripped_library("sfumato default")
    size = SIZES[1]
    config = {**engine_config(sd1_fp32_folder, size), "engine_lib": str(library)}
    data = tmp_path / "perf.data"

    def record() -> None:
        command = [perf, "record", "-F", "199", "-g", "-o", str(data), "--", sys.executable, "-m", "bench.probe",
                   json.dumps(config)]  # fmt: skip
        subprocess.run(command, check=True, cwd=ROOT, capture_output=True)

    benchmark.pedantic(record, rounds=1, iterations=1)
    report = subprocess.run(
        [perf, "report", "-i", str(data), "--no-children", "--sort", "symbol", "--stdio", "--percent-limit", "0.5",
         "-g", "none"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    rows: list[dict[str, object]] = []
    for line in report.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].endswith("%") and parts[1] == "[.]":
            function = " ".join(parts[2:]).removesuffix("- -").strip()
            rows.append({"share of samples": parts[0], "function": function[:110]})
    assert rows, report[-3000:]
    write_result(
        "engine_profile",
        rows[:PROFILE_TOP],
        f"Where sfumato's default build spends one {size}x{size} generation (the probe's: load, a 64x64 warm-up, "
        f"the text encoder, one sampling step with CFG, the VAE decode), by function; perf record on "
        f"{engines.cpu_description()}.",
    )

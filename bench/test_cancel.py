"""A cancel mid-step at 512 on the full-size SD 1.x layout, each way in its own process:
the worker stopping the job within one graph operation and keeping its model (sfumato's
engine build on the CPU), against the fallback that ends the worker and loads the model
again (GPU backends, a job that does not stop in time). Figures: the cancel's latency,
and the time from the cancel to the next job's start and to its first sampling step.
"""

from __future__ import annotations

from pathlib import Path

from pytest_benchmark.fixture import BenchmarkFixture

from . import engines
from .conftest import QUICK, Probe, fmt, write_result

SIZE = 128 if QUICK else 512
MODES = {"stop in the worker (default)": "soft", "kill and reload (fallback)": "kill"}


def test_cancel_keeps_the_model(benchmark: BenchmarkFixture, probe: Probe, sd1_gguf: Path) -> None:
    figures: dict[str, dict[str, float]] = {}

    def measure_all() -> None:
        for name, mode in MODES.items():
            figures[name] = probe(kind="cancel", model=str(sd1_gguf), size=SIZE, threads=2, mode=mode)

    benchmark.pedantic(measure_all, rounds=1, iterations=1)
    rows: list[dict[str, object]] = [
        {
            "cancel": name,
            "cancel latency ms": fmt(f["cancel_s"] * 1000, 0),
            "to the next job's start s": fmt(f["to_next_start_s"]),
            "to its first step s": fmt(f["to_next_step_s"]),
        }
        for name, f in figures.items()
    ]
    benchmark.extra_info["figures"] = figures
    write_result(
        "cancel",
        rows,
        f"A cancel mid-step at {SIZE}x{SIZE} through the SDK on {engines.cpu_description()}, 2 threads, "
        "SD 1.x layout (f16 GGUF); medians of 2 cancels, each way in its own process.",
    )

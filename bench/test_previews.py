"""What live previews cost per sampling step on CPU: no previews, the latent
projected to RGB (``preview="proj"``, sfumato's default when previews are asked
for) and a full VAE decode per step (``"vae"``, at the smaller size only: at 512
it adds a whole decode to every step). SD 1.x layout, f16, 2 threads, 2 steps;
each configuration in its own process on the same random weights."""

from __future__ import annotations

from pathlib import Path

from pytest_benchmark.fixture import BenchmarkFixture

from .conftest import SIZES, Probe, fmt, write_result

BASE = {"kind": "engine", "wtype": "f16", "threads": 2, "steps": 2}
MODES: dict[str, str | None] = {"off": None, "proj": "proj", "vae": "vae"}


def _runs(mode: str, size: int) -> bool:
    return mode != "vae" or size == SIZES[0]


def test_preview_cost_per_step(benchmark: BenchmarkFixture, probe: Probe, sd1_fp32_folder: Path) -> None:
    figures: dict[tuple[str, int], dict[str, float]] = {}

    def measure_all() -> None:
        for size in SIZES:
            for name, mode in MODES.items():
                if _runs(name, size):
                    figures[name, size] = probe(**BASE, model=str(sd1_fp32_folder), size=size, preview=mode)

    benchmark.pedantic(measure_all, rounds=1, iterations=1)
    rows: list[dict[str, object]] = []
    for name in MODES:
        row: dict[str, object] = {"previews": name}
        for size in SIZES:
            if not _runs(name, size):
                row[f"s/step {size}"] = row[f"added s/step {size}"] = "-"
                continue
            step, base = figures[name, size]["step_s"], figures["off", size]["step_s"]
            row[f"s/step {size}"] = fmt(step, 3)
            row[f"added s/step {size}"] = fmt(step - base, 3)
        rows.append(row)
    benchmark.extra_info["figures"] = {f"{n} @ {s}": v for (n, s), v in figures.items()}
    write_result(
        "previews",
        rows,
        "Live previews on CPU: seconds per sampling step with none, the latent projection and a VAE decode per "
        "step (SD 1.x layout, f16, 2 threads, 2 steps); each row in its own process. 'added' is this row minus "
        "'off' at the same size, within one run: differences under a few hundredths are noise.",
    )

"""What live previews cost per sampling step on CPU, against the same run without
them: the latent projected to RGB (``preview="proj"``, sfumato's default when
previews are asked for) on every step and on every 5th, the tiny autoencoder
(``"tae"``: a TAESD file in its real layout, random weights, loaded for previews
only) and a full VAE decode per step (``"vae"``, at the smaller size only: at 512
it adds a whole decode to every step). SD 1.x layout, f16, 2 threads, 5 steps;
each configuration in its own process on the same random weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pytest_benchmark.fixture import BenchmarkFixture

from .conftest import SIZES, Probe, fmt, write_result

BASE = {"kind": "engine", "wtype": "f16", "threads": 2, "steps": 5}


def _modes(taesd: Path) -> dict[str, dict[str, Any]]:
    return {
        "off": {},
        "proj, every step": {"preview": "proj"},
        "proj, every 5th step": {"preview": "proj", "preview_interval": 5},
        "tae, every step": {"preview": "tae", "taesd": str(taesd), "tae_preview_only": True},
        "vae, every step": {"preview": "vae"},
    }


def _runs(mode: str, size: int) -> bool:
    return not mode.startswith("vae") or size == SIZES[0]


def test_preview_cost_per_step(benchmark: BenchmarkFixture, probe: Probe, sd1_fp32_folder: Path, taesd: Path) -> None:
    modes = _modes(taesd)
    figures: dict[tuple[str, int], dict[str, float]] = {}

    def measure_all() -> None:
        for size in SIZES:
            for name, extra in modes.items():
                if _runs(name, size):
                    figures[name, size] = probe(**BASE, model=str(sd1_fp32_folder), size=size, **extra)

    benchmark.pedantic(measure_all, rounds=1, iterations=1)
    rows: list[dict[str, object]] = []
    for name in modes:
        row: dict[str, object] = {"previews": name}
        for size in SIZES:
            if not _runs(name, size):
                row[f"s/step {size}"] = row[f"x off {size}"] = "-"
                continue
            step, base = figures[name, size]["step_s"], figures["off", size]["step_s"]
            row[f"s/step {size}"] = fmt(step, 3)
            row[f"x off {size}"] = fmt(step / base, 2)
        rows.append(row)
    benchmark.extra_info["figures"] = {f"{n} @ {s}": v for (n, s), v in figures.items()}
    write_result(
        "previews",
        rows,
        "Live previews on CPU: seconds per sampling step with none, the latent projection on every step and on "
        "every 5th, the tiny autoencoder (TAESD, previews only) and a VAE decode per step (SD 1.x layout, f16, "
        "2 threads, 5 steps); each row in its own process. 'x off' is this row over 'off' at the same size, "
        "within one run: ratios within a few hundredths of 1 are noise.",
    )

"""Each CPU variant of the engine build against the one sfumato's probe chooses.

The SD 1.x layout (f16 at load) at 256 and 512, each variant in its own process
(``SFUMATO_CPU_VARIANT``), every variant this CPU runs; the probe's choice is the one
this process made (remembered in sfumato's cache, or probed now). The goal: the chosen
variant within 5% of the fastest per step, at both sizes.
"""

from __future__ import annotations

from pathlib import Path

from pytest_benchmark.fixture import BenchmarkFixture

from sfumato.engine.cpu_variants import runs_here, variant_modules
from sfumato.engine.library import load_engine

from . import engines
from .conftest import SIZES, Probe, fmt, write_result
from .test_engine_options import engine_config, steps_for

TARGET = 1.05


def test_each_cpu_variant_against_the_chosen_one(
    benchmark: BenchmarkFixture, probe: Probe, sd1_fp32_folder: Path
) -> None:
    engine = load_engine()
    assert engine.cpu_choice is not None, "the engine build has CPU variants"
    modules = variant_modules({m.name: m.path for m in engine.modules})
    variants = [name for name, path in modules.items() if runs_here(path)]
    chosen = engine.cpu_choice.variant
    figures: dict[tuple[str, int], dict[str, float]] = {}

    def measure_all() -> None:
        for size in SIZES:
            for variant in variants:
                config = engine_config(sd1_fp32_folder, size, env={"SFUMATO_CPU_VARIANT": variant})
                figures[variant, size] = probe(**config)

    benchmark.pedantic(measure_all, rounds=1, iterations=1)
    probed = {t.variant: t for t in engine.cpu_choice.timings}
    rows: list[dict[str, object]] = []
    verdicts: list[str] = []
    for size in SIZES:
        fastest = min(variants, key=lambda v: figures[v, size]["step_s"])
        for variant in variants:
            found = figures[variant, size]
            assert found["cpu_variant"] == variant, found  # the process ran the variant it named
            timing = probed.get(variant)
            rows.append({
                "size": size,
                "variant": variant + (" (chosen)" if variant == chosen else ""),
                "s/step": fmt(found["step_s"]),
                "VAE s": fmt(found["vae_s"]),
                "step / fastest": fmt(found["step_s"] / figures[fastest, size]["step_s"]),
                "probe ms": fmt(timing.total_s * 1000, 1) if timing is not None else "-",
            })  # fmt: skip
        ratio = figures[chosen, size]["step_s"] / figures[fastest, size]["step_s"]
        verdicts.append(f"chosen ({chosen}) / fastest ({fastest}) per step at {size}: {ratio:.3f} (target <= {TARGET})")
    benchmark.extra_info["figures"] = {f"{v} @ {s}": f for (v, s), f in figures.items()}
    benchmark.extra_info["ratios"] = verdicts
    write_result(
        "cpu_variants",
        rows,
        f"The engine build's CPU variants on {engines.cpu_description()}, 2 threads, SD 1.x layout (f16 at load); "
        f"steps per run: {', '.join(f'{steps_for(s)} at {s}' for s in SIZES)}; each run in its own process; "
        f"the chosen variant is the probe's ({engine.cpu_choice.how}), probe ms its timing of both graphs.\n\n"
        + "\n".join(f"- {line}" for line in verdicts),
    )

"""sfumato's own CPU kernels (``csrc/``) against diffusers on identical random SD 1.x
weights: seconds per sampling step (CFG, batch 2 through the UNet), seconds per VAE
decode and peak RSS at 256 and 512, each configuration in its own process, each the
fastest of ROUNDS runs taken in turn, in one session.

Rows: sfumato with its kernels on the variant its probe chooses and on each variant this
CPU runs (``SFUMATO_CPU_VARIANT``), sfumato in its bf16 mode (``precision="bf16"``: on a
CPU with AVX512-BF16 or AMX-BF16, weights converted to bf16 at load), with and without
its kept convolution weights (``SFUMATO_KEEP_WEIGHTS=0``), sfumato with ggml's
own kernels (``SFUMATO_KERNELS=ggml``: what the engine ran before), diffusers fp32 and
diffusers with its UNet and VAE in bf16. sfumato loads the fp32 folder as f16 weights
(what a user's f16 checkpoint gives); its exact mode computes in f32. Ratios are
diffusers fp32 (or bf16) / the row: above 1, the row is faster.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from pytest_benchmark.fixture import BenchmarkFixture

from sfumato.engine.cpu_variants import BF16_FLAGS, cpu_identity, runs_here, variant_modules
from sfumato.engine.library import load_engine

from . import engines
from .conftest import QUICK, SIZES, Probe, fmt, write_result
from .test_engine_options import engine_config, steps_for

ROUNDS = 1 if QUICK else 3
"""How many times each configuration runs, the rounds interleaved. Each figure is the
fastest of its runs: on this shared machine a slow run measured a neighbour, and one
run of each configuration let that land on either side of a ratio."""


def _fastest(measured: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest step and VAE decode of a configuration's runs, and the highest peak RSS."""
    best = dict(min(measured, key=lambda f: f["step_s"]))
    best["vae_s"] = min(f["vae_s"] for f in measured)
    best["peak_rss_mb"] = max(f["peak_rss_mb"] for f in measured)
    return best


def test_sfumato_kernels_against_diffusers(benchmark: BenchmarkFixture, probe: Probe, sd1_fp32_folder: Path) -> None:
    engine = load_engine()
    modules = variant_modules({m.name: m.path for m in engine.modules})
    variants = [name for name, path in modules.items() if runs_here(path)]
    configs: dict[str, dict[str, Any]] = {"sfumato (probe's variant)": {}}
    configs.update({f"sfumato {v}": {"env": {"SFUMATO_CPU_VARIANT": v}} for v in variants})
    if set(BF16_FLAGS) & set(cpu_identity()[1].split()):
        configs["sfumato bf16 mode"] = {"env": {"SFUMATO_PRECISION": "bf16"}, "wtype": "bf16"}
        # The bf16 mode packs the convolutions' weights once and keeps them (csrc/kept_weights.h): without, too.
        configs["sfumato bf16 mode, weights not kept"] = {
            "env": {"SFUMATO_PRECISION": "bf16", "SFUMATO_KEEP_WEIGHTS": "0"},
            "wtype": "bf16",
        }
    configs["ggml's own kernels"] = {"env": {"SFUMATO_KERNELS": "ggml"}}
    references: dict[str, dict[str, Any]] = {"diffusers fp32": {}, "diffusers bf16": {"dtype": "bf16"}}
    runs: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)

    def measure_all() -> None:
        for turn in range(ROUNDS):
            for size in SIZES:
                for name, changes in configs.items():
                    runs[name, size].append(probe(**engine_config(sd1_fp32_folder, size, **changes), round=turn))
                for name, options in references.items():
                    config = {"kind": "diffusers", "model": str(sd1_fp32_folder), "size": size, "threads": 2}
                    runs[name, size].append(probe(**config, steps=steps_for(size), **options, round=turn))

    benchmark.pedantic(measure_all, rounds=1, iterations=1)
    figures = {key: _fastest(measured) for key, measured in runs.items()}
    rows: list[dict[str, object]] = []
    for size in SIZES:
        base, bf16 = figures["diffusers fp32", size], figures["diffusers bf16", size]
        for name in [*configs, *references]:
            f = figures[name, size]
            shown = name.endswith(("variant)", "mode", "kept")) or name.startswith("ggml")
            variant = f" ({f['cpu_variant']})" if shown else ""
            rows.append({
                "size": size,
                "implementation": name + variant,
                "s/step": fmt(f["step_s"]),
                "VAE s": fmt(f["vae_s"]),
                "peak RSS MB": round(f["peak_rss_mb"]),
                "step: fp32 / row": fmt(base["step_s"] / f["step_s"]),
                "VAE: fp32 / row": fmt(base["vae_s"] / f["vae_s"]),
                "step: bf16 / row": fmt(bf16["step_s"] / f["step_s"]),
            })  # fmt: skip
    benchmark.extra_info["figures"] = {f"{n} @ {s}": v for (n, s), v in figures.items()}
    write_result(
        "cpu_kernels",
        rows,
        f"sfumato's kernels against diffusers on {engines.cpu_description()}, ISA flags: {engines.isa_flags()}; "
        "2 threads, SD 1.x layout on "
        f"identical random weights; steps per run: {', '.join(f'{steps_for(s)} at {s}' for s in SIZES)}; "
        f"each row in its own process, the fastest of {ROUNDS} runs taken in turn. "
        "Above 1 in the ratio columns: the row is faster than diffusers fp32.",
    )

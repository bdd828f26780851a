"""The tiny autoencoder against the full VAE on CPU: seconds per decode at 256x256
and 512x512 (SD 1.x layout, f16, 2 threads), each configuration in its own
process on the same random weights.

TAESD approximates the VAE (a distilled decoder, 1.2M parameters against the
VAE decoder's 49M): the speed is real, the pixels are not the VAE's.
"""

from __future__ import annotations

from pathlib import Path

from pytest_benchmark.fixture import BenchmarkFixture

from .conftest import SIZES, Probe, fmt, write_result

BASE = {"kind": "engine", "wtype": "f16", "threads": 2, "steps": 1}


def test_taesd_against_the_vae(benchmark: BenchmarkFixture, probe: Probe, sd1_fp32_folder: Path, taesd: Path) -> None:
    decoders = {"VAE": {}, "TAESD": {"taesd": str(taesd)}}
    figures: dict[tuple[str, int], dict[str, float]] = {}

    def measure_all() -> None:
        for size in SIZES:
            for name, extra in decoders.items():
                figures[name, size] = probe(**BASE, model=str(sd1_fp32_folder), size=size, **extra)

    benchmark.pedantic(measure_all, rounds=1, iterations=1)
    rows: list[dict[str, object]] = []
    for name in decoders:
        row: dict[str, object] = {"decoder": name}
        for size in SIZES:
            row[f"decode s {size}"] = fmt(figures[name, size]["vae_s"], 3)
            row[f"VAE / this {size}"] = fmt(figures["VAE", size]["vae_s"] / figures[name, size]["vae_s"], 1)
            row[f"peak RSS MB {size}"] = round(figures[name, size]["peak_rss_mb"])
        rows.append(row)
    benchmark.extra_info["figures"] = {f"{n} @ {s}": v for (n, s), v in figures.items()}
    write_result(
        "taesd",
        rows,
        "Decoding one image: the full VAE against the tiny autoencoder (TAESD) on CPU, SD 1.x layout, f16, "
        "2 threads; each row in its own process. TAESD is an approximation of the VAE.",
    )

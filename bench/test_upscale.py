"""Upscale throughput: output megapixels per second against ``tile_size``, for
a random ESRGAN in the RealESRGAN_x4plus layout (23 RRDB blocks, x4) on a
128x128 image (a 512x512 result), each tile size in its own process."""

from __future__ import annotations

from pathlib import Path

from pytest_benchmark.fixture import BenchmarkFixture

from . import plots
from .conftest import QUICK, RESULTS, Probe, fmt, write_result

SIZE = 32 if QUICK else 128
TILES = (16, 32) if QUICK else (32, 64, 128)


def test_upscale_throughput(benchmark: BenchmarkFixture, probe: Probe, esrgan_x4: Path) -> None:
    figures: dict[int, dict[str, float]] = {}

    def measure_all() -> None:
        for tile in TILES:
            figures[tile] = probe(kind="upscale", model=str(esrgan_x4), size=SIZE, tile_size=tile, threads=2)

    benchmark.pedantic(measure_all, rounds=1, iterations=1)
    rows: list[dict[str, object]] = [
        {
            "tile_size": tile,
            "seconds": fmt(f["upscale_s"]),
            "MP/s (output)": fmt(f["out_mp"] / f["upscale_s"], 4),
            "peak RSS MB": round(f["peak_rss_mb"]),
        }
        for tile, f in figures.items()
    ]
    write_result(
        "upscale",
        rows,
        f"ESRGAN x4 (23 blocks, random weights), {SIZE}x{SIZE} -> {4 * SIZE}x{4 * SIZE}, 2 threads.",
    )
    plots.lines(
        RESULTS / "upscale.png",
        "ESRGAN x4 throughput against tile_size",
        {"output MP/s": (list(figures), [f["out_mp"] / f["upscale_s"] for f in figures.values()])},
        "tile_size",
        "output megapixels / s",
    )

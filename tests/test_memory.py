"""Loading and unloading does not leak: RSS stays within a stated bound."""

from __future__ import annotations

import gc
from pathlib import Path

import psutil

import sfumato

from .helpers import SIZE, run

LOAD_CYCLES = 20
# Stated bound: after a warm-up cycle, 20 load/generate/unload cycles of a 1 GB
# model may grow the process by at most 128 MiB. What growth there is comes in
# steps on the cycles that generate and levels off (glibc keeps the arenas of
# the job threads): measured 102 -> 171 MiB over 30 cycles, flat after the 20th.
# Keeping the weights of even one cycle would add 1 GB.
RSS_GROWTH_BOUND = 128 * 2**20


def test_load_unload_cycles_keep_rss_bounded(sd1_tiny_gguf: Path) -> None:
    process = psutil.Process()
    samples = []
    for cycle in range(LOAD_CYCLES + 1):
        model_id = sfumato.load_model(sd1_tiny_gguf, model_config={"threads": 2})
        if cycle % 5 == 0:
            outputs, _, _ = run(model_id, steps=1, width=SIZE, height=SIZE)
            assert len(outputs) == 1
        sfumato.unload_model(model_id)
        gc.collect()
        samples.append(process.memory_info().rss)
    growth = max(samples[1:]) - samples[0]
    mib = [s / 2**20 for s in samples]
    print(f"RSS after warm-up cycle {mib[0]:.0f} MiB, growth over {LOAD_CYCLES} cycles {growth / 2**20:.1f} MiB")
    assert growth < RSS_GROWTH_BOUND, [s // 2**20 for s in samples]

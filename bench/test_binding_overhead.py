"""Binding overhead: one generation (SD 1.x layout, f16 GGUF) run three ways on
the same weights, parameters and seed:

- ``sfumato.engine``, sfumato's cffi binding, in its caller's process;
- the SDK, whose model lives in a worker process (job, ticks and PNGs cross a pipe);
- ``stable-diffusion-cpp-python``'s own Python API (ctypes), which drives the
  same engine library.

Each way runs in a process of its own (``bench/binding_way.py``), so that no
way shares a heap or threads with another's model, and each ends with PNG
bytes, as the SDK does. The ways take turns, round after round in a rotating
order, so that the noise of a shared machine falls on all alike. A small image
makes the fixed cost of each call a larger share of its time, which is what
this case looks for. Target: sfumato's ways within 1% of the fastest.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

from pytest_benchmark.fixture import BenchmarkFixture

from .binding_way import WAYS
from .conftest import QUICK, ROOT, fmt, write_result

SIZE, STEPS, SEED, THREADS = (64, 1, 7, 2) if QUICK else (128, 4, 7, 2)
ROUNDS = 2 if QUICK else 10
PROMPT = "a lighthouse at dusk"
TARGET = 1.01


class _Way:
    """A child process that runs one way on demand."""

    def __init__(self, way: str, model: Path) -> None:
        config = {
            "way": way, "model": str(model), "prompt": PROMPT,
            "size": SIZE, "steps": STEPS, "seed": SEED, "threads": THREADS,
        }  # fmt: skip
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.binding_way", json.dumps(config)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.pixels = self._answer("READY")

    def _answer(self, tag: str) -> str:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith(f"{tag} "):
                return line.split()[1]
        raise RuntimeError(f"binding way ended ({self.process.wait()}) before answering {tag}")

    def run(self) -> float:
        assert self.process.stdin is not None
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        return float(self._answer("TIME"))

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(timeout=120)


def test_binding_overhead(benchmark: BenchmarkFixture, sd1_gguf: Path) -> None:
    # One at a time, so that no load overlaps another way's warm-up.
    ways: dict[str, _Way] = {}
    try:
        for name in WAYS:
            ways[name] = _Way(name, sd1_gguf)
        # Same work every way: the same pixels.
        assert len({way.pixels for way in ways.values()}) == 1, {n: w.pixels for n, w in ways.items()}
        times: dict[str, list[float]] = {name: [] for name in WAYS}
        rounds = iter(range(ROUNDS))

        def one_round() -> None:
            shift = next(rounds) % len(WAYS)
            for name in WAYS[shift:] + WAYS[:shift]:
                times[name].append(ways[name].run())

        benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    finally:
        for way in ways.values():
            way.close()

    median = {name: statistics.median(t) for name, t in times.items()}
    best = {name: min(t) for name, t in times.items()}
    benchmark.extra_info.update({name: [round(t, 3) for t in ts] for name, ts in times.items()})
    rows: list[dict[str, object]] = [
        {
            "way": name,
            "median s": fmt(median[name], 3),
            "best s": fmt(best[name], 3),
            "/ fastest (median)": fmt(median[name] / min(median.values()), 4),
            "/ fastest (best)": fmt(best[name] / min(best.values()), 4),
            "runs": len(times[name]),
        }
        for name in WAYS
    ]
    write_result(
        "binding_overhead",
        rows,
        f"Binding overhead: SD 1.x layout (f16 GGUF), {SIZE}x{SIZE}, {STEPS} steps, {THREADS} threads, "
        f"{ROUNDS} rounds taken in turn, each way in its own process and ending with PNG bytes "
        f"(target: sfumato <= {TARGET} x the fastest).",
    )
    for row in rows:
        print(row)

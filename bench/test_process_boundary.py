"""The cost of the process boundary.

One small generation (SD 1.x layout, 256x256, 2 steps) run two ways on the
same weights, parameters and seed: in this process through ``sfumato.engine``
(plus the PNG encoding the SDK also does), and through the SDK, whose model
lives in a worker process (job, ticks and PNGs cross a pipe). The two run
interleaved, round after round, and alternate which goes first, so that the
noise of a shared machine falls on both alike. The target: the worker path
takes at most 2% more wall time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

from pytest_benchmark.fixture import BenchmarkFixture

import sfumato
from sfumato.engine.context import ContextParams, DiffusionContext, ImageRequest
from sfumato.images import encode_png

from .conftest import write_result

SIZE, STEPS, SEED, THREADS, ROUNDS = 256, 2, 7, 2, 4
PROMPT = "a lighthouse at dusk"
TARGET = 1.02


def test_worker_against_in_process(benchmark: BenchmarkFixture, sd1_gguf: Path) -> None:
    request = ImageRequest(prompt=PROMPT, width=SIZE, height=SIZE, steps=STEPS, seed=SEED)
    model_id = sfumato.load_model(sd1_gguf, model_config={"threads": THREADS})
    context = DiffusionContext(ContextParams(model_path=str(sd1_gguf), n_threads=THREADS))

    def in_process() -> list[bytes]:
        return [encode_png(image) for image in context.generate(request).images]

    def through_worker() -> list[bytes]:
        result = sfumato.diffusion(model_id, prompt=PROMPT, width=SIZE, height=SIZE, steps=STEPS, seed=SEED)
        return result.outputs.result()

    try:
        # Same work both ways: the same parameters give the same bytes.
        assert in_process() == through_worker()
        ways: dict[str, Callable[[], list[bytes]]] = {"in-process": in_process, "worker": through_worker}
        times: dict[str, list[float]] = {name: [] for name in ways}
        rounds = iter(range(ROUNDS))

        def one_round() -> None:
            order = list(ways) if next(rounds) % 2 == 0 else list(reversed(ways))
            for name in order:
                started = time.perf_counter()
                ways[name]()
                times[name].append(time.perf_counter() - started)

        benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    finally:
        context.close()
        sfumato.unload_model(model_id)

    median = {name: statistics.median(t) for name, t in times.items()}
    best = {name: min(t) for name, t in times.items()}
    ratio_median = median["worker"] / median["in-process"]
    ratio_best = best["worker"] / best["in-process"]
    benchmark.extra_info.update(
        {f"{name}_s": [round(t, 3) for t in ts] for name, ts in times.items()}
        | {"ratio_median": ratio_median, "ratio_best": ratio_best}
    )
    rows: list[dict[str, object]] = [
        {"path": name, "median s": f"{median[name]:.2f}", "best s": f"{best[name]:.2f}", "runs": len(times[name])}
        for name in ways
    ]
    ratios = {"median s": f"{ratio_median:.4f}", "best s": f"{ratio_best:.4f}"}
    rows.append({"path": "worker / in-process", **ratios, "runs": ""})
    write_result(
        "process_boundary",
        rows,
        f"Process boundary: SD 1.x layout, {SIZE}x{SIZE}, {STEPS} steps, {THREADS} threads, "
        f"{ROUNDS} interleaved rounds (target: worker / in-process <= {TARGET}).",
    )
    print(f"\nworker / in-process wall time: median {ratio_median:.4f}, best {ratio_best:.4f} (target <= {TARGET})")

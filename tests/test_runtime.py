"""Worker processes on the real engine: cancel, crash isolation and restart,
FIFO concurrency, parallel models, residency, timeouts, device choice."""

from __future__ import annotations

import dataclasses
import gc
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest

import sfumato
from sfumato import errors

from .helpers import SIZE, run

LONG_STEPS = 200  # about a minute at test size: every job below is stopped long before


def _status(model_id: str) -> sfumato.ModelStatus:
    return next(s for s in sfumato.models_info() if s.model_id == model_id)


def _long(model_id: str, **params: object) -> sfumato.DiffusionResult:
    return sfumato.diffusion(model_id, prompt="long", width=SIZE, height=SIZE, steps=LONG_STEPS, seed=1, **params)  # type: ignore[arg-type]


def _running(result: sfumato.DiffusionResult, ticks: int = 1) -> list[sfumato.ProgressTick]:
    """Wait until ``result`` has sent ``ticks`` ticks; return them."""
    seen = []
    for tick in result.progress_stream:
        seen.append(tick)
        if len(seen) == ticks:
            return seen
    raise AssertionError(f"the job ended after {len(seen)} ticks: {result.state}")


def _unload_all(model_id: str) -> None:
    while model_id in sfumato.loaded_models():
        sfumato.unload_model(model_id)


@pytest.fixture
def sd1_worker(sd1_tiny_gguf: Path) -> Iterator[str]:
    """An SD 1.x model of its own, for tests that cancel its jobs or kill its worker."""
    model_id = sfumato.load_model(sd1_tiny_gguf, model_config={"threads": 2})
    yield model_id
    _unload_all(model_id)


# -- cancellation ------------------------------------------------------------


def test_cancel_stops_a_running_job_within_a_step_and_the_model_stays_loaded(sd1_worker: str) -> None:
    before = run(sd1_worker, steps=2, seed=5)[0]
    old = _status(sd1_worker)  # (the suite may have loaded this model before, and restarted it)
    result = _long(sd1_worker)
    first, second = _running(result, ticks=2)
    step_s = (second.elapsed_ms - first.elapsed_ms) / 1000.0
    asked = time.perf_counter()
    assert result.cancel() is True
    took = time.perf_counter() - asked
    print(f"cancel took {took * 1000:.0f} ms; a sampling step takes {step_s * 1000:.0f} ms")
    assert took <= max(step_s, 2.0)
    assert result.state == "cancelled"
    with pytest.raises(errors.JobCancelledError) as caught:
        result.outputs.result()
    assert caught.value.reason == "cancelled" and caught.value.outputs == []
    with pytest.raises(errors.JobCancelledError):
        result.stats.result()
    assert len(list(result.progress_stream)) < LONG_STEPS  # the stream ended early
    assert result.cancel() is False  # nothing left to stop
    # The next job runs in the same worker, on the model it kept (the engine stopped
    # within one graph operation), and computes exactly what it did before.
    assert run(sd1_worker, steps=2, seed=5)[0] == before
    status = _status(sd1_worker)
    assert status.pid == old.pid and status.restarts == old.restarts


def test_a_cancel_the_engine_cannot_take_ends_the_worker(sd1_worker: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the worker cannot stop a job itself (a GPU backend), the cancel kills it and
    the model is loaded again in a fresh worker; so does a cancel the engine does not
    take in time (the same kill, on a timer)."""
    from sfumato.api import _pool

    before = run(sd1_worker, steps=2, seed=5)[0]
    host = _pool.get(sd1_worker)
    worker = host._worker
    assert worker is not None and worker.ready is not None and worker.ready.soft_cancel  # sfumato's CPU build
    monkeypatch.setattr(worker, "ready", dataclasses.replace(worker.ready, soft_cancel=False))
    old = _status(sd1_worker)
    result = _long(sd1_worker)
    _running(result)
    assert result.cancel() is True and result.state == "cancelled"
    assert run(sd1_worker, steps=2, seed=5)[0] == before
    status = _status(sd1_worker)
    assert status.pid != old.pid and status.restarts == old.restarts + 1


def test_a_cancelled_batch_keeps_the_images_it_finished(sd1_worker: str) -> None:
    result = sfumato.diffusion(sd1_worker, prompt="a cube", width=SIZE, height=SIZE, steps=2, seed=30, batch_count=3)
    deadline = time.monotonic() + 120
    while not result.partial_outputs and time.monotonic() < deadline:
        time.sleep(0.02)
    assert result.cancel() is True
    with pytest.raises(errors.JobCancelledError) as caught:
        result.outputs.result()
    kept = caught.value.outputs
    assert 1 <= len(kept) < 3 and kept == result.partial_outputs
    # Each kept image is the one a single call with its seed makes.
    for i, png in enumerate(kept):
        assert run(sd1_worker, prompt="a cube", steps=2, seed=30 + i)[0] == [png]


def test_cancel_of_a_queued_job_and_cancel_by_model_id(sd1_worker: str) -> None:
    running = _long(sd1_worker)
    queued = sfumato.diffusion(sd1_worker, prompt="queued", width=SIZE, height=SIZE, steps=1, seed=2)
    dropped = sfumato.diffusion(sd1_worker, prompt="dropped", width=SIZE, height=SIZE, steps=1, seed=3)
    _running(running)
    assert dropped.cancel() is True and dropped.state == "cancelled"
    assert list(dropped.progress_stream) == []
    assert sfumato.cancel(sd1_worker) == 1  # only the running job
    with pytest.raises(errors.JobCancelledError, match="cancelled"):
        running.outputs.result()
    assert len(queued.outputs.result()) == 1  # the queued job ran after the cancel
    assert sfumato.cancel(sd1_worker) == 0
    first, second = _long(sd1_worker), _long(sd1_worker)
    _running(first)
    assert sfumato.cancel(sd1_worker, queued=True) == 2
    assert (first.state, second.state) == ("cancelled", "cancelled")


def test_timeout_ends_the_job_as_cancelled_with_reason_timeout(sd1_worker: str) -> None:
    result = _long(sd1_worker, timeout=1.5)
    with pytest.raises(errors.JobCancelledError, match=r"\(timeout\)") as caught:
        result.outputs.result(timeout=60)
    assert caught.value.reason == "timeout" and result.state == "cancelled"
    assert len(run(sd1_worker, steps=1, timeout=120)[0]) == 1
    for bad in (0, -1, "5", True):
        with pytest.raises(errors.InvalidParameterError, match="timeout: must be a positive number"):
            sfumato.diffusion(sd1_worker, prompt="x", timeout=bad)  # type: ignore[arg-type]


CANCEL_CYCLES = 20
# Stated bounds: over 20 cancels the SDK process may grow by at most 64 MiB, and the
# worker, which keeps its model through every cancel, by at most 128 MiB (a 1 GB model:
# a graph's buffers leaked at each stopped job would show).
PARENT_GROWTH_BOUND = 64 * 2**20
WORKER_GROWTH_BOUND = 128 * 2**20


def test_twenty_cancels_keep_memory_bounded(sd1_worker: str) -> None:
    parent = psutil.Process()
    old = _status(sd1_worker)
    worker = psutil.Process(old.pid)
    worker_rss, parent_rss, next_step_s = [], [], []
    for _ in range(CANCEL_CYCLES + 1):
        result = _long(sd1_worker)
        _running(result)
        asked = time.perf_counter()
        assert result.cancel()
        following = _long(sd1_worker)
        _running(following)  # the next job's first step: no reload in between
        next_step_s.append(time.perf_counter() - asked)
        assert following.cancel()
        gc.collect()
        parent_rss.append(parent.memory_info().rss)
        worker_rss.append(worker.memory_info().rss)
    growth = max(parent_rss[1:]) - parent_rss[0]
    worker_growth = max(worker_rss[1:]) - worker_rss[0]
    print(
        f"parent RSS {parent_rss[0] / 2**20:.0f} MiB, growth over {CANCEL_CYCLES} cancels {growth / 2**20:.1f} MiB; "
        f"worker RSS {min(worker_rss) / 2**20:.0f}..{max(worker_rss) / 2**20:.0f} MiB; "
        f"cancel to the next job's first step: median {sorted(next_step_s)[len(next_step_s) // 2]:.2f} s"
    )
    assert growth < PARENT_GROWTH_BOUND, [r // 2**20 for r in parent_rss]
    assert worker_growth < WORKER_GROWTH_BOUND, [r // 2**20 for r in worker_rss]
    status = _status(sd1_worker)
    assert status.restarts == old.restarts and status.pid == worker.pid


# -- crash isolation -----------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSEGV, signal.SIGABRT])
def test_a_dying_worker_fails_only_its_job(
    sd1_worker: str, upscaler_model: str, gradient_image: np.ndarray, sig: signal.Signals
) -> None:
    expected = run(sd1_worker, steps=2, seed=8)[0]
    other_pid = _status(upscaler_model).pid
    victim = _long(sd1_worker)
    queued = sfumato.diffusion(sd1_worker, prompt="a red cube", width=SIZE, height=SIZE, steps=2, seed=8)
    _running(victim)
    os.kill(_status(sd1_worker).pid or 0, sig)
    with pytest.raises(errors.EngineCrashedError) as caught:
        victim.outputs.result(timeout=60)
    assert caught.value.model_id == sd1_worker and caught.value.signal == sig.name
    assert sd1_worker in str(caught.value) and sig.name in str(caught.value)
    assert victim.state == "failed"
    assert queued.outputs.result(timeout=120) == expected  # ran on the restarted worker
    # The other model's worker was never touched, and still works.
    assert _status(upscaler_model).pid == other_pid
    assert len(sfumato.upscale(upscaler_model, image=gradient_image).outputs.result()) == 1


def test_a_worker_that_died_idle_is_replaced_before_the_next_job(sd1_worker: str) -> None:
    old = _status(sd1_worker).pid
    assert old is not None
    os.kill(old, signal.SIGKILL)
    assert len(run(sd1_worker, steps=1)[0]) == 1
    assert _status(sd1_worker).pid != old


# -- concurrency ---------------------------------------------------------------


def test_concurrent_callers_queue_fifo_and_see_only_their_own_ticks(sd1_worker: str) -> None:
    steps = [3, 1, 2]
    arrivals: list[list[tuple[float, sfumato.ProgressTick]]] = [[] for _ in steps]
    results = []
    for n in steps:
        results.append(sfumato.diffusion(sd1_worker, prompt="x", width=SIZE, height=SIZE, steps=n, seed=n))

    def consume(i: int) -> None:
        for tick in results[i].progress_stream:
            arrivals[i].append((time.perf_counter(), tick))

    readers = [threading.Thread(target=consume, args=(i,)) for i in range(len(steps))]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(120)
    for i, n in enumerate(steps):
        sampling = [(t.step, t.total_steps) for _, t in arrivals[i] if t.phase == "sampling"]
        assert sampling == [(s, n) for s in range(1, n + 1)]  # its own steps, none of the others'
        assert [t.phase for _, t in arrivals[i]][-1] == "vae"
    for before, after in itertools.pairwise(arrivals):
        assert before[-1][0] < after[0][0]  # first in, first out, never interleaved
    # Each caller got the image its own parameters make.
    assert results[1].outputs.result() == run(sd1_worker, steps=1, seed=1, prompt="x")[0]


def test_two_models_run_in_parallel(sd1_worker: str, upscaler_model: str, gradient_image: np.ndarray) -> None:
    long = _long(sd1_worker)
    _running(long)
    short = sfumato.upscale(upscaler_model, image=gradient_image)
    assert len(short.outputs.result(timeout=60)) == 1
    assert long.state == "running"  # the upscale did not wait for the other model's job
    assert long.cancel()


# -- residency -------------------------------------------------------------------


def test_loading_the_same_source_twice_shares_one_worker(esrgan_1b: Path, gradient_image: np.ndarray) -> None:
    config = {"mode": "upscale", "threads": 2, "upscaler": {"model_src": str(esrgan_1b), "tile_size": 96}}
    first = sfumato.load_model(esrgan_1b, model_config=config)
    second = sfumato.load_model(esrgan_1b, model_config=config)
    assert first == second
    status = _status(first)
    assert status.references == 2 and status.resident
    sfumato.unload_model(first)
    assert first in sfumato.loaded_models() and _status(first).pid == status.pid
    assert len(sfumato.upscale(first, image=gradient_image).outputs.result()) == 1
    sfumato.unload_model(first)
    assert first not in sfumato.loaded_models()
    assert not psutil.pid_exists(status.pid or 0) or psutil.Process(status.pid).status() == psutil.STATUS_ZOMBIE
    with pytest.raises(errors.UnknownModelIdError):
        sfumato.unload_model(first)


@pytest.fixture
def budget() -> Iterator[None]:
    yield
    sfumato.set_memory_budget()


def _esrgan(path: Path, tile: int) -> str:
    """A standalone ESRGAN; distinct tile sizes make distinct models of one file."""
    upscaler = {"model_src": str(path), "tile_size": tile}
    return sfumato.load_model(path, model_config={"mode": "upscale", "threads": 2, "upscaler": upscaler})


@pytest.mark.usefixtures("budget")
def test_a_model_count_budget_evicts_the_least_recently_used_idle_model(
    esrgan_1b: Path, esrgan_6b: Path, gradient_image: np.ndarray
) -> None:
    loaded = []
    try:
        sfumato.set_memory_budget(max_loaded_models=2)
        a = _esrgan(esrgan_1b, 64)
        b = _esrgan(esrgan_6b, 64)
        loaded += [a, b]
        assert len(sfumato.upscale(a, image=gradient_image).outputs.result()) == 1  # b is now the least recent
        c = _esrgan(esrgan_1b, 80)
        loaded.append(c)
        resident = {m: _status(m).resident for m in (a, b, c)}
        assert resident == {a: True, b: False, c: True}
        assert sum(s.resident for s in sfumato.models_info()) <= 2
        # An evicted model keeps its id, and its next job loads it again (evicting a, now the least recent).
        assert len(sfumato.upscale(b, image=gradient_image).outputs.result()) == 1
        assert {m: _status(m).resident for m in (a, b, c)} == {a: False, b: True, c: True}
    finally:
        for model_id in loaded:
            _unload_all(model_id)


@pytest.mark.usefixtures("budget")
def test_a_byte_budget_never_evicts_a_busy_model(sd1_worker: str, esrgan_1b: Path) -> None:
    long = _long(sd1_worker)
    _running(long)
    # Room for the ESRGAN alone, not beside the busy model: the load is refused, by name.
    sfumato.set_memory_budget(max_loaded_bytes=esrgan_1b.stat().st_size + 1)
    try:
        with pytest.raises(errors.InsufficientMemoryError, match=rf"busy model\(s\) hold .*{sd1_worker}"):
            _esrgan(esrgan_1b, 72)
        assert _status(sd1_worker).resident and long.state == "running"
    finally:
        sfumato.set_memory_budget()
        long.cancel()


def test_budget_values_are_checked() -> None:
    with pytest.raises(errors.InvalidParameterError, match="max_loaded_models"):
        sfumato.set_memory_budget(max_loaded_models=0)


_HOLDER = """
import os, signal, sys
import sfumato
model_id = sfumato.load_model(sys.argv[1], model_config={"threads": 2})
result = sfumato.diffusion(model_id, prompt="x", width=64, height=64, steps=500)
next(iter(result.progress_stream))
print(sfumato.models_info()[0].pid, flush=True)
if sys.argv[2] == "killed":
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("end", ["exits", "killed"])
def test_no_worker_outlives_its_sdk_process(sd1_tiny_gguf: Path, end: str) -> None:
    holder = subprocess.run(
        [sys.executable, "-c", _HOLDER, str(sd1_tiny_gguf), end],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    worker_pid = int(holder.stdout.split()[-1])
    deadline = time.monotonic() + 15
    while psutil.pid_exists(worker_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not psutil.pid_exists(worker_pid), f"worker {worker_pid} still runs after its SDK process {end}"

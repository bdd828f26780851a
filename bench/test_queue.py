"""The job queue's own cost and what workers on one store give:

- claims: jobs claimed and ended per second, and each claim's latency (p50, p99),
  by 1, 8 and 32 workers' connections on PostgreSQL (a server the benchmark starts
  from Debian's binaries), and by one on SQLite; no engine, each configuration in
  its own process (``bench/probe.py``, kind ``queue``);
- cancel to next job: from a front end's ``DELETE /queue/{id}`` to the worker's
  claim of the next job, over the time of one sampling step (``sfumato worker``
  and ``sfumato serve --workers 0`` processes, the suite's tiny SD 1.x model);
- two CPU workers (``--threads 1`` each), and one worker running two jobs at once
  (``--jobs-per-device 2``, ``--threads 1``), against one worker running one job at a
  time (``--threads 2``): the time to run the same jobs (two models, in turn).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from pytest_benchmark.fixture import BenchmarkFixture
from tests.helpers import MODEL
from tests.support import models
from tests.support.farm import LONG, Farm, ended, live_workers, running, status, submit, until
from tests.support.postgres import PostgresServer

from .conftest import QUICK, Probe, _model_dir, fmt, write_result

JOBS = 200 if QUICK else 2000
CONNECTIONS = (1, 8, 32)
REPEATS = 2 if QUICK else 5
BATCH_JOBS = 4 if QUICK else 8


def _tiny_model() -> Path:
    return models.cached(_model_dir(), "sd1-tiny.gguf", lambda p: models.write_sd_checkpoint(p, "sd1-tiny"))


def _farm(postgres: PostgresServer, root: Path) -> Farm:
    root.mkdir(parents=True)
    return Farm(postgres.new_database(), root, _tiny_model(), [])


def _cancel_to_next(farm: Farm) -> tuple[float, float]:
    """The median seconds from a cancel to the next job's claim, and one step's seconds."""
    worker = farm.worker("w1", threads=2)
    _, api = farm.front_end("api")
    until(lambda: live_workers(api, 1), "the worker registered", worker)
    per_steps = {}
    for steps in (2, 8):
        job = submit(api, steps=steps, seed=steps)
        per_steps[steps] = until(lambda job=job: ended(api, job), "a timing job")["generation_time_sec"]
    step_s = (per_steps[8] - per_steps[2]) / 6
    gaps = []
    for i in range(REPEATS):
        long, after = submit(api, steps=LONG, seed=40 + i), submit(api, steps=2, seed=60 + i)
        until(lambda long=long: running(api, long), "the long job started")
        cancelled_at = time.time()
        assert api.delete(f"/queue/{long}").status_code == 200
        started = until(lambda after=after: farm.row(after)["started"], "the next job was claimed")
        gaps.append(started - cancelled_at)
        until(lambda after=after: ended(api, after), "the next job ended")
    return statistics.median(gaps), step_s


def _batch_time(farm: Farm, workers: int, jobs_per_device: int = 1) -> float:
    """Seconds from the first job's acceptance to the last one's end, ``BATCH_JOBS`` jobs
    (half of them on a second name of the model, so that two jobs can run at once)."""
    threads = 2 // (workers * jobs_per_device)
    models = (MODEL, "second")
    started = [
        farm.worker(f"w{i}", models, None, threads, "--jobs-per-device", str(jobs_per_device)) for i in range(workers)
    ]
    _, api = farm.front_end("api")
    until(lambda: live_workers(api, workers), "the workers registered", *started)
    ids = [submit(api, steps=4, seed=i, model=models[i % 2]) for i in range(BATCH_JOBS)]
    for job in ids:
        assert until(lambda job=job: ended(api, job), "a batch job")["state"] == "done"
    rows = [farm.row(job) for job in ids]
    assert all(status(api, job)["state"] == "done" for job in ids)
    return max(r["finished"] for r in rows) - min(r["created"] for r in rows)


def test_queue(benchmark: BenchmarkFixture, probe: Probe, tmp_path: Path) -> None:
    postgres = PostgresServer()
    figures: dict[str, dict[str, float]] = {}
    try:
        postgres.start()

        def measure_all() -> None:
            for connections in CONNECTIONS:
                figures[f"PostgreSQL, {connections} connection(s)"] = probe(
                    kind="queue", store=postgres.new_database(), folder=str(tmp_path), connections=connections,
                    jobs=JOBS,
                )  # fmt: skip
            folder = tmp_path / "sqlite"
            folder.mkdir()
            figures["SQLite, 1 connection"] = probe(
                kind="queue", store=None, folder=str(folder), connections=1, jobs=JOBS
            )
            farm = _farm(postgres, tmp_path / "cancel")
            try:
                figures["cancel"] = dict(zip(("gap_s", "step_s"), _cancel_to_next(farm), strict=True))
            finally:
                farm.stop()
            for workers, jobs in ((1, 1), (2, 1), (1, 2)):
                farm = _farm(postgres, tmp_path / f"batch-{workers}-{jobs}")
                try:
                    figures[f"batch {workers} {jobs}"] = {"seconds": _batch_time(farm, workers, jobs)}
                finally:
                    farm.stop()

        benchmark.pedantic(measure_all, rounds=1, iterations=1)
    finally:
        postgres.remove()
    one = figures[f"PostgreSQL, {CONNECTIONS[0]} connection(s)"]["jobs_per_s"]
    rows: list[dict[str, object]] = [
        {"what": name, "figure": f"{fmt(f['jobs_per_s'], 0)} jobs/s", "ratio": f"{fmt(f['jobs_per_s'] / one)}x",
         "detail": f"claim p50 {fmt(f['claim_p50_ms'])} ms, p99 {fmt(f['claim_p99_ms'])} ms"}
        for name, f in figures.items() if "jobs_per_s" in f
    ]  # fmt: skip
    cancel = figures["cancel"]
    rows.append({"what": "cancel to next job's claim", "figure": f"{fmt(cancel['gap_s'], 3)} s",
                 "ratio": f"{fmt(cancel['gap_s'] / cancel['step_s'])} steps",
                 "detail": f"one step {fmt(cancel['step_s'], 3)} s; median of {REPEATS}"})  # fmt: skip
    one_worker = figures["batch 1 1"]["seconds"]
    for key, what in (
        ("batch 2 1", "two workers x 1 thread"),
        ("batch 1 2", "one worker, 2 jobs per device x 1 thread"),
    ):
        seconds = figures[key]["seconds"]
        rows.append({"what": f"{BATCH_JOBS} jobs, {what}", "figure": f"{fmt(seconds)} s",
                     "ratio": f"{fmt(one_worker / seconds)}x the speed of one",
                     "detail": f"one worker, 1 job at a time x 2 threads: {fmt(one_worker)} s"})  # fmt: skip
    write_result(
        "queue", rows,
        f"The job queue: {JOBS} jobs claimed and ended (with a 1 KB image each) per configuration, each in its own "
        "process; the ratio is over one PostgreSQL connection. Then sfumato worker and serve --workers 0 processes "
        "on the tiny SD 1.x model (64x64).",
    )  # fmt: skip
    assert cancel["gap_s"] > 0 and all(f["seconds"] > 0 for k, f in figures.items() if k.startswith("batch"))

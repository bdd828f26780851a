"""What following jobs costs the database: PostgreSQL's statements per second while 50
clients follow a running job's progress (``GET /queue/{id}/events``) through a front end
(``sfumato serve --workers 0``) and a ``sfumato worker`` runs it, on the tiny SD 1.x model.

Three configurations, each a front end process of its own: no follower (what the worker's
own writes and the registrations cost), 50 followers looking every 0.1 s (how sfumato
followed jobs before: ``SFUMATO_FOLLOW_POLL_S=0.1``), and 50 followers woken by the
store's notifications (the default). The figure is the database's committed transactions
per second (``pg_stat_database.xact_commit``; sfumato's statements each commit).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import psycopg
from pytest_benchmark.fixture import BenchmarkFixture
from tests.helpers import MODEL
from tests.support import models
from tests.support.farm import Farm, live_workers, running, submit, until
from tests.support.postgres import PostgresServer

from .conftest import QUICK, _model_dir, fmt, write_result

FOLLOWERS = 50
WINDOW_S = 5.0 if QUICK else 15.0
SIDE = 128
STEPS = 150  # the server's most: the job runs past the window


def _commits(url: str) -> int:
    with psycopg.connect(url) as conn:
        conn.execute("SELECT pg_stat_force_next_flush()")
        row = conn.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()").fetchone()
    assert row is not None
    return int(row[0])


def _follow(base_url: str, job_id: str, stop: threading.Event, events: list[int]) -> None:
    with (
        httpx.Client(base_url=base_url, timeout=120) as client,
        client.stream("GET", f"/queue/{job_id}/events") as stream,
    ):
        for line in stream.iter_lines():
            if line.startswith("event:"):
                events.append(1)
            if stop.is_set():
                return


def _statements_per_s(farm: Farm, followers: int, poll: str | None) -> dict[str, float]:
    """The database's commits per second over the window, and the job's steps per second."""
    worker = farm.worker("w1", (MODEL,), None, 2)
    _, api = farm.front_end("api", env={"SFUMATO_FOLLOW_POLL_S": poll} if poll else None)
    until(lambda: live_workers(api, 1), "the worker registered", worker)
    job_id = submit(api, steps=STEPS, width=SIDE, height=SIDE, seed=1)
    until(lambda: running(api, job_id), "the job started", worker)
    stop, events = threading.Event(), list[int]()
    threads = [
        threading.Thread(target=_follow, args=(str(api.base_url), job_id, stop, events), daemon=True)
        for _ in range(followers)
    ]
    for thread in threads:
        thread.start()
    time.sleep(2.0)  # every follower connected
    step_before, commits_before, started = farm.row(job_id)["step"], _commits(farm.url), time.monotonic()
    time.sleep(WINDOW_S)
    commits_after, step_after, elapsed = _commits(farm.url), farm.row(job_id)["step"], time.monotonic() - started
    assert farm.row(job_id)["state"] == "processing", "the job ended inside the window: make it longer"
    stop.set()
    api.delete(f"/queue/{job_id}")
    for thread in threads:
        thread.join(30)
    return {
        "commits_per_s": (commits_after - commits_before) / elapsed,
        "steps_per_s": (step_after - step_before) / elapsed,
        "events": float(len(events)),
    }


CONFIGURATIONS = {
    "no follower": (0, None),
    f"{FOLLOWERS} followers, looking every 0.1 s (before)": (FOLLOWERS, "0.1"),
    f"{FOLLOWERS} followers, woken by notifications": (FOLLOWERS, None),
}


def test_followers(benchmark: BenchmarkFixture, tmp_path: Path) -> None:
    model = models.cached(_model_dir(), "sd1-tiny.gguf", lambda p: models.write_sd_checkpoint(p, "sd1-tiny"))
    postgres = PostgresServer()
    figures: dict[str, dict[str, float]] = {}
    try:
        postgres.start()

        def measure_all() -> None:
            for i, (name, (followers, poll)) in enumerate(CONFIGURATIONS.items()):
                (tmp_path / str(i)).mkdir()
                farm = Farm(postgres.new_database(), tmp_path / str(i), model, [])
                try:
                    figures[name] = _statements_per_s(farm, followers, poll)
                finally:
                    farm.stop()

        benchmark.pedantic(measure_all, rounds=1, iterations=1)
    finally:
        postgres.remove()
    before = figures[f"{FOLLOWERS} followers, looking every 0.1 s (before)"]["commits_per_s"]
    rows: list[dict[str, object]] = [
        {"what": name, "figure": f"{fmt(f['commits_per_s'], 0)} statements/s",
         "ratio": f"{fmt(f['commits_per_s'] / before)}x the polling followers'",
         "detail": f"{fmt(f['steps_per_s'], 1)} sampling steps/s; {int(f['events'])} events sent"}
        for name, f in figures.items()
    ]  # fmt: skip
    write_result(
        "followers", rows,
        f"PostgreSQL's committed statements per second over {fmt(WINDOW_S, 0)} s while a worker runs one "
        f"{SIDE}x{SIDE} job of the tiny SD 1.x model, with its progress followed over SSE through one front end; "
        "each configuration is its own front end process and database.",
    )  # fmt: skip
    woken = figures[f"{FOLLOWERS} followers, woken by notifications"]
    assert woken["events"] > 0 and all(f["steps_per_s"] > 0 for f in figures.values())

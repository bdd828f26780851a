"""The server under stress: a worker crash mid-job, and a load test of 20
concurrent clients on loopback against a real ``sfumato serve`` process."""

from __future__ import annotations

import os
import random
import signal
import statistics
import threading
import time
from collections import Counter
from typing import Any

import httpx
from fastapi.testclient import TestClient

import sfumato
from sfumato.server.settings import ServerSettings

from .helpers import SIZE, job_body, serving, wait_job

CLIENTS, REQUESTS = 20, 200


def test_a_crashing_worker_fails_only_its_job(client: TestClient) -> None:
    crashing = client.post("/txt2img", json=job_body(steps=40, fileType="png")).json()["job_id"]
    waiting = client.post("/txt2img", json=job_body(steps=2, fileType="png")).json()["job_id"]
    wait_job(client, crashing, states=("processing",))
    deadline = time.monotonic() + 120
    while client.get(f"/queue/{crashing}").json()["current_phase"] != "generation":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    (worker,) = [s for s in sfumato.models_info() if s.running]
    os.kill(worker.pid, signal.SIGKILL)
    failed = wait_job(client, crashing)
    assert failed["state"] == "error" and failed["status"] == "error"
    assert "SIGKILL" in failed["error"] or "crashed" in failed["error"], failed["error"]
    assert wait_job(client, waiting)["state"] == "done"  # the queued job ran on the restarted worker
    assert client.get("/hello").json() == {"ok": True}
    again = client.post("/txt2img", json=job_body(steps=1)).json()["job_id"]
    assert wait_job(client, again)["state"] == "done"


def test_load_of_20_clients_mixing_generation_polling_and_cancels(settings: ServerSettings) -> None:
    statuses: Counter[tuple[str, int]] = Counter()
    latencies: dict[str, list[float]] = {"generate": [], "poll": [], "cancel": []}
    accepted: list[str] = []
    lock = threading.Lock()
    failures: list[str] = []

    def client_loop(number: int, url: str) -> None:
        rng = random.Random(number)
        mine: list[str] = []
        with httpx.Client(base_url=url, timeout=120) as http:
            for i in range(REQUESTS // CLIENTS):
                roll = rng.random()
                started = time.perf_counter()
                if not mine or roll < 0.45:
                    kind = "generate"
                    body = {"prompt": f"client {number} job {i}", "width": SIZE, "height": SIZE, "steps": 1,
                            "seed": number * 100 + i, "fileType": "png"}  # fmt: skip
                    response = http.post("/txt2img", json=body)
                    if response.status_code == 200:
                        mine.append(response.json()["job_id"])
                elif roll < 0.8:
                    kind = "poll"
                    response = http.get(f"/queue/{rng.choice(mine)}")
                else:
                    kind = "cancel"
                    response = http.delete(f"/queue/{rng.choice(mine)}")
                elapsed = time.perf_counter() - started
                with lock:
                    statuses[(kind, response.status_code)] += 1
                    latencies[kind].append(elapsed)
                    if response.status_code >= 500 or (
                        response.status_code >= 400 and response.status_code not in (409, 429)
                    ):
                        failures.append(f"{kind} {response.status_code} {response.text[:200]}")
                time.sleep(rng.uniform(0.0, 0.2))
        with lock:
            accepted.extend(mine)

    with serving(settings, "--queue-size", "12") as url:
        began = time.perf_counter()
        threads = [threading.Thread(target=client_loop, args=(n, url)) for n in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        sent = time.perf_counter() - began
        ended: dict[str, dict[str, Any]] = {}
        with httpx.Client(base_url=url, timeout=30) as http:
            deadline = time.monotonic() + 600
            while len(ended) < len(accepted):
                assert time.monotonic() < deadline, f"{len(accepted) - len(ended)} jobs never ended"
                for job_id in accepted:
                    if job_id not in ended:
                        status = http.get(f"/queue/{job_id}").json()
                        if status["state"] in ("done", "cancelled", "error"):
                            ended[job_id] = status
                time.sleep(0.5)
        drained = time.perf_counter() - began
    outcomes = Counter(s["state"] for s in ended.values())

    def spread(values: list[float]) -> str:
        values = sorted(values)
        p95 = values[int(0.95 * (len(values) - 1))]
        return (
            f"median {statistics.median(values) * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, max {values[-1] * 1000:.0f} ms"
        )

    print(
        f"\n{sum(statuses.values())} requests from {CLIENTS} clients in {sent:.1f} s; "
        f"all {len(accepted)} accepted jobs ended after {drained:.1f} s: {dict(outcomes)}\n"
        f"responses: {dict(sorted(statuses.items()))}\n"
        + "\n".join(f"{kind} latency: {spread(values)}" for kind, values in latencies.items() if values)
    )
    assert sum(statuses.values()) == REQUESTS
    assert not failures, failures
    assert statuses[("generate", 200)] > 0 and statuses[("generate", 409)] > 0  # the queue limit was reached
    assert outcomes["done"] > 0
    for status in ended.values():
        assert status["state"] == "done" or status["error"], status  # a reason for every job that did not finish

"""The server under stress: a worker crash mid-job, and a load test of 20
concurrent clients on loopback against a real ``sfumato serve`` process."""

from __future__ import annotations

import os
import signal
import time

from fastapi.testclient import TestClient

import sfumato
from sfumato.server.settings import ServerSettings

from .helpers import job_body, load_test, serving, wait_job


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
    with serving(settings, "--queue-size", "12") as url:
        report = load_test([url])
    print(report.summary())
    report.check()
    assert report.statuses[("generate", 409)] > 0  # the queue limit was reached

"""Many machines, one queue: ``sfumato serve --workers 0`` front ends and ``sfumato worker``
processes on one PostgreSQL the suite starts, each an OS process of its own with its own
folders, on the suite's model. Workers are killed, stopped past their lease and
resumed, front ends killed and replaced, the database restarted, two front ends put
under load; no job is lost and no late result counts.
"""

from __future__ import annotations

import base64
import hashlib
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from sfumato.cli import main
from tests.support.farm import LEASE, LONG, Farm, Process, ended, live_workers, running, status, submit, until
from tests.support.postgres import PostgresServer

from .helpers import MODEL, SIZE, job_body, load_test, pixels, sse_events


def _running_on_one_of_two(farm: Farm, seed: int) -> tuple[list[Process], httpx.Client, str]:
    """Two workers and a front end, and a long job the front end accepted, past its first step."""
    workers = [farm.worker("w1"), farm.worker("w2")]
    _, api = farm.front_end("api")
    until(lambda: live_workers(api, 2), "two workers registered", *workers)
    job_id = submit(api, steps=LONG, seed=seed)
    until(lambda: running(api, job_id), "the job started")
    return workers, api, job_id


def test_a_killed_worker_s_job_finishes_on_the_other_worker(farm: Farm) -> None:
    workers, api, job_id = _running_on_one_of_two(farm, seed=11)
    victim = farm.runner_of(job_id)
    victim.signal(signal.SIGKILL)  # the whole machine's process group
    done = until(lambda: ended(api, job_id), "the job ended on the other worker")
    assert done["state"] == "done", done
    row = farm.row(job_id)
    survivor = next(w for w in workers if w is not victim)
    assert row["attempts"] == 2 and f"-{survivor.pid}-" in row["result"]["worker"] and row["images"] == 1
    assert pixels(base64.b64decode(done["image"])).shape == (SIZE, SIZE, 3)
    assert len(api.get("/workers").json()["workers"]) == 1  # the dead one's registration lapsed


def test_a_worker_stopped_past_its_lease_loses_the_job_and_its_late_result(farm: Farm) -> None:
    _, api, job_id = _running_on_one_of_two(farm, seed=12)
    stopped = farm.runner_of(job_id)
    first_claim = farm.row(job_id)["worker"]
    stopped.signal(signal.SIGSTOP)
    done = until(lambda: ended(api, job_id), "the other worker finished the job")
    assert done["state"] == "done"
    stopped.signal(signal.SIGCONT)  # it wakes up believing it still runs the job
    until(lambda: "no longer this worker's" in stopped.text(), "the resumed worker saw the job is not its", stopped)
    row = farm.row(job_id)
    assert row["state"] == "done" and row["attempts"] == 2 and row["worker"] != first_claim
    assert row["result"]["worker"] == row["worker"] and row["images"] == 1  # the second worker's, alone
    again = submit(api, seed=13)  # and the resumed worker takes jobs again
    assert until(lambda: ended(api, again), "a job after the resume")["state"] == "done"


def test_a_cancel_through_one_front_end_stops_the_job_another_accepted(farm: Farm) -> None:
    worker = farm.worker("w1")
    _, api_a = farm.front_end("api-a")
    _, api_b = farm.front_end("api-b")
    until(lambda: live_workers(api_b, 1), "the worker registered", worker)
    long, after = submit(api_a, steps=LONG, seed=14), submit(api_a, seed=15)
    until(lambda: running(api_b, long), "the long job started")
    cancelled = api_b.delete(f"/queue/{long}")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled", cancelled.text
    # The worker stops it at its next step (the cancel's NOTIFY) and takes the next job.
    assert until(lambda: ended(api_a, after), "the next job ran")["state"] == "done"
    stopped, next_row = farm.row(long), farm.row(after)
    assert stopped["state"] == "cancelled" and stopped["progress"] < 90 and next_row["attempts"] == 1
    assert next_row["started"] < stopped["started"] + LONG * (next_row["finished"] - next_row["started"])
    # A1111's interrupt, through the other front end, from the same client.
    answer: dict[str, Any] = {}
    body = {"prompt": "a harbour", "steps": LONG, "width": SIZE, "height": SIZE, "seed": 16}
    thread = threading.Thread(target=lambda: answer.update(api_a.post("/sdapi/v1/txt2img", json=body).json()))
    thread.start()
    until(lambda: api_b.get("/sdapi/v1/progress").json()["progress"] > 0, "A1111's job showed progress")
    assert api_b.post("/sdapi/v1/interrupt").status_code == 200
    thread.join(60)
    assert not thread.is_alive() and "images" in answer
    assert api_b.get("/sdapi/v1/progress").json()["state"]["job"] == ""


def test_a_killed_front_end_loses_nothing(farm: Farm) -> None:
    worker = farm.worker("w1")
    api, client = farm.front_end("api")
    until(lambda: live_workers(client, 1), "the worker registered", worker)
    ids = [submit(client, steps=LONG if i == 0 else 2, seed=20 + i) for i in range(3)]
    until(lambda: running(client, ids[0]), "the first job started")
    api.signal(signal.SIGKILL)
    _, other = farm.front_end("api-2")  # another machine, another port
    assert all(status(other, job_id)["job_id"] == job_id for job_id in ids)
    events = [body for kind, body in sse_events(other, ids[0]) if kind == "progress"]
    assert events[-1]["state"] == "done" and any(e["state"] == "processing" for e in events)
    for job_id in ids:
        done = until(lambda job_id=job_id: ended(other, job_id), f"job {job_id} ended")
        assert done["state"] == "done" and pixels(base64.b64decode(done["image"])).shape == (SIZE, SIZE, 3)


def test_jobs_go_to_the_workers_that_have_their_model(farm: Farm) -> None:
    both = (MODEL, "other-sd1")
    workers = [farm.worker("w1", (MODEL,)), farm.worker("w2", ("other-sd1",)), farm.worker("empty", ()),
               farm.worker("w3", (), other_file="third-sd1")]  # fmt: skip
    _, api = farm.front_end("api", models=(*both, "third-sd1"))  # checks against its own files
    listed = until(lambda: _hashed(live_workers(api, 4)), "four workers registered with their models' sha256", *workers)
    by_pid = {w["pid"]: w for w in listed}
    assert [by_pid[p.pid]["models"] for p in workers] == [[MODEL], ["other-sd1"], [], ["third-sd1"]]
    assert by_pid[workers[2].pid]["note"].endswith("it takes no job")
    sha = hashlib.sha256(farm.model.read_bytes()).hexdigest()
    assert by_pid[workers[0].pid]["identities"] == {MODEL: sha}
    assert by_pid[workers[3].pid]["identities"]["third-sd1"] != sha
    # w3's third-sd1 is another file than the front end's: refused, not run on the wrong model.
    refused = api.post("/txt2img", json=job_body(model="third-sd1"))
    assert refused.status_code == 503 and "another file" in refused.json()["error"], refused.text
    listed_models = api.get("/sdapi/v1/sd-models").json()
    assert {m["model_name"]: m["sha256"] for m in listed_models}[MODEL] == sha  # hashed once, then known
    ids = {name: [submit(api, model=name, seed=30 + i) for i in range(2)] for name in both}
    for name, worker in zip(both, workers, strict=False):
        for job_id in ids[name]:
            assert until(lambda job_id=job_id: ended(api, job_id), "the job ended")["state"] == "done"
            assert f"-{worker.pid}-" in farm.row(job_id)["result"]["worker"]
    loaded = {by_pid[p.pid]["id"]: p for p in workers}
    now = {w["id"]: w["loaded"] for w in api.get("/workers").json()["workers"]}
    assert [now[i] for i in loaded][:2] == [[MODEL], ["other-sd1"]]
    # A model no live worker serves is refused by name, not queued for ever.
    workers[1].stop()
    until(lambda: live_workers(api, 3), "the stopped worker left the registry")
    refused = api.post("/txt2img", json=job_body(model="other-sd1"))
    assert refused.status_code == 503 and refused.json()["code"] == "no_worker", refused.text
    assert "other-sd1" in refused.json()["error"] and refused.json()["field"] == "model"


def test_live_steps_and_previews_show_through_any_front_end(farm: Farm) -> None:
    worker = farm.worker("w1")
    _, api = farm.front_end("api")
    until(lambda: live_workers(api, 1), "the worker registered", worker)
    job_id = submit(api, steps=8, seed=50, preview=True)
    events = sse_events(api, job_id)
    previews = [body for kind, body in events if kind == "preview"]
    assert previews and all(pixels(base64.b64decode(p["image"])).shape[2] == 3 for p in previews)  # PNGs
    steps = [p["step"] for p in previews]
    assert steps == sorted(steps) and {p["total_steps"] for p in previews} == {8}
    assert events[-1][1]["state"] == "done"
    # A1111's progress, through a front end, of a job on the worker: its step and preview.
    body = {"prompt": "a harbour", "steps": LONG, "width": SIZE, "height": SIZE, "seed": 51}
    thread = threading.Thread(target=lambda: api.post("/sdapi/v1/txt2img", json=body))
    thread.start()
    seen = until(lambda: (p := api.get("/sdapi/v1/progress").json())["state"]["sampling_step"] > 1 and p,
                 "A1111's progress showed a step")  # fmt: skip
    assert seen["state"]["sampling_steps"] == LONG and seen["progress"] > 0
    thread.join(120)


def test_a_worker_and_a_front_end_refuse_what_they_cannot_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = ["--data", str(tmp_path), "--models", str(tmp_path)]
    assert main(["worker", *data]) == 2  # SQLite is one machine's: no worker shares it
    assert "sfumato: error: --store: sfumato worker takes jobs from a PostgreSQL store" in capsys.readouterr().err
    assert main(["worker", "--store", "postgresql://u@/db?host=/nowhere", "--lease", "0", *data]) == 2
    assert "--lease: must be a positive number of seconds, got 0" in capsys.readouterr().err
    assert main(["serve", "--jobs-per-device", "0", *data]) == 2
    assert "--jobs-per-device: must be at least 1, got 0" in capsys.readouterr().err
    assert main(["serve", "--device", "CUDA9", *data]) == 2
    assert "--device: 'CUDA9' is not available; the engine at" in capsys.readouterr().err
    assert main(["serve", "--workers", "0", *data]) == 2
    assert "--workers 0: a front end needs a store that workers share" in capsys.readouterr().err


def test_two_front_ends_under_load(farm: Farm) -> None:
    """20 clients, 200 requests (generations, polls, cancels) through two front ends onto
    two workers: no 5xx, nothing lost, every accepted job ends."""
    workers = [farm.worker("w1"), farm.worker("w2")]
    ends = [farm.front_end(f"api-{i}", "--queue-size", "12") for i in range(2)]
    until(lambda: live_workers(ends[0][1], 2), "two workers registered", *workers)
    report = load_test([str(client.base_url) for _, client in ends])
    print(report.summary())
    report.check()
    assert report.statuses[("generate", 409)] > 0  # the queue limit held across both front ends
    runs = {farm.row(job_id)["result"].get("worker") for job_id, s in report.ended.items() if s["state"] == "done"}
    assert len(runs) == 2  # both workers ran jobs


def test_the_database_restarting_loses_nothing(sd1_tiny_gguf: Path, tmp_path: Path) -> None:
    """``pg_ctl -m immediate stop`` under a running farm, then start: every accepted job
    completes, and the worker and the front end reconnect by themselves."""
    own = PostgresServer()  # its own server, to stop and start
    farm = Farm("", tmp_path, sd1_tiny_gguf, [])
    try:
        own.start()
        farm.url = own.new_database()
        worker = farm.worker("w1")
        _, api = farm.front_end("api")
        until(lambda: live_workers(api, 1), "the worker registered", worker)
        ids = [submit(api, steps=LONG if i == 0 else 2, seed=70 + i) for i in range(3)]
        until(lambda: running(api, ids[0]), "the first job started")
        own.stop("immediate")
        down = api.get(f"/queue/{ids[0]}")
        assert down.status_code == 503 and down.json()["code"] == "store_unavailable", down.text
        time.sleep(LEASE)  # the database stays away for a lease
        own.start()
        for job_id in ids:
            done = until(lambda job_id=job_id: _ended_or_none(api, job_id), f"job {job_id} ended", worker)
            assert done["state"] == "done", done
        assert "cannot be reached" in worker.text()  # it said so, and carried on
        assert submit(api, seed=80) and live_workers(api, 1)
    finally:
        farm.stop()
        own.remove()


def _ended_or_none(client: httpx.Client, job_id: str) -> dict[str, Any] | None:
    """The job once it ended; ``None`` while it runs or while the front end answers 503."""
    response = client.get(f"/queue/{job_id}")
    if response.status_code == 503:
        return None
    return ended(client, job_id)


def _hashed(workers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The workers, once each has registered the sha256 of every model it serves."""
    return workers if all(len(w["identities"]) == len(w["models"]) for w in workers) else []

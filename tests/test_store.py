"""The job store's behaviour, the same on SQLite and on PostgreSQL (a real server the
suite starts, never mocked): accepting under the queue limit across front ends,
claiming each job once, routing by model, leases, attempts and fencing, progress
and ends with their images, recovery, retention, options, schema versions and
migration; and the server on PostgreSQL, across a restart and a database outage.
"""

from __future__ import annotations

import base64
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from fastapi.testclient import TestClient

from sfumato.cli import main
from sfumato.server.app import create_app
from sfumato.server.jobs import open_store
from sfumato.server.jobs.schema import SCHEMA, SCHEMA_VERSION, StoreVersionError
from sfumato.server.jobs.store import (
    CANCELLED,
    CLAIM_DELAY_S,
    DONE,
    ERROR,
    MAX_ATTEMPTS,
    PROCESSING,
    QUEUED,
    JobStore,
    QueueFullError,
    WorkerInfo,
)
from sfumato.server.jobs.store_pg import StoreSpecError
from sfumato.server.jobs.store_sqlite import SqliteJobStore
from sfumato.server.settings import ServerSettings
from tests.support.postgres import PostgresServer

from .helpers import MODEL, SIZE, job_body, pixels, wait_job

Opener = Callable[[int], JobStore]
"""Opens one more store on the test's database (another front end), with a queue limit."""


@pytest.fixture(params=["sqlite", "postgresql"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    url = request.getfixturevalue("postgres").new_database() if request.param == "postgresql" else None
    opened: list[JobStore] = []

    def open_one(max_active: int = 64) -> JobStore:
        opened.append(open_store(url, tmp_path / "jobs.sqlite3", max_active))
        return opened[-1]

    yield open_one
    for store in opened:
        store.close()


def test_jobs_are_accepted_read_and_listed(opener: Opener) -> None:
    store = opener(64)
    before = time.time() - 1
    first = store.add("txt2img", {"payload": {"prompt": "a lighthouse"}, "plan": {"n": 1}})
    second = store.add("comfyui", {"payload": {"prompt": "a harbour"}})
    got = store.get(first.id)
    assert got is not None and (got.kind, got.request, got.state, got.phase) == (
        "txt2img", {"payload": {"prompt": "a lighthouse"}, "plan": {"n": 1}}, QUEUED, QUEUED,
    )  # fmt: skip
    assert store.get("no-such-id") is None
    assert [job.id for job in store.recent(10)] == [second.id, first.id]
    assert store.ids_of_kind("comfyui", since=before) == [second.id] and store.active_count() == 2
    assert store.end(second.id, DONE, result={"output_paths": []})
    assert store.ids_of_kind("comfyui", active=True) == [] and store.ids_of_kind("comfyui") == [second.id]
    assert store.counts_by_state() == {QUEUED: 1, DONE: 1}


def test_the_queue_limit_holds_across_front_ends(opener: Opener) -> None:
    stores = [opener(5), opener(5)]  # two front ends on one database
    accepted: list[str] = []
    refused: list[str] = []

    def submit(store: JobStore) -> None:
        for _ in range(8):
            try:
                accepted.append(store.add("txt2img", {}).id)
            except QueueFullError as exc:
                refused.append(str(exc))

    threads = [threading.Thread(target=submit, args=(store,)) for store in stores for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(accepted) == 5 and len(refused) == 27 and stores[1].active_count() == 5
    assert "the limit is 5" in refused[0]


def test_each_job_is_claimed_once_oldest_first(opener: Opener) -> None:
    stores = [opener(64), opener(64)]
    ids = [stores[0].add("txt2img", {"i": i}).id for i in range(24)]
    first = stores[1].claim("w0")
    assert first is not None and (first.id, first.state, first.worker, first.attempts) == (ids[0], PROCESSING, "w0", 1)
    claimed: list[str] = [first.id]

    def claim(store: JobStore, worker: str) -> None:
        while (job := store.claim(worker)) is not None:
            claimed.append(job.id)

    threads = [threading.Thread(target=claim, args=(store, f"w{i}")) for i, store in enumerate(stores * 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed) == sorted(ids)  # every job once, none twice


def test_progress_ends_and_recovery(opener: Opener) -> None:
    store = opener(64)
    running, waiting, ended = (store.add("txt2img", {"n": i}).id for i in range(3))
    assert store.claim("w1", lease_s=0.2) is not None
    store.progress(waiting, 50.0, "generation")  # not running: nothing changes
    store.progress(running, 42.5, "generation")
    job = store.get(running)
    assert job is not None and (job.progress, job.phase, job.state) == (42.5, "generation", PROCESSING)
    waiting_job = store.get(waiting)
    assert waiting_job is not None and (waiting_job.progress, waiting_job.phase) == (0.0, QUEUED)
    assert store.end(ended, CANCELLED, "cancelled by request") and not store.end(ended, DONE)
    time.sleep(0.3)  # its worker's lease runs out
    assert store.recover() == 1  # the running one, as after a restart
    again = store.get(running)
    assert again is not None and (again.state, again.progress, again.started, again.worker) == (QUEUED, 0.0, None, None)
    final = store.get(ended)
    assert final is not None and (final.state, final.error) == (CANCELLED, "cancelled by request")
    claimed = store.claim("w2")
    assert claimed is not None and (claimed.id, claimed.attempts) == (running, 2)
    assert store.end(running, DONE, result={"width": SIZE}, claim=claimed.claim, images=[b"one", b"two"])
    done = store.get(running)
    assert done is not None and (done.state, done.progress, done.result) == (DONE, 100.0, {"width": SIZE})
    assert store.images(running) == [b"one", b"two"] and store.images(waiting) == []


def test_leases_attempts_and_fencing(opener: Opener) -> None:
    store, other = opener(64), opener(64)  # a worker's connection and a front end's
    job_id = store.add("txt2img", {}).id
    first = store.claim("w1", lease_s=0.3)
    assert first is not None and store.progress(job_id, 10.0, "generation", first.claim)
    assert other.expire() == (0, 0)  # the lease holds
    time.sleep(0.4)  # w1 stops answering
    assert other.expire() == (1, 0)
    queued = other.get(job_id)
    assert queued is not None and (queued.state, queued.attempts, queued.worker) == (QUEUED, 1, None)
    second = other.claim("w2", lease_s=30.0)
    assert second is not None and second.attempts == 2
    # The late worker: its progress and its result no longer count.
    assert not store.progress(job_id, 90.0, "generation", first.claim)
    assert not store.end(job_id, DONE, result={"by": "w1"}, claim=first.claim, images=[b"late"])
    assert other.progress(job_id, 50.0, "generation", second.claim)
    assert other.end(job_id, DONE, result={"by": "w2"}, claim=second.claim, images=[b"w2's"])
    done = store.get(job_id)
    assert done is not None and (done.state, done.result, done.attempts) == (DONE, {"by": "w2"}, 2)
    assert store.images(job_id) == [b"w2's"]
    # Lost by every worker: it fails, named, never dropped.
    lost = store.add("txt2img", {}).id
    for attempt in range(1, MAX_ATTEMPTS + 1):
        claimed = store.claim(f"w{attempt}", lease_s=0.05)
        assert claimed is not None and (claimed.id, claimed.attempts) == (lost, attempt)
        time.sleep(0.1)
        assert store.expire() == ((1, 0) if attempt < MAX_ATTEMPTS else (0, 1))
    failed = store.get(lost)
    assert failed is not None and failed.state == ERROR and failed.error is not None
    assert failed.error.startswith("worker lost:")


def _worker(
    name: str, models: tuple[str, ...], loaded: tuple[str, ...] = (), identities: dict[str, str] | None = None,
    files: tuple[str, ...] = (),
) -> WorkerInfo:  # fmt: skip
    now = time.time()
    return WorkerInfo(id=name, host="box", pid=1, started=now, last_seen=now, running=0, slots=1, models=models,
                      loaded=loaded, identities=identities or {}, files=files)  # fmt: skip


def test_a_job_naming_files_goes_to_a_worker_that_holds_them_all(opener: Opener) -> None:
    store = opener(64)
    facts = {"lora:ink": {"path": "/a/loras/ink.safetensors"}, "m1": {"info": {"family": "sd1"}}}
    store.heartbeat(_worker("a", ("m1",), files=("lora:ink",), identities={"lora:ink": "sha-ink"}), facts=facts)
    store.heartbeat(_worker("b", ("m1",), files=("lora:ink", "vae:big"), identities={"lora:ink": "sha-other"}))
    store.heartbeat(_worker("c", ("m1",)))
    inked = store.add("txt2img", {}, "m1", files={"lora:ink": None}).id
    same_file = store.add("txt2img", {}, "m1", files={"lora:ink": "sha-ink"}).id
    both = store.add("txt2img", {}, "m1", files={"lora:ink": None, "vae:big": None}).id
    assert store.claim("c", ["m1"]) is None  # it holds none of the files
    got = store.claim("b", ["m1"])
    assert got is not None and got.id == inked
    got = store.claim("b", ["m1"])
    assert got is not None and got.id == both  # not same_file: b's ink is another file
    got = store.claim("a", ["m1"])
    assert got is not None and got.id == same_file
    held = {(h.worker, h.key): h for h in store.holdings()}
    assert held[("a", "lora:ink")].facts == facts["lora:ink"] and held[("a", "lora:ink")].auxiliary
    assert held[("a", "m1")].facts == facts["m1"] and not held[("a", "m1")].auxiliary
    assert {w.id: w.files for w in store.workers()} == {"a": ("lora:ink",), "b": ("lora:ink", "vae:big"), "c": ()}
    # A worker that stops leaves the live workers; what it held is remembered, not live.
    store.unregister("b")
    assert [w.id for w in store.workers()] == ["a", "c"]
    gone = [h for h in store.holdings() if h.worker == "b"]
    assert {h.key for h in gone} == {"m1", "lora:ink", "vae:big"} and not any(h.live for h in gone)
    assert all(h.live for h in store.holdings() if h.worker != "b")


def test_jobs_go_to_the_workers_that_serve_their_model_loaded_first(opener: Opener) -> None:
    store = opener(64)
    store.heartbeat(_worker("a", ("m1",), loaded=("m1",)))
    store.heartbeat(_worker("b", ("m1", "m2")))
    j1, j2, j3 = (store.add("txt2img", {}, model).id for model in ("m1", "m2", "m3"))
    # b has m1 on disk only, and a has it loaded: b gets m2's job now, m1's waits for a.
    got = store.claim("b", ["m1", "m2"], loaded=[])
    assert got is not None and got.id == j2 and store.claim("b", ["m1", "m2"], loaded=[]) is None
    got = store.claim("a", ["m1"], loaded=["m1"])
    assert got is not None and got.id == j1
    late = store.add("txt2img", {}, "m1").id
    time.sleep(CLAIM_DELAY_S + 0.2)  # a is busy: past the delay, b may load m1
    got = store.claim("b", ["m1", "m2"], loaded=["m2"])
    assert got is not None and got.id == late
    assert store.claim("b", ["m1", "m2"]) is None and store.claim("c", []) is None  # m3: nobody serves it
    assert {w.id: (w.models, w.loaded) for w in store.workers()} == {"a": (("m1",), ("m1",)), "b": (("m1", "m2"), ())}
    queued = store.get(j3)
    assert queued is not None and queued.state == QUEUED
    # One name, two files: a job names the identity of the file it was accepted for.
    store.heartbeat(_worker("a", ("m1",), loaded=("m1",), identities={"m1": "sha-a"}))
    store.heartbeat(_worker("b", ("m1", "m2"), identities={"m1": "sha-b"}))
    mine = store.add("txt2img", {}, "m1", identity="sha-b").id
    assert store.claim("a", ["m1"], loaded=["m1"]) is None
    got = store.claim("b", ["m1", "m2"], loaded=["m1"])
    assert got is not None and (got.id, got.identity) == (mine, "sha-b")
    assert {w.id: dict(w.identities) for w in store.workers()} == {"a": {"m1": "sha-a"}, "b": {"m1": "sha-b"}}


def test_heartbeats_renew_leases_and_a_stopping_worker_gives_its_job_back(opener: Opener) -> None:
    store = opener(64)
    kept, cancelled = store.add("txt2img", {}).id, store.add("txt2img", {}).id
    claims = [store.claim("w", lease_s=0.3), store.claim("w", lease_s=0.3)]
    for _ in range(3):
        time.sleep(0.15)
        held = store.heartbeat(_worker("w", ()), lease_s=0.3, holding=[kept, cancelled])
        assert store.expire() == (0, 0)  # renewed in time
    assert held == {kept, cancelled}
    assert store.end(cancelled, CANCELLED, "cancelled by request")  # a front end's cancel
    both = [kept, cancelled]
    assert store.heartbeat(_worker("w", ()), lease_s=0.3, holding=both) == {kept}  # no longer its
    # The cancelled job keeps the images its worker finished.
    assert claims[1] is not None and store.end(cancelled, CANCELLED, "stopped", claim=claims[1].claim, images=[b"x"])
    assert store.images(cancelled) == [b"x"]
    # A job the worker claimed but no longer runs (it lost the store meanwhile) is not renewed.
    orphan = store.add("txt2img", {}).id
    assert store.claim("w", lease_s=0.2) is not None
    time.sleep(0.3)
    assert store.heartbeat(_worker("w", ()), lease_s=0.3, holding=[kept]) == {kept}
    assert store.expire() == (1, 0)
    back_again = store.get(orphan)
    assert back_again is not None and back_again.state == QUEUED
    assert store.unregister("w") == 1 and store.workers() == []
    back = store.get(kept)
    assert back is not None and (back.state, back.attempts) == (QUEUED, 0)  # not counted as lost


def test_an_older_store_is_migrated_with_its_jobs(
    opener: Opener, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A version 2 store, as sfumato wrote it before workers: its jobs are read and run."""
    store = opener(64)
    url = None if isinstance(store, SqliteJobStore) else request.getfixturevalue("postgres").new_database()
    row = ("old-job", "txt2img", '{"payload": {}}', DONE, 100.0, DONE, None, '{"output_paths": []}', 1.0, 2.0, 3.0)
    if url is None:
        path = tmp_path / "old.sqlite3"
        with sqlite3.connect(path) as conn:
            conn.executescript(SCHEMA.format(real="REAL"))
            conn.execute("INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
            conn.execute("PRAGMA user_version = 2")
        old = open_store(None, path, 64)
    else:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(SCHEMA.format(real="DOUBLE PRECISION"))
            conn.execute("CREATE TABLE sfumato_schema (version INTEGER NOT NULL)")
            conn.execute("INSERT INTO sfumato_schema VALUES (2)")
            conn.execute("INSERT INTO jobs VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)", row)
        old = open_store(url, tmp_path / "unused.sqlite3", 64)
    try:
        job = old.get("old-job")
        assert job is not None and (job.state, job.attempts, job.model, job.worker) == (DONE, 0, None, None)
        fresh = old.add("txt2img", {}, "m")
        claimed = old.claim("w", ["m"])
        assert claimed is not None and claimed.id == fresh.id
    finally:
        old.close()


def test_retention_and_options(opener: Opener) -> None:
    store = opener(64)
    old, active = store.add("txt2img", {}).id, store.add("txt2img", {}).id
    store.end(old, DONE)
    assert [job.id for job in store.purge(-1.0)] == [old] and store.get(old) is None and store.get(active)
    store.set_options({"sd_model_checkpoint": "a.gguf", "CLIP_stop_at_last_layers": 2, "styles": ["x"]})
    store.set_options({"sd_model_checkpoint": "b.gguf"})
    assert opener(64).options() == {"sd_model_checkpoint": "b.gguf", "CLIP_stop_at_last_layers": 2, "styles": ["x"]}


def test_a_store_of_a_later_schema_is_refused_by_name(opener: Opener) -> None:
    store = opener(64)
    store.add("txt2img", {})
    # What a later sfumato writes.
    if isinstance(store, SqliteJobStore):
        store._rows("PRAGMA user_version = 1000")
    else:
        store._rows("INSERT INTO sfumato_schema (version) VALUES (1000)")
    with pytest.raises(StoreVersionError, match="schema version 1000"):
        opener(64)


def test_a_bad_store_value_is_refused_naming_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for spec in ("mysql://user:s3cret@host/db", "postgresql://user:s3cret@host:port/db", "postgresql://u:s3cret@[db"):
        with pytest.raises(StoreSpecError) as caught:
            open_store(spec, tmp_path / "jobs.sqlite3", 64)
        assert str(caught.value).startswith("--store: ") and "postgresql://" in str(caught.value)
        assert "s3cret" not in str(caught.value)
    assert main(["serve", "--store", "sqlite3:jobs.db", "--data", str(tmp_path)]) == 2
    assert "sfumato: error: --store: 'sqlite3:jobs.db' is not a store sfumato knows; use postgresql://" in (
        capsys.readouterr().err
    )


# --- the server on PostgreSQL ----------------------------------------------------------------


def _settings(settings: ServerSettings, url: str) -> ServerSettings:
    values = {f: getattr(settings, f) for f in settings.__dataclass_fields__}
    return ServerSettings(**{**values, "store": url})


def test_the_server_keeps_its_jobs_in_postgresql_across_a_restart(
    settings: ServerSettings, postgres: PostgresServer
) -> None:
    on_pg = _settings(settings, postgres.new_database())
    with TestClient(create_app(on_pg)) as client:
        job_id = client.post("/txt2img", json=job_body(fileType="png")).json()["job_id"]
        assert wait_job(client, job_id)["state"] == "done"
        assert client.post("/sdapi/v1/options", json={"samples_format": "jpg"}).status_code == 200
        with TestClient(create_app(on_pg)) as second:  # a second server on the database: two workers
            workers = client.get("/workers").json()["workers"]
            assert len(workers) == 2 and all(w["models"] == [MODEL, "upscaler:esrgan-x4"] for w in workers)
            again = second.post("/txt2img", json=job_body(fileType="png", seed=7)).json()["job_id"]
            assert wait_job(client, again)["state"] == "done"  # accepted by one, served by the other
    assert not settings.db_path.exists()  # nothing went to SQLite
    with TestClient(create_app(on_pg)) as client:
        done = client.get(f"/queue/{job_id}").json()
        assert done["state"] == "done" and pixels(base64.b64decode(done["image"])).shape == (SIZE, SIZE, 3)
        assert client.get("/sdapi/v1/options").json()["samples_format"] == "jpg"


def test_a_database_outage_is_503_and_the_server_comes_back(settings: ServerSettings) -> None:
    own = PostgresServer()  # its own server, to stop and start
    try:
        own.start()
        url = own.new_database().replace(f"{own.user}@", f"{own.user}:s3cret@")  # trust auth: never asked for
        with TestClient(create_app(_settings(settings, url))) as client:
            first = client.post("/txt2img", json=job_body()).json()["job_id"]
            assert wait_job(client, first)["state"] == "done"
            own.stop("immediate")
            down = client.get(f"/queue/{first}")
            assert down.status_code == 503, down.text
            body = down.json()
            assert body["code"] == "store_unavailable" and "cannot be reached" in body["error"]
            assert "s3cret" not in down.text and body["status"] == "error"
            assert client.post("/txt2img", json=job_body()).status_code == 503
            own.start()
            second = client.post("/txt2img", json=job_body(seed=5)).json()["job_id"]
            assert wait_job(client, second)["state"] == "done"  # the runner took jobs again
            assert client.get(f"/queue/{first}").json()["state"] == "done"
    finally:
        own.remove()


def test_postgresql_claims_under_psycopg_are_what_a_second_connection_sees(postgres: PostgresServer) -> None:
    """The rows a store writes are the database's, read back with psycopg directly."""
    url = postgres.new_database()
    store = open_store(url, Path("unused.sqlite3"), 64)
    try:
        job = store.add("txt2img", {"payload": {"prompt": "x"}})
        store.claim("w")
        with psycopg.connect(url) as conn:
            row = conn.execute("SELECT state, kind, worker FROM jobs WHERE id = %s", (job.id,)).fetchone()
            version = conn.execute("SELECT version FROM sfumato_schema").fetchone()
        assert row == (PROCESSING, "txt2img", "w") and version == (SCHEMA_VERSION,)
    finally:
        store.close()

"""The job store's behaviour, the same on SQLite and on PostgreSQL (a real server the
suite starts, never mocked): accepting under the queue limit across front ends,
claiming each job once, progress and ends, recovery, retention, options, schema
versions; and the server on PostgreSQL, across a restart and a database outage.
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from fastapi.testclient import TestClient

from sfumato.cli import main
from sfumato.server.app import create_app
from sfumato.server.settings import ServerSettings
from sfumato.server.store import (
    CANCELLED,
    DONE,
    PROCESSING,
    QUEUED,
    JobStore,
    QueueFullError,
    SqliteJobStore,
    StoreInUseError,
    StoreVersionError,
    open_store,
)
from sfumato.server.store_pg import StoreSpecError
from tests.support.postgres import PostgresServer

from .helpers import SIZE, job_body, pixels, wait_job

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
    first = stores[1].next_queued()
    assert first is not None and (first.id, first.state) == (ids[0], PROCESSING)
    claimed: list[str] = [first.id]

    def claim(store: JobStore) -> None:
        while (job := store.next_queued()) is not None:
            claimed.append(job.id)

    threads = [threading.Thread(target=claim, args=(store,)) for store in stores for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed) == sorted(ids)  # every job once, none twice


def test_progress_ends_and_recovery(opener: Opener) -> None:
    store = opener(64)
    running, waiting, ended = (store.add("txt2img", {"n": i}).id for i in range(3))
    assert store.next_queued() is not None
    store.progress(waiting, 50.0, "generation")  # not running: nothing changes
    store.progress(running, 42.5, "generation")
    job = store.get(running)
    assert job is not None and (job.progress, job.phase, job.state) == (42.5, "generation", PROCESSING)
    waiting_job = store.get(waiting)
    assert waiting_job is not None and (waiting_job.progress, waiting_job.phase) == (0.0, QUEUED)
    assert store.end(ended, CANCELLED, "cancelled by request") and not store.end(ended, DONE)
    assert store.recover() == 1  # the running one, as after a restart
    again = store.get(running)
    assert again is not None and (again.state, again.progress, again.started) == (QUEUED, 0.0, None)
    final = store.get(ended)
    assert final is not None and (final.state, final.error) == (CANCELLED, "cancelled by request")
    claimed = store.next_queued()
    assert claimed is not None and claimed.id == running
    assert store.end(running, DONE, result={"width": SIZE})
    done = store.get(running)
    assert done is not None and (done.state, done.progress, done.result) == (DONE, 100.0, {"width": SIZE})


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
        with pytest.raises(StoreInUseError, match="another sfumato serve runs the jobs of postgresql://"):
            create_app(on_pg)  # a second server on the database, for now
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
        store.next_queued()
        with psycopg.connect(url) as conn:
            row = conn.execute("SELECT state, kind FROM jobs WHERE id = %s", (job.id,)).fetchone()
            version = conn.execute("SELECT version FROM sfumato_schema").fetchone()
        assert row == (PROCESSING, "txt2img") and version == (2,)
    finally:
        store.close()

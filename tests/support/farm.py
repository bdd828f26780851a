"""A farm on one machine: ``sfumato serve --workers 0`` front ends and ``sfumato worker``
processes on one PostgreSQL database, each an OS process in its own process group
(as another machine's would be) with its own folders; and the HTTP helpers that
drive them. The tests (``tests/test_farm.py``) and the queue benchmark use it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg

from tests.helpers import MODEL, free_port, job_body

LEASE = 3.0  # seconds: short, so that a lost worker's job comes back soon
LONG = 24  # sampling steps of a job that runs long enough to be interrupted


@dataclass
class Process:
    """A ``sfumato`` process in its own process group (as a machine's would be)."""

    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def signal(self, number: int) -> None:
        os.killpg(self.popen.pid, number)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.signal(signal.SIGCONT)
            self.popen.terminate()
            try:
                self.popen.wait(60)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.popen.wait(10)


@dataclass
class Farm:
    url: str  # the database
    root: Path
    model: Path
    processes: list[Process]

    def _start(self, name: str, *args: str, cwd: Path | None = None, env: Mapping[str, str] | None = None) -> Process:
        log = self.root / f"{name}.log"
        with open(log, "wb") as out:
            popen = subprocess.Popen(
                [sys.executable, "-m", "sfumato", *args], stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                cwd=cwd, env={**os.environ, **(env or {})},
            )  # fmt: skip
        self.processes.append(Process(popen, log))
        return self.processes[-1]

    def folder(
        self, name: str, models: tuple[str, ...] = (MODEL,), other_file: str | None = None,
        files: Mapping[str, Path] | None = None,
    ) -> Path:  # fmt: skip
        """A machine's folders: its models (links to the suite's model, by these names;
        ``other_file``: a model of that name that is another file), and ``files``
        (``loras/ink.safetensors`` -> a file of the suite) linked in its other folders."""
        home = self.root / name
        (home / "models").mkdir(parents=True, exist_ok=True)
        for model in models:
            link = home / "models" / f"{model}.gguf"
            if not link.exists():
                link.symlink_to(self.model)
        if other_file is not None:
            (home / "models" / f"{other_file}.gguf").write_bytes(self.model.read_bytes() + b"\0")
        for where, target in (files or {}).items():
            (home / where).parent.mkdir(parents=True, exist_ok=True)
            if not (home / where).exists():
                (home / where).symlink_to(target)
        return home

    def worker(
        self, name: str, models: tuple[str, ...] = (MODEL,), other_file: str | None = None, threads: int = 1,
        *flags: str, files: Mapping[str, Path] | None = None,
    ) -> Process:  # fmt: skip
        """A worker (more ``flags`` for ``sfumato worker``), with ``files`` in its
        ``loras/``, ``vaes/``, ``controlnets/``, ``embeddings/`` or ``upscalers/`` folders."""
        home = self.folder(name, models, other_file, files)
        return self._start(
            name, "worker", "--store", self.url, "--models", str(home / "models"), "--data", str(home / "data"),
            "--upscalers", str(home / "upscalers"), "--loras", str(home / "loras"), "--vaes", str(home / "vaes"),
            "--controlnets", str(home / "controlnets"), "--embeddings", str(home / "embeddings"),
            "--lease", str(LEASE), "--threads", str(threads), *flags,
        )  # fmt: skip

    def stop(self) -> None:
        """Stop every process it started."""
        for process in self.processes:
            process.stop()

    def front_end(
        self, name: str, *flags: str, models: tuple[str, ...] | None = None, env: Mapping[str, str] | None = None
    ) -> tuple[Process, httpx.Client]:
        """A front end (no worker of its own; more ``flags`` for ``sfumato serve``; more
        ``env``) and a client of it, once it answers. It holds no model file and has no
        models folder (it serves what the workers register), unless ``models`` names the
        models of a folder of its own."""
        home = self.root / name
        home.mkdir(parents=True, exist_ok=True)
        own = ("--models", str(self.folder(name, models) / "models")) if models is not None else ()
        port = free_port()
        process = self._start(
            name, "serve", "--workers", "0", "--store", self.url, "--port", str(port), *own,
            "--data", str(home / "data"), "--lease", str(LEASE), *flags, cwd=home, env=env,
        )  # fmt: skip
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
        until(lambda: _answers(client), f"front end {name} did not answer", process)
        return process, client

    def row(self, job_id: str) -> dict[str, Any]:
        """The job's row as the database has it."""
        with psycopg.connect(self.url, row_factory=psycopg.rows.dict_row) as conn:
            row = conn.execute("SELECT * FROM jobs WHERE id = %s", (job_id,)).fetchone()
            count = conn.execute("SELECT count(*) AS n FROM images WHERE job_id = %s", (job_id,)).fetchone()
        assert row is not None and count is not None
        return {**row, "images": count["n"], "result": json.loads(row["result"]) if row["result"] else {}}

    def runner_of(self, job_id: str) -> Process:
        """The worker process that holds a running job (worker ids carry their pid)."""
        worker = self.row(job_id)["worker"]
        return next(p for p in self.processes if worker and f"-{p.pid}-" in worker)


def _answers(client: httpx.Client) -> bool:
    try:
        return client.get("/hello").status_code == 200
    except httpx.TransportError:
        return False


def until(check: Callable[[], Any], what: str, *watched: Process, timeout: float = 120) -> Any:
    """Wait for ``check()`` to be truthy; fails naming ``what`` (and a watched process that died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        for process in watched:
            assert process.popen.poll() is None, f"{process.log.stem} exited: {process.text()[-3000:]}"
        time.sleep(0.1)
    raise AssertionError(f"{what} within {timeout:.0f} s")


def live_workers(client: httpx.Client, count: int) -> list[dict[str, Any]]:
    workers: list[dict[str, Any]] = client.get("/workers").json()["workers"]
    return workers if len(workers) == count else []


def submit(client: httpx.Client, **fields: Any) -> str:
    response = client.post("/txt2img", json=job_body(**fields))
    assert response.status_code == 200, response.text
    return str(response.json()["job_id"])


def status(client: httpx.Client, job_id: str) -> dict[str, Any]:
    body: dict[str, Any] = client.get(f"/queue/{job_id}").json()
    return body


def running(client: httpx.Client, job_id: str) -> bool:
    """Whether the job is past its first sampling step."""
    now = status(client, job_id)
    return bool(now["state"] == "processing" and now["progress"] > 0)


def ended(client: httpx.Client, job_id: str) -> dict[str, Any] | None:
    now = status(client, job_id)
    return now if now["state"] in ("done", "error", "cancelled") else None

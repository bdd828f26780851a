"""A PostgreSQL server the tests start themselves, from Debian's binaries
(``/usr/lib/postgresql/*/bin``): a cluster in a temporary folder, reached through
a Unix socket there, no TCP. As root, the server runs as ``postgres`` (through
``runuser``), since PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

BIN_GLOB = "/usr/lib/postgresql/*/bin"


def binaries() -> Path:
    """The newest installed PostgreSQL's ``bin`` folder.

    Raises
    ------
    RuntimeError
        When none is installed (``.ci/run`` installs Debian's ``postgresql``).
    """
    found = sorted(Path("/").glob(BIN_GLOB.lstrip("/")), key=lambda p: int(p.parent.name.split(".")[0]))
    if not found:
        raise RuntimeError(f"no PostgreSQL binaries in {BIN_GLOB}: apt-get install postgresql")
    return found[-1]


class PostgresServer:
    """One cluster: :meth:`start`, :meth:`stop` (``fast`` or ``immediate``, as ``pg_ctl -m``), and a
    fresh database per :meth:`new_database`."""

    def __init__(self) -> None:
        self.bin = binaries()
        self.root = Path(tempfile.mkdtemp(prefix="sfumato-pg-"))
        self.data, self.socket = self.root / "data", self.root / "socket"
        self.socket.mkdir()
        self._as_postgres = os.geteuid() == 0
        self.user = "postgres" if self._as_postgres else os.environ.get("USER", "postgres")
        if self._as_postgres:
            shutil.chown(self.root, "postgres")
            shutil.chown(self.socket, "postgres")
        self._names = itertools.count(1)
        self._run("initdb", "-D", str(self.data), "-U", self.user, "--auth=trust", "-E", "UTF8", "--no-sync")

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self.bin / tool), *args]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stderr[-2000:]}")

    def start(self) -> None:
        options = f"-c listen_addresses='' -c unix_socket_directories='{self.socket}' -c max_connections=200"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "log"), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def url(self, database: str = "postgres", password: str | None = None) -> str:
        secret = f":{password}" if password else ""
        return f"postgresql://{self.user}{secret}@/{database}?host={self.socket}"

    def new_database(self) -> str:
        """A new empty database's URL."""
        import psycopg

        name = f"sfumato_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def remove(self) -> None:
        try:
            self.stop("immediate")
        except RuntimeError:
            pass  # stopped already
        shutil.rmtree(self.root, ignore_errors=True)

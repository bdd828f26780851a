"""One worker process, seen from the SDK's side: start it, talk to it, end it.

The worker is a fresh interpreter (``python -m sfumato.runtime.worker``), not a
``multiprocessing`` child: nothing of the caller's ``__main__`` runs again in
it, and its environment (device selection) is set before it opens the engine
library. Messages travel pickled over a socket pair.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping
from multiprocessing.connection import Connection

import psutil

from sfumato.errors import EngineCrashedError
from sfumato.runtime.protocol import JobFailed, LoadSpec, Ready

LOG_LEVEL_ENV = "SFUMATO_WORKER_LOG_LEVEL"

# How long a worker told to stop may take before it is killed.
EXIT_GRACE_S = 5.0


class WorkerExitedError(Exception):
    """The worker's end of the pipe closed: it exited or was killed."""

    def __init__(self, returncode: int) -> None:
        super().__init__(f"worker ended with {returncode}")
        self.returncode = returncode

    @property
    def signal(self) -> str | None:
        """The name of the signal that ended the worker, if one did."""
        if self.returncode >= 0:
            return None
        try:
            return signal.Signals(-self.returncode).name
        except ValueError:
            return f"signal {-self.returncode}"

    def crash(self, model_id: str, during: str = "running this job") -> EngineCrashedError:
        """The error a caller sees for this death."""
        return EngineCrashedError(model_id, self.signal, None if self.signal else self.returncode, during)


class WorkerProcess:
    """A started worker. :meth:`wait_ready` must be called once before jobs are sent.

    Every method that talks to the worker raises :class:`WorkerExitedError` when it is
    gone; :meth:`kill` may be called from any thread, and makes a blocked
    :meth:`recv` in another thread raise at once.
    """

    def __init__(self, spec: LoadSpec, env: Mapping[str, str]) -> None:
        self.model_id = spec.model_id
        ours, theirs = socket.socketpair()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "sfumato.runtime.worker", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                # The worker logs to the inherited stderr at the level sfumato logs at here.
                env={**os.environ, **env, LOG_LEVEL_ENV: str(logging.getLogger("sfumato").getEffectiveLevel())},
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._conn = Connection(ours.detach())
        self._send_lock = threading.Lock()
        self.ready: Ready | None = None
        self.send(spec)

    @property
    def pid(self) -> int:
        return self._proc.pid

    def alive(self) -> bool:
        return self._proc.poll() is None

    def rss_bytes(self) -> int:
        """The worker's resident memory now (0 once it is gone)."""
        try:
            return int(psutil.Process(self._proc.pid).memory_info().rss)
        except psutil.Error:
            return 0

    def _died(self) -> WorkerExitedError:
        return WorkerExitedError(self._proc.wait())

    def wait_ready(self) -> Ready:
        """Block until the model is loaded.

        Raises
        ------
        EngineCrashedError
            When the worker died while loading.
        SfumatoError
            What loading raised in the worker (a bad file, an engine error).
        """
        try:
            message = self.recv()
        except WorkerExitedError as died:
            self.close()
            raise died.crash(self.model_id, "loading the model") from None
        if isinstance(message, JobFailed):
            self.close()
            raise message.error
        assert isinstance(message, Ready), message
        self.ready = message
        return message

    def send(self, message: object) -> None:
        """Send ``message``; one sender at a time (a cancel may come from any thread)."""
        try:
            with self._send_lock:
                self._conn.send(message)
        except OSError:
            raise self._died() from None

    def recv(self, timeout: float | None = None) -> object | None:
        """The next message; ``None`` when ``timeout`` seconds pass without one."""
        try:
            if timeout is not None and not self._conn.poll(max(timeout, 0.0)):
                return None
            message: object = self._conn.recv()
        except (EOFError, OSError):
            raise self._died() from None
        return message

    def kill(self) -> None:
        """End the worker now (SIGKILL)."""
        if self._proc.poll() is None:
            self._proc.kill()

    def close(self) -> None:
        """Ask the worker to free its model and exit; kill it if it takes too long."""
        if self._proc.poll() is None:
            try:
                self._conn.send(None)
                self._proc.wait(EXIT_GRACE_S)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
        self._proc.wait()
        self._conn.close()

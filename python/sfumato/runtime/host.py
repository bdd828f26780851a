"""Hosting a loaded model: its worker process and a FIFO of jobs.

Each loaded model has one worker process and one dispatcher thread here. The
dispatcher sends the jobs to the worker one at a time, in the order they came,
and hands each job's ticks, images and end to that job's
:class:`JobEvents` only, so concurrent callers never see each other's progress.

A running job is cancelled by killing the worker: the engine of this version
has no cancel entry point, and a killed process leaks nothing. The same path
serves timeouts and ``unload_model``. When the worker dies (a cancel, an
engine abort, a kill from outside), only the running job ends; a new worker
loads the model again at once and the queued jobs run on it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from sfumato.engine.requests import ProgressTick
from sfumato.errors import UnknownModelIdError
from sfumato.families.detect import ModelInfo
from sfumato.params import ModelConfig
from sfumato.runtime.process import WorkerExitedError, WorkerProcess
from sfumato.runtime.protocol import (
    Accepted,
    CancelJob,
    ImageDone,
    JobCancelled,
    JobDone,
    JobFailed,
    LoadSpec,
    Ready,
    RunJob,
    Tick,
)

logger = logging.getLogger("sfumato.runtime")

CancelReason = Literal["cancelled", "timeout", "unloaded"]
"""Why a running or queued job was stopped: a cancel call, its timeout, its model's unload."""
REASON_CANCELLED: CancelReason = "cancelled"
REASON_TIMEOUT: CancelReason = "timeout"
REASON_UNLOADED: CancelReason = "unloaded"

# The longest a cancel waits for the stopped job to be reported ended.
CANCEL_WAIT_S = 10.0
# How long a worker asked to stop a job (keeping its model) may take before it is killed.
SOFT_CANCEL_S = 5.0


class JobEvents(Protocol):
    """Where a job's life is reported; exactly one of the last three ends it."""

    def started(self) -> None: ...
    def tick(self, tick: ProgressTick) -> None: ...
    def image(self, image: ImageDone) -> None: ...
    def finished(self, done: JobDone, ready: Ready) -> None: ...
    def failed(self, error: BaseException) -> None: ...
    def cancelled(self, reason: CancelReason) -> None: ...


@dataclass(eq=False)
class HostJob:
    """A job for a :class:`ModelHost`. ``timeout`` counts seconds of running, not of queueing."""

    run: RunJob
    events: JobEvents
    timeout: float | None = None
    state: str = "queued"  # queued -> running -> ending (being reported) -> ended
    cancel_reason: CancelReason | None = None
    resent: bool = False


@dataclass(frozen=True)
class LoadedModel:
    """What a model id stands for.

    Attributes
    ----------
    model_id:
        The id ``load_model`` returned.
    info:
        The detected family and format of ``model_src``.
    config:
        The validated ``model_config``.
    has_diffusion, has_upscaler:
        Whether the worker holds a diffusion context and an ESRGAN.
    size_multiple:
        What width and height must be multiples of for this family.
    skipped_embeddings:
        The files of ``model_config.embedding_dir`` its text encoders cannot
        take, by name, with why (a prompt that names one is refused).
    device:
        The engine device it runs on (``"CPU"``, ``"Vulkan0"``): its memory budget's.
    device_bytes:
        That device's memory (RAM for the CPU, VRAM for a GPU), the default budget.
    weight_bytes:
        Its weights' size in memory, estimated before it loads from its files and
        ``weight_type``.
    """

    model_id: str
    info: ModelInfo
    config: ModelConfig
    has_diffusion: bool
    has_upscaler: bool
    size_multiple: int = 64
    skipped_embeddings: dict[str, str] = field(default_factory=dict)
    device: str = "CPU"
    device_bytes: int = 0
    weight_bytes: int = 0


class ModelHost:
    """Runs the jobs of one :class:`LoadedModel` in its worker, first in, first out.

    ``before_start`` is called before every worker start (the first load and
    each reload), so that a memory budget can make room.
    """

    def __init__(
        self,
        model: LoadedModel,
        spec: LoadSpec,
        env: dict[str, str],
        before_start: Callable[[ModelHost], None] = lambda _host: None,
    ) -> None:
        self.model = model
        self._spec = spec
        self._env = env
        self._before_start = before_start
        self._cond = threading.Condition()
        self._queue: deque[HostJob] = deque()
        self._running: HostJob | None = None
        self._worker: WorkerProcess | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"sfumato-{model.model_id[:8]}", daemon=True)
        self.ready: Ready | None = None
        self.last_used = time.monotonic()
        self.restarts = 0

    # -- state -------------------------------------------------------------

    @property
    def resident(self) -> bool:
        """Whether a worker holds the model in memory now."""
        with self._cond:
            return self._worker is not None and self._worker.ready is not None

    @property
    def running(self) -> bool:
        """Whether a job runs now."""
        with self._cond:
            return self._running is not None

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    @property
    def pid(self) -> int | None:
        with self._cond:
            return self._worker.pid if self._worker is not None else None

    def rss_bytes(self) -> int:
        """The worker's resident memory now (0 when not resident)."""
        with self._cond:
            worker = self._worker
        return worker.rss_bytes() if worker is not None else 0

    # -- life --------------------------------------------------------------

    def start(self) -> None:
        """Load the model in a worker (blocking) and start taking jobs.

        Raises what loading raised; nothing is left running then.
        """
        self._start_worker()
        self._thread.start()

    def _start_worker(self) -> WorkerProcess:
        self._before_start(self)
        worker = WorkerProcess(self._spec, self._env)
        with self._cond:
            closed = self._closed
            if not closed:
                self._worker = worker
        if closed:
            worker.close()
            raise UnknownModelIdError(f"model {self.model.model_id!r} was unloaded")
        try:
            self.ready = worker.wait_ready()
        except BaseException:
            with self._cond:
                if self._worker is worker:
                    self._worker = None
            worker.kill()  # a wait cut short (Ctrl-C) leaves no worker loading on its own
            worker.close()
            raise
        return worker

    def submit(self, job: HostJob) -> None:
        """Queue ``job``.

        Raises
        ------
        UnknownModelIdError
            When the model has been unloaded.
        """
        with self._cond:
            if self._closed:
                raise UnknownModelIdError(f"model {self.model.model_id!r} has been unloaded")
            self._queue.append(job)
            self.last_used = time.monotonic()
            self._cond.notify_all()

    def cancel(self, job: HostJob, reason: CancelReason = REASON_CANCELLED, wait: bool = True) -> bool:
        """Cancel ``job``: a queued one leaves the queue, a running one has its
        worker killed (and, with ``wait``, has ended when this returns).
        Returns whether the job was still there to cancel."""
        with self._cond:
            if job.state == "queued" and job in self._queue:
                self._queue.remove(job)
                job.state = "ended"
            elif job.state == "running" and job.cancel_reason is None:
                job.cancel_reason = reason
                if self._worker is not None:
                    self._stop(job, self._worker)
                if wait:
                    self._cond.wait_for(lambda: job.state == "ended", CANCEL_WAIT_S)
                return True
            else:
                return False
        job.events.cancelled(reason)
        return True

    def _stop(self, job: HostJob, worker: WorkerProcess) -> None:
        """Stop ``job``'s run: ask a worker that can stop it with its model kept
        (:attr:`Ready.soft_cancel`), and kill the worker if the job has not ended
        :data:`SOFT_CANCEL_S` later; kill any other worker at once."""
        if worker.ready is None or not worker.ready.soft_cancel:
            worker.kill()
            return
        try:
            worker.send(CancelJob())
        except WorkerExitedError:
            return  # gone already: the dispatcher reports the job

        def too_late() -> None:
            with self._cond:
                if job.state == "running" and self._worker is worker:
                    logger.warning("the job did not stop within %s s of its cancel; ending its worker", SOFT_CANCEL_S)
                    worker.kill()

        timer = threading.Timer(SOFT_CANCEL_S, too_late)
        timer.daemon = True
        timer.start()

    def cancel_running(self, reason: CancelReason = REASON_CANCELLED) -> bool:
        """Cancel the running job, if there is one."""
        with self._cond:
            job = self._running
        return job is not None and self.cancel(job, reason)

    def cancel_queued(self, reason: CancelReason = REASON_CANCELLED) -> int:
        """Cancel every queued job; returns how many."""
        with self._cond:
            jobs = list(self._queue)
        return sum(self.cancel(job, reason) for job in jobs)

    def evict(self) -> bool:
        """Free the model's memory while it is idle; the next job loads it again.
        Returns whether it was evicted (not when busy, closed or not resident)."""
        with self._cond:
            worker = self._worker
            if self._closed or self._running is not None or self._queue or worker is None or worker.ready is None:
                return False
            self._worker = None
        worker.close()
        logger.info("model %s evicted from memory", self.model.model_id)
        return True

    def close(self) -> None:
        """Cancel the running and queued jobs (reason "unloaded"), end the worker."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            pending = list(self._queue)
            self._queue.clear()
            for job in pending:
                job.state = "ended"
            running, worker = self._running, self._worker
            if running is not None and running.cancel_reason is None:
                running.cancel_reason = REASON_UNLOADED
            if worker is not None and (running is not None or worker.ready is None):
                worker.kill()
            self._cond.notify_all()
        for job in pending:
            job.events.cancelled(REASON_UNLOADED)
        if self._thread.is_alive():
            self._thread.join()
        with self._cond:
            worker, self._worker = self._worker, None
        if worker is not None:
            worker.close()

    # -- the dispatcher ----------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._queue) or self._closed)
                if self._closed:
                    return
                worker = self._worker
            if worker is None or not worker.alive():
                if worker is not None:
                    logger.warning("the worker of model %s died while idle; restarting it", self.model.model_id)
                    self._drop(worker)
                try:
                    worker = self._start_worker()
                except BaseException as exc:  # noqa: BLE001 - the next job reports why the model cannot load
                    self._fail_next(exc)
                    continue
            with self._cond:
                if self._closed:
                    return
                if not self._queue or self._worker is not worker:
                    continue
                job = self._queue.popleft()
                job.state = "running"
                self._running = job
            crashed = self._execute(worker, job)
            with self._cond:
                self._running = None
                self.last_used = time.monotonic()
                closed = self._closed
                if job.state == "queued":  # sent back: its worker died before taking it
                    continue
            if crashed and not closed:
                self.restarts += 1
                try:
                    self._start_worker()  # reload at once: the model stays ready for the next job
                except UnknownModelIdError:
                    pass  # unloaded meanwhile
                except BaseException:  # retried, and reported, by the next job
                    if not self._closed:
                        logger.exception("reloading model %s failed", self.model.model_id)

    def _fail_next(self, error: BaseException) -> None:
        with self._cond:
            job = self._queue.popleft() if self._queue and not self._closed else None
            if job is not None:
                job.state = "ended"
        if job is not None:
            job.events.failed(error)

    def _drop(self, worker: WorkerProcess) -> None:
        with self._cond:
            if self._worker is worker:
                self._worker = None
        worker.kill()
        worker.close()

    def _execute(self, worker: WorkerProcess, job: HostJob) -> bool:
        """Run ``job`` on ``worker``; returns whether the worker is gone after it.

        A job whose worker dies before taking it is put back at the head of the
        queue, once: a worker can die idle just before it is sent a job.
        """
        deadline = time.monotonic() + job.timeout if job.timeout is not None else None
        end: object
        accepted = False
        try:
            worker.send(job.run)
            while True:
                message = worker.recv(None if deadline is None else deadline - time.monotonic())
                if message is None:  # the job's time is up
                    deadline = None
                    self.cancel(job, REASON_TIMEOUT, wait=False)
                elif isinstance(message, Accepted):
                    accepted = True
                    job.events.started()
                elif isinstance(message, Tick):
                    job.events.tick(message.tick)
                elif isinstance(message, ImageDone):
                    job.events.image(message)
                else:
                    end = message
                    break
        except WorkerExitedError as died:
            end = died
        with self._cond:
            reason = job.cancel_reason
            resend = reason is None and not accepted and not job.resent and not self._closed
            requeued = resend and isinstance(end, WorkerExitedError)
            if requeued:
                job.resent = True
                job.state = "queued"
                self._queue.appendleft(job)
            else:
                job.state = "ending"  # a cancel from now on is too late; one before waits for the report
        # A job stopped by its cancel (JobCancelled, or a job that ended anyway) leaves a
        # worker that can take the next job; a cancel that had to kill it does not.
        soft = worker.ready is not None and worker.ready.soft_cancel and worker.alive()
        gone = isinstance(end, WorkerExitedError) or (reason is not None and not soft)
        if requeued:
            logger.warning("the worker of model %s died before taking a job; sending it again", self.model.model_id)
        elif reason is not None:
            # A cancel that raced the job's last message still wins: the
            # caller was told the job is cancelled, and the worker was killed.
            job.events.cancelled(reason)
        elif isinstance(end, WorkerExitedError):
            error = end.crash(self.model.model_id)
            logger.error("%s", error)
            job.events.failed(error)
        elif isinstance(end, JobFailed):
            job.events.failed(end.error)
        elif isinstance(end, JobCancelled):  # only ever sent after a cancel, which set the reason
            job.events.cancelled(REASON_CANCELLED)
        else:
            assert isinstance(end, JobDone) and self.ready is not None, end
            job.events.finished(end, self.ready)
        if not requeued:
            with self._cond:  # reported: a waiting cancel returns with the job's final state
                job.state = "ended"
                self._cond.notify_all()
        if gone:
            self._drop(worker)  # after the report: reaping a large worker takes a while
        return gone

"""The worker process: hosts the engine contexts of one loaded model.

Started by :class:`sfumato.runtime.process.WorkerProcess` as
``python -m sfumato.runtime.worker FD``, where ``FD`` is its end of a socket
pair. It reads a :class:`~sfumato.runtime.protocol.LoadSpec`, loads, answers
:class:`~sfumato.runtime.protocol.Ready`, then runs one job per
:class:`~sfumato.runtime.protocol.RunJob` until it reads ``None`` or the
parent goes away; a :class:`~sfumato.runtime.protocol.CancelJob` stops the
running job within one graph operation on the CPU, the model kept loaded.
Engine aborts and kills end only this process; the parent sees the pipe close
and reads the exit signal.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

import psutil

from sfumato import images as imaging
from sfumato.engine.context import DiffusionContext, UpscalerContext
from sfumato.engine.library import Engine, load_engine
from sfumato.engine.requests import PHASE_HIRES, PHASE_SAMPLING, PHASE_UPSCALE, PHASE_VAE, ProgressTick
from sfumato.errors import EngineError, SfumatoError
from sfumato.images import ImageArray
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

Send = Callable[[object], None]

logger = logging.getLogger("sfumato.runtime.worker")


def _ms(since: float) -> float:
    return (time.perf_counter() - since) * 1000.0


class Worker:
    """The contexts of one model and the jobs run on them."""

    def __init__(self, spec: LoadSpec) -> None:
        self.diffusion: DiffusionContext | None = None
        self.upscaler: UpscalerContext | None = None
        if spec.context is not None:
            self.diffusion = DiffusionContext(spec.context)
        if spec.upscaler_path is not None:
            self.upscaler = UpscalerContext(
                spec.upscaler_path, n_threads=spec.threads, tile_size=spec.tile_size, parent=self.diffusion
            )

    @property
    def device(self) -> str | None:
        """The device the engine reported running this model on."""
        if self.diffusion is not None and self.diffusion.device is not None:
            return self.diffusion.device
        return self.upscaler.device if self.upscaler is not None else None

    def close(self) -> None:
        if self.upscaler is not None:
            self.upscaler.close()
        if self.diffusion is not None:
            self.diffusion.close()

    def _upscale(
        self, picture: ImageArray, repeats: int, first: int, total: int, since: float, send: Send, inbox: _Inbox
    ) -> ImageArray:
        for r in range(repeats):
            assert self.upscaler is not None
            if inbox.cancelled:
                break  # between two passes: an ESRGAN pass is never stopped midway
            picture = self.upscaler.upscale(picture)
            send(Tick(ProgressTick(first + r + 1, total, _ms(since), PHASE_UPSCALE)))
        return picture

    def run(self, job: RunJob, send: Send, inbox: _Inbox) -> JobDone:
        """Run ``job``, sending its ticks and each image as soon as it is done; a
        cancel in ``inbox`` stops it."""
        started = time.perf_counter()
        if job.request is None:
            assert job.image is not None
            picture = self._upscale(job.image, job.repeats, 0, job.repeats, started, send, inbox)
            generation_ms = _ms(started)
            png = imaging.encode_png(picture)
            send(ImageDone(0, png, picture.shape[1], picture.shape[0]))
            return JobDone(generation_ms=generation_ms, postprocess_ms=_ms(started) - generation_ms)
        assert self.diffusion is not None
        request, count = job.request, job.request.batch_count
        done = JobDone(seed=request.seed)
        # A batch runs as one engine call per image (seed + i), so that each
        # image is out, and kept, as soon as it is decoded: a cancel or a crash
        # later in the batch loses only the images not finished yet.
        for i in range(count):

            def renumber(tick: ProgressTick, i: int = i) -> None:
                inbox.abortable(True)  # past the conditioning: sampling and decoding stop cleanly
                if tick.phase in (PHASE_SAMPLING, PHASE_HIRES):
                    step, total = i * tick.total_steps + tick.step, count * tick.total_steps
                elif tick.phase == PHASE_VAE:
                    step, total = i + tick.step, count
                else:
                    step, total = tick.step, tick.total_steps
                send(Tick(dataclasses.replace(tick, step=step, total_steps=total)))

            if inbox.cancelled:
                break  # a cancel between two images of a batch: the images done are kept
            try:
                out = self.diffusion.generate(
                    dataclasses.replace(request, seed=request.seed + i, batch_count=1), on_tick=renumber
                )
            finally:
                inbox.abortable(False)
            post_start = time.perf_counter()
            picture = out.images[0]
            if request.mask_image is not None and request.init_image is not None:
                picture = imaging.composite(picture, request.init_image, request.mask_image)
            picture = self._upscale(picture, job.repeats, i * job.repeats, count * job.repeats, started, send, inbox)
            png = imaging.encode_png(picture)
            for phase, ms in out.phase_ms.items():
                done.phase_ms[phase] = done.phase_ms.get(phase, 0.0) + ms
            done = dataclasses.replace(
                done,
                generation_ms=done.generation_ms + out.total_ms,
                postprocess_ms=done.postprocess_ms + _ms(post_start),
                sampling_steps=done.sampling_steps + out.sampling_steps,
            )
            send(ImageDone(i, png, picture.shape[1], picture.shape[0]))
        return done


def _portable(error: BaseException) -> BaseException:
    """``error`` if it survives pickling, else an :class:`EngineError` with its text."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:  # noqa: BLE001 - any pickling failure gets the fallback
        return EngineError(f"{type(error).__name__}: {error}")
    return error


class _Inbox:
    """The pipe from the SDK process, read on a thread of its own so that a
    :class:`CancelJob` reaches the engine while a job runs in the main thread.

    A cancel marks the running job; the engine is asked to stop (every graph stops at
    its next operation) only while the job is past its conditioning, in sampling or
    decoding, whose failure the engine returns from cleanly (a text encoder stopped
    midway ends the engine's process). :meth:`job_ended` clears it all and says
    whether the job was cancelled, atomically with respect to the reader, so a cancel
    for a job that had already ended never stops the next.
    """

    def __init__(self, conn: Connection, engine: Engine) -> None:
        self._conn = conn
        self._engine = engine
        self._lock = threading.Lock()
        self._running = False
        self._cancelled = False
        self._abortable = False
        self._messages: queue.SimpleQueue[object] = queue.SimpleQueue()
        threading.Thread(target=self._read, name="sfumato-worker-inbox", daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                message = None  # the parent went away
            if isinstance(message, CancelJob):
                with self._lock:
                    if self._running and not self._cancelled:
                        self._cancelled = True
                        if self._abortable:
                            self._engine.request_cancel()
                continue
            self._messages.put(message)
            if message is None:
                return

    @property
    def cancelled(self) -> bool:
        """Whether the running job was cancelled (checked between images and passes)."""
        with self._lock:
            return self._cancelled

    def abortable(self, now: bool) -> None:
        """Say whether the engine call in progress may be stopped midway."""
        with self._lock:
            self._abortable = now
            if self._cancelled:
                self._engine.request_cancel(now)

    def next_job(self) -> RunJob | None:
        """The next job, marked running; ``None``: stop."""
        job = self._messages.get()
        with self._lock:
            self._running = job is not None
        return job  # type: ignore[return-value]

    def job_ended(self) -> bool:
        """End the running job; whether a :class:`CancelJob` stopped it."""
        with self._lock:
            cancelled, self._cancelled, self._running, self._abortable = self._cancelled, False, False, False
            if cancelled:
                self._engine.request_cancel(False)
        return cancelled


def serve(conn: Connection) -> None:
    """Load what the parent asks, then run its jobs until told to stop."""
    spec: LoadSpec = conn.recv()
    started = time.perf_counter()
    try:
        worker = Worker(spec)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(JobFailed(_portable(exc)))
        return
    decoder = worker.diffusion.decoder if worker.diffusion is not None else None
    device = worker.device or "unknown (the engine did not report it)"
    engine = load_engine()
    rss = psutil.Process().memory_info().rss
    conn.send(Ready(os.getpid(), device, _ms(started), rss, decoder, soft_cancel=engine.can_cancel))
    inbox = _Inbox(conn, engine)
    try:
        while (job := inbox.next_job()) is not None:
            conn.send(Accepted())
            try:
                result: object = worker.run(job, conn.send, inbox)
            except Exception as exc:  # the job fails, the worker goes on
                if not isinstance(exc, SfumatoError):
                    logger.exception("job failed in the worker of model %s", spec.model_id)
                result = JobFailed(_portable(exc))
            if inbox.job_ended():
                result = JobCancelled()
            conn.send(result)
    finally:
        worker.close()


def _exit_with_parent(interval_s: float = 1.0) -> None:
    """End this worker when the SDK process is gone, even in the middle of a job
    (a parent killed with SIGKILL never closes its pipe in an orderly way)."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="sfumato-parent-watch", daemon=True).start()


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1].isdigit():
        print("usage: python -m sfumato.runtime.worker FD (started by sfumato, not by hand)", file=sys.stderr)
        return 2
    # Ctrl-C in a terminal reaches the whole process group; the SDK process decides
    # what happens to the job (it cancels it), so the worker ignores it. (It stays in
    # its parent's group: a signal to a machine's process group, SIGSTOP or SIGKILL,
    # reaches its workers too.) One that lands before this line ends the worker while
    # it starts; the SDK process, interrupted too, reports and cleans up.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_parent()
    level = os.environ.get("SFUMATO_WORKER_LOG_LEVEL", "")
    logging.basicConfig(
        level=int(level) if level.isdigit() else logging.WARNING,
        format=f"%(name)s [worker {os.getpid()}]: %(message)s",
    )
    with Connection(int(argv[1])) as conn:
        serve(conn)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

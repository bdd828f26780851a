"""What ``diffusion()`` and ``upscale()`` hand back: a progress stream, the
outputs and the stats, each usable from blocking code and from asyncio."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sfumato.engine.requests import ProgressTick
from sfumato.errors import JobCancelledError

T = TypeVar("T")


@dataclass(frozen=True)
class DiffusionStats:
    """Performance figures of one ``diffusion()`` or ``upscale()`` call.

    Times are milliseconds. Fields that do not apply to a call are ``None``
    (an ``upscale()`` has no sampling steps).

    Attributes
    ----------
    model_load_ms:
        How long ``load_model`` took for this model.
    generation_ms:
        Time inside the engine's generation call (or the upscale passes).
    total_generation_ms:
        ``generation_ms`` plus post-processing (paired upscale, PNG encoding).
    total_wall_ms:
        From the call to the outputs being ready, queueing included.
    total_steps:
        Sampling steps run, over the whole batch.
    total_generations:
        Engine generation calls made (one per image of the batch).
    total_images, total_pixels, width, height:
        What was returned (after any upscale).
    seed:
        The seed used for the first image; image ``i`` used ``seed + i``.
    conditioning_ms, denoise_ms, vae_decode_ms, postprocess_ms:
        Phase timings: text (and init image) encoding, sampling (hires
        included), VAE decoding, and upscale + PNG encoding.
    steps_per_second:
        ``total_steps`` over the sampling time.
    decoder:
        What decoded the latents, as the engine reported at load: ``"vae"``, or
        ``"taesd"`` for the tiny autoencoder of ``model_config.taesd_src``.
    device:
        The engine device the model ran on (``"CPU"``, ``"Vulkan0"``), as the
        engine's log reported it when the model loaded.
    """

    model_load_ms: float | None = None
    generation_ms: float | None = None
    total_generation_ms: float | None = None
    total_wall_ms: float | None = None
    total_steps: int | None = None
    total_generations: int | None = None
    total_images: int | None = None
    total_pixels: int | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    conditioning_ms: float | None = None
    denoise_ms: float | None = None
    vae_decode_ms: float | None = None
    postprocess_ms: float | None = None
    steps_per_second: float | None = None
    decoder: str | None = None
    device: str | None = None


class Pending(Generic[T]):
    """A value that is not ready yet: ``.result()`` blocks, ``await`` suspends."""

    def __init__(self, future: concurrent.futures.Future[T]) -> None:
        self._future = future

    def result(self, timeout: float | None = None) -> T:
        """Block until the value is ready (or raise the job's error)."""
        return self._future.result(timeout)

    def done(self) -> bool:
        """Whether the value (or an error) is ready."""
        return self._future.done()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The job's error, or ``None`` once it succeeded."""
        return self._future.exception(timeout)

    def __await__(self) -> Generator[Any, None, T]:
        return asyncio.wrap_future(self._future).__await__()


class ProgressStream:
    """The ticks of one job, in order.

    Iterate it with ``for`` (blocking) or ``async for``; iteration ends when the
    job ends. Every iteration replays the stream from the first tick, so
    several consumers each see every tick.
    """

    def __init__(self) -> None:
        self._ticks: list[ProgressTick] = []
        self._closed = False
        self._cond = threading.Condition()

    def push(self, tick: ProgressTick) -> None:
        """Append a tick (called by the job)."""
        with self._cond:
            self._ticks.append(tick)
            self._cond.notify_all()

    def close(self) -> None:
        """End the stream (called by the job when it ends, however it ends)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def ticks(self) -> list[ProgressTick]:
        """The ticks so far."""
        with self._cond:
            return list(self._ticks)

    @property
    def ended(self) -> bool:
        """Whether the job has ended (no tick comes after the ones there are)."""
        with self._cond:
            return self._closed

    def next_tick(self, index: int, timeout: float | None = None) -> ProgressTick | None:
        """Tick number ``index`` (from 0), waiting for it; ``None`` when the job ended
        without it, or when ``timeout`` seconds passed first (:attr:`ended` tells which)."""
        with self._cond:
            self._cond.wait_for(lambda: index < len(self._ticks) or self._closed, timeout)
            return self._ticks[index] if index < len(self._ticks) else None

    def __iter__(self) -> Iterator[ProgressTick]:
        index = 0
        while (tick := self.next_tick(index)) is not None:
            yield tick
            index += 1

    async def __aiter__(self) -> AsyncIterator[ProgressTick]:
        index = 0
        while (tick := await asyncio.to_thread(self.next_tick, index)) is not None:
            yield tick
            index += 1


class DiffusionResult:
    """The handle ``diffusion()`` and ``upscale()`` return at once.

    Attributes
    ----------
    progress_stream:
        :class:`ProgressStream` of :class:`ProgressTick`.
    outputs:
        :class:`Pending` list of PNG ``bytes``: ``result.outputs.result()`` or
        ``await result.outputs``. A cancelled job raises
        :class:`~sfumato.errors.JobCancelledError` there, carrying the images
        it finished before it stopped.
    stats:
        :class:`Pending` :class:`DiffusionStats`.
    """

    def __init__(self) -> None:
        self.progress_stream = ProgressStream()
        self._outputs: concurrent.futures.Future[list[bytes]] = concurrent.futures.Future()
        self._stats: concurrent.futures.Future[DiffusionStats] = concurrent.futures.Future()
        self.outputs: Pending[list[bytes]] = Pending(self._outputs)
        self.stats: Pending[DiffusionStats] = Pending(self._stats)
        self._lock = threading.Lock()
        self._state = "queued"
        self._images: dict[int, bytes] = {}
        self._canceller: Callable[[], bool] | None = None

    @property
    def state(self) -> str:
        """``"queued"``, ``"running"``, ``"done"``, ``"failed"`` or ``"cancelled"``."""
        with self._lock:
            return self._state

    @property
    def partial_outputs(self) -> list[bytes]:
        """The PNG images finished so far (all of them once the job is done)."""
        with self._lock:
            return [self._images[i] for i in sorted(self._images)]

    def cancel(self) -> bool:
        """Stop the job: a queued one never runs, a running one is stopped at
        once (its worker process is ended). Returns whether there was a job left
        to stop; when there was, the result is in state ``"cancelled"`` on return."""
        with self._lock:
            canceller = self._canceller if self._state in ("queued", "running") else None
        return canceller is not None and canceller()

    def _bind(self, canceller: Callable[[], bool]) -> None:
        with self._lock:
            self._canceller = canceller

    def _start(self) -> None:
        with self._lock:
            if self._state == "queued":
                self._state = "running"

    def _add_image(self, index: int, png: bytes) -> None:
        with self._lock:
            self._images[index] = png

    def _end(self, state: str) -> bool:
        with self._lock:
            if self._state not in ("queued", "running"):
                return False
            self._state = state
            return True

    def _finish(self, outputs: list[bytes], stats: DiffusionStats) -> None:
        if self._end("done"):
            self._outputs.set_result(outputs)
            self._stats.set_result(stats)
        self.progress_stream.close()

    def _fail(self, error: BaseException) -> None:
        if self._end("cancelled" if isinstance(error, JobCancelledError) else "failed"):
            self._outputs.set_exception(error)
            self._stats.set_exception(error)
        self.progress_stream.close()

    def _cancelled(self, reason: str) -> None:
        self._fail(JobCancelledError(reason, self.partial_outputs))

"""The messages between the SDK process and a model's worker process.

They travel pickled over a :class:`multiprocessing.connection.Connection`. A
worker runs one job at a time, so no message carries a job id: everything the
worker sends between a :class:`RunJob` and its :class:`JobDone` or
:class:`JobFailed` belongs to that job.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sfumato.engine.requests import ContextParams, ImageRequest, ProgressTick
from sfumato.images import ImageArray


@dataclass(frozen=True)
class LoadSpec:
    """The first message to a worker: what to load.

    ``context`` is ``None`` for a standalone upscaler; ``upscaler_path`` is the
    ESRGAN, standalone or paired with the diffusion model.
    """

    model_id: str
    context: ContextParams | None
    upscaler_path: str | None
    threads: int
    tile_size: int


@dataclass(frozen=True)
class Ready:
    """The worker loaded its model: its pid, the engine device it runs on, the
    load time, its resident memory after loading, the decoder the engine built
    (``"vae"`` or ``"taesd"``; ``None`` for an upscaler alone), and whether a
    :class:`CancelJob` stops its jobs with the model kept loaded (on the CPU, with
    sfumato's engine build; else a cancel ends the worker)."""

    pid: int
    device: str
    load_ms: float
    rss_bytes: int
    decoder: str | None = None
    soft_cancel: bool = False


@dataclass(frozen=True)
class RunJob:
    """Run a generation (``request``) or a standalone upscale (``image``);
    ``repeats`` upscale passes follow each generated image."""

    request: ImageRequest | None = None
    image: ImageArray | None = None
    repeats: int = 0


@dataclass(frozen=True)
class CancelJob:
    """Stop the running job and keep the model (sent while a job runs, to a worker
    whose :class:`Ready` said ``soft_cancel``; ignored when no job runs). The worker
    ends that job with :class:`JobCancelled`."""


@dataclass(frozen=True)
class JobCancelled:
    """The running job stopped on a :class:`CancelJob`; the worker takes the next one."""


@dataclass(frozen=True)
class Accepted:
    """The worker took the job it was sent (a worker that dies before saying
    so never started it, and the job goes to its replacement)."""


@dataclass(frozen=True)
class Tick:
    """A progress report of the running job."""

    tick: ProgressTick


@dataclass(frozen=True)
class ImageDone:
    """One finished output image, as PNG, sent as soon as it is ready."""

    index: int
    png: bytes
    width: int
    height: int


@dataclass(frozen=True)
class JobDone:
    """The running job finished; its images were sent before this."""

    phase_ms: dict[str, float] = field(default_factory=dict)
    generation_ms: float = 0.0
    postprocess_ms: float = 0.0
    sampling_steps: int = 0
    seed: int | None = None


@dataclass(frozen=True)
class JobFailed:
    """The running job (or the load) raised ``error``; the worker goes on."""

    error: BaseException

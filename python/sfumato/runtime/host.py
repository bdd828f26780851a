"""Hosting a loaded model: its engine contexts and a FIFO of jobs.

Each loaded model has one job thread, so ``diffusion()`` returns at once, jobs
of one model run one after another in the order they came (the engine runs one
job per context at a time), and different models run side by side.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from sfumato.engine.context import DiffusionContext, UpscalerContext
from sfumato.errors import UnknownModelIdError
from sfumato.families.detect import ModelInfo
from sfumato.params import ModelConfig

logger = logging.getLogger("sfumato.runtime")

Job = Callable[[], None]
Reject = Callable[[BaseException], None]


@dataclass
class LoadedModel:
    """A model and what it was loaded from.

    Attributes
    ----------
    model_id:
        The id ``load_model`` returned.
    info:
        The detected family and format of ``model_src``.
    config:
        The validated ``model_config``.
    diffusion:
        The diffusion context (``None`` for a standalone upscaler).
    upscaler:
        The ESRGAN context, paired or standalone, if any.
    load_ms:
        How long loading took.
    size_multiple:
        What width and height must be multiples of for this family.
    """

    model_id: str
    info: ModelInfo
    config: ModelConfig
    diffusion: DiffusionContext | None
    upscaler: UpscalerContext | None
    load_ms: float
    size_multiple: int = 64

    def close(self) -> None:
        """Free the native contexts (the upscaler first: it refers to its parent)."""
        if self.upscaler is not None:
            self.upscaler.close()
        if self.diffusion is not None:
            self.diffusion.close()


class ModelHost:
    """Runs the jobs of one :class:`LoadedModel`, first in, first out."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self._jobs: queue.Queue[tuple[Job, Reject] | None] = queue.Queue()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"sfumato-{model.model_id[:8]}", daemon=True)
        self._thread.start()

    def submit(self, job: Job, reject: Reject) -> None:
        """Queue ``job``; ``reject`` is called instead if the model is unloaded first.

        Raises
        ------
        UnknownModelIdError
            When the model has been unloaded already.
        """
        with self._lock:
            if self._closed:
                raise UnknownModelIdError(f"model {self.model.model_id!r} has been unloaded")
            self._jobs.put((job, reject))

    def _run(self) -> None:
        while (item := self._jobs.get()) is not None:
            job, _reject = item
            try:
                job()
            except BaseException:
                logger.exception("job on model %s raised", self.model.model_id)

    def close(self) -> None:
        """Refuse new jobs, reject queued ones, wait for the running one, free the model."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending: list[tuple[Job, Reject]] = []
            while True:
                try:
                    item = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    pending.append(item)
            self._jobs.put(None)
        for _job, reject in pending:
            reject(UnknownModelIdError(f"model {self.model.model_id!r} was unloaded before the job ran"))
        self._thread.join()
        self.model.close()

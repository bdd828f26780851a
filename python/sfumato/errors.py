"""The exceptions sfumato raises.

Every error derives from :class:`SfumatoError`; each subclass also derives from
the built-in exception that fits, so ``except ValueError`` or
``except FileNotFoundError`` keeps working for callers who do not know sfumato.
"""

from __future__ import annotations


class SfumatoError(Exception):
    """Base class of every error raised by sfumato."""


class EngineNotFoundError(SfumatoError, ImportError):
    """The engine library could not be located or opened."""


class EngineABIError(SfumatoError, ImportError):
    """The engine library's struct layout differs from sfumato's declarations."""


class EngineError(SfumatoError, RuntimeError):
    """The engine reported a failure (it returned NULL or an empty image)."""


class InvalidParameterError(SfumatoError, ValueError):
    """A request field is out of range or of the wrong kind.

    Attributes
    ----------
    field:
        The name of the offending field, as the caller spelled it.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # errors cross the worker pipe pickled
        return type(self), (self.field, self.message)


class ModelNotFoundError(SfumatoError, FileNotFoundError):
    """A model source (file, folder or registry constant) is not available locally."""


class InvalidModelError(SfumatoError, ValueError):
    """A file is not a model sfumato can load: not a model, truncated, or the wrong kind."""


class UnsupportedModelError(InvalidModelError):
    """A recognised model whose family sfumato does not support yet."""


class UnknownModelIdError(SfumatoError, KeyError):
    """No model with this id is loaded (never loaded, or already unloaded)."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable.
        return str(self.args[0]) if self.args else ""


class InsufficientMemoryError(SfumatoError, MemoryError):
    """A model does not fit its device's memory budget, even with every idle model
    of that device evicted; the message names the model, the device and the sizes."""


class ClosedError(SfumatoError, RuntimeError):
    """A native handle was used after ``close()``."""


class NoUpscalerError(SfumatoError, RuntimeError):
    """Upscaling was asked of a model that was loaded without an upscaler."""


class EngineCrashedError(SfumatoError, RuntimeError):
    """The worker process hosting a model died while running a job (an engine
    abort, a segfault, or a kill from outside). Only that job fails; the model's
    worker restarts and its queued jobs run.

    Attributes
    ----------
    model_id:
        The model whose worker died.
    signal:
        The name of the signal that ended it (``"SIGABRT"``), or ``None`` when it exited.
    exit_code:
        The exit status when it exited without a signal.
    """

    def __init__(
        self, model_id: str, signal: str | None, exit_code: int | None = None, during: str = "running this job"
    ) -> None:
        how = f"was killed by {signal}" if signal else f"exited with status {exit_code}"
        super().__init__(f"the worker process of model {model_id!r} {how} while {during}")
        self.model_id = model_id
        self.signal = signal
        self.exit_code = exit_code
        self.during = during

    def __reduce__(self) -> tuple[type, tuple[str, str | None, int | None, str]]:
        return type(self), (self.model_id, self.signal, self.exit_code, self.during)


class JobCancelledError(SfumatoError, RuntimeError):
    """A job ended because it was cancelled: by ``result.cancel()``, by
    ``cancel(model_id)``, by ``unload_model``, or by its timeout.

    Attributes
    ----------
    reason:
        ``"cancelled"``, ``"timeout"`` or ``"unloaded"``.
    outputs:
        The PNG images the job had finished before it was stopped.
    """

    def __init__(self, reason: str, outputs: list[bytes] | None = None) -> None:
        done = f"; {len(outputs)} image(s) were finished before it stopped" if outputs else ""
        super().__init__(f"the job was cancelled ({reason}){done}")
        self.reason = reason
        self.outputs = list(outputs or [])

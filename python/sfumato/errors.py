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


class ClosedError(SfumatoError, RuntimeError):
    """A native handle was used after ``close()``."""


class NoUpscalerError(SfumatoError, RuntimeError):
    """Upscaling was asked of a model that was loaded without an upscaler."""

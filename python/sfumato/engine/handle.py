"""The ownership of one native pointer, shared by the engine's handle classes."""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING, Any

from sfumato.engine.library import Engine
from sfumato.errors import ClosedError

if TYPE_CHECKING:
    from typing_extensions import Self


class NativeHandle:
    """Shared ownership logic: one native pointer, freed exactly once."""

    _handle: Any = None  # NULL until opened, and again after close().
    _engine: Engine | None = None

    def _free(self, handle: Any) -> None:
        raise NotImplementedError

    @property
    def engine(self) -> Engine:
        """The engine library this handle belongs to."""
        assert self._engine is not None
        return self._engine

    def close(self) -> None:
        """Free the native handle. Safe to call more than once."""
        handle, self._handle = self._handle, None
        if handle is not None:
            self._free(handle)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run."""
        return self._handle is None

    def _require_open(self) -> Any:
        if self._handle is None:
            raise ClosedError(f"{type(self).__name__} is closed")
        return self._handle

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

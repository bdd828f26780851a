"""Routing of the engine's process-wide progress, log and preview callbacks.

The engine keeps one callback of each kind for the whole process, and
calls them long after the call that registered them returned. So the cffi
callback objects are created once, live at module level for the life of the
process, and route each event to whatever *listener* the calling thread has
installed (the job that thread is running). A Python exception raised by a
listener never reaches C: it is stored on the listener and re-raised by the
code that made the C call, once the call has returned.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import numpy as np

from sfumato.engine.library import Engine
from sfumato.images import ImageArray

logger = logging.getLogger("sfumato.engine")

_LEVELS = {0: logging.DEBUG, 1: logging.INFO, 2: logging.WARNING, 3: logging.ERROR}


class Listener(Protocol):
    """What a job provides to receive the engine's events on its thread."""

    error: BaseException | None

    def on_progress(self, step: int, steps: int, seconds_per_step: float) -> None:
        """A progress report: ``step`` of ``steps`` done."""

    def on_log(self, level: int, message: str) -> None:
        """An engine log line, without the ``file:line -`` prefix."""

    def on_preview(self, step: int, image: ImageArray) -> None:
        """A preview of sampling step ``step``: an RGB array, copied out of the engine's memory."""


_local = threading.local()
_installed_for: Engine | None = None
_install_lock = threading.Lock()
# The callback objects must outlive every C call that may use them: module level.
_callbacks: list[Any] = []


def _strip_location(text: str) -> str:
    # Engine lines read "file.cpp:123  - message\n".
    head, sep, tail = text.partition(" - ")
    if sep and ":" in head and " " not in head.strip():
        text = tail
    return text.rstrip("\n")


def _current() -> Listener | None:
    return getattr(_local, "listener", None)


def install(engine: Engine) -> None:
    """Register sfumato's callbacks with the engine (once per process)."""
    global _installed_for
    with _install_lock:
        if _installed_for is engine:
            return
        ffi, lib = engine.ffi, engine.lib

        def on_progress(step: int, steps: int, seconds: float, _data: Any) -> None:
            listener = _current()
            if listener is None or listener.error is not None:
                return
            try:
                listener.on_progress(step, steps, seconds)
            except BaseException as exc:  # noqa: BLE001 - must never unwind into C
                listener.error = exc

        def on_log(level: int, text: Any, _data: Any) -> None:
            try:
                message = _strip_location(bytes(ffi.string(text)).decode("utf-8", "replace"))
                logger.log(_LEVELS.get(int(level), logging.INFO), "%s", message)
                listener = _current()
                if listener is not None and listener.error is None:
                    listener.on_log(int(level), message)
            except BaseException as exc:  # noqa: BLE001 - must never unwind into C
                listener = _current()
                if listener is not None and listener.error is None:
                    listener.error = exc

        def on_preview(step: int, count: int, frames: Any, _noisy: bool, _data: Any) -> None:
            listener = _current()
            if listener is None or listener.error is not None or count < 1:
                return
            try:
                frame = frames[0]
                shape = (int(frame.height), int(frame.width), int(frame.channel))
                size = shape[0] * shape[1] * shape[2]
                image = np.frombuffer(ffi.buffer(frame.data, size), np.uint8).reshape(shape).copy()
                listener.on_preview(step, image)
            except BaseException as exc:  # noqa: BLE001 - must never unwind into C
                listener.error = exc

        progress_cb = ffi.callback("void(int, int, float, void*)", on_progress)
        log_cb = ffi.callback("void(enum sd_log_level_t, const char*, void*)", on_log)
        preview_cb = ffi.callback("void(int, int, sd_image_t*, bool, void*)", on_preview)
        lib.sd_set_progress_callback(progress_cb, ffi.NULL)
        lib.sd_set_log_callback(log_cb, ffi.NULL)
        _callbacks[:] = [progress_cb, log_cb, preview_cb]
        _installed_for = engine


@contextmanager
def previews(engine: Engine, mode: str | None) -> Iterator[None]:
    """Have the engine preview every sampling step of this block in ``mode``
    (``"proj"``: the latent projected to RGB, cheap; ``"vae"``: a full decode),
    reported to the thread's listener; ``None`` turns previews off."""
    ffi, lib = engine.ffi, engine.lib
    if mode is None:
        yield
        return
    preview_cb = _callbacks[2]
    lib.sd_set_preview_callback(preview_cb, getattr(lib, f"PREVIEW_{mode.upper()}"), 1, True, False, ffi.NULL)
    try:
        yield
    finally:
        lib.sd_set_preview_callback(ffi.NULL, lib.PREVIEW_NONE, 1, False, False, ffi.NULL)


@contextmanager
def listening(listener: Listener | None) -> Iterator[None]:
    """Route the engine events of this thread to ``listener`` for the block,
    then re-raise any exception the listener stored."""
    previous = _current()
    _local.listener = listener
    try:
        yield
    finally:
        _local.listener = previous
    if listener is not None and listener.error is not None:
        error, listener.error = listener.error, None
        raise error

"""A job run from a terminal: its progress bar, Ctrl-C as a cancel, and its PNGs written."""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any


class ProgressBar:
    """A tqdm bar per phase of a job."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._bar: Any = None
        self._phase = ""

    def update(self, tick: Any) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if tick.phase != self._phase:
            self.close()
            self._phase = tick.phase
            self._bar = tqdm(total=tick.total_steps, desc=tick.phase, unit="step", file=sys.stderr)
        self._bar.n = tick.step
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# Set by the CLI's Ctrl-C handler (on_ctrl_c) and never cleared: the raise of a
# KeyboardInterrupt can be swallowed (Python ignores exceptions raised in __del__
# methods and other finalizers, where a signal handler may run), the flag cannot.


_interrupted = threading.Event()
# How often a job's progress loop looks at that flag while no tick arrives.


_INTERRUPT_POLL_S = 0.1


def on_ctrl_c(_signum: int, _frame: Any) -> None:
    _interrupted.set()
    raise KeyboardInterrupt


def check_interrupt() -> None:
    """Raise the KeyboardInterrupt of a Ctrl-C whose first raise was swallowed."""
    if _interrupted.is_set():
        raise KeyboardInterrupt


def run_job(result: Any, quiet: bool, preview: Path | None = None) -> tuple[list[bytes], Any]:
    """Show the job's progress (and write each preview to ``preview``) and return its
    outputs and stats. Ctrl-C cancels the job (its worker stops at once) before the
    interrupt goes on."""
    bar = ProgressBar(not quiet)
    stream = result.progress_stream
    try:
        index = 0
        while True:
            check_interrupt()
            tick = stream.next_tick(index, _INTERRUPT_POLL_S)
            if tick is None:
                if stream.ended:
                    break
                continue
            index += 1
            bar.update(tick)
            if preview is not None and tick.preview is not None:
                preview.write_bytes(tick.preview)
        check_interrupt()
    except KeyboardInterrupt:
        result.cancel()
        raise
    finally:
        bar.close()
    return result.outputs.result(), result.stats.result()


def write_pngs(folder: Path, stem: str, outputs: list[bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, png in enumerate(outputs):
        path = folder / f"{stem}_{i}.png"
        path.write_bytes(png)
        print(path)

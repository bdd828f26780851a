"""The phases of one engine call, from its progress and log events."""

from __future__ import annotations

import re
import time

from sfumato.engine.requests import (
    PHASE_CONDITIONING,
    PHASE_HIRES,
    PHASE_SAMPLING,
    PHASE_VAE,
    Phase,
    ProgressTick,
    TickCallback,
)
from sfumato.images import ImageArray, encode_png

_DECODED = re.compile(r"^latent (\d+) decoded")


class PhaseTracker:
    """Turns the engine's progress and log events of one call into phase timings
    and phase-tagged ticks.

    The engine reports sampling steps through the progress callback and marks
    phase boundaries in its log; this pins both to the exact engine version
    sfumato requires (the ABI check guards that version).
    """

    def __init__(
        self, on_tick: TickCallback | None, batch_count: int, started: float, preview_interval: int = 1
    ) -> None:
        self._preview_interval = preview_interval
        self._preview: ImageArray | None = None
        self.error: BaseException | None = None
        self._on_tick = on_tick
        self._batch = batch_count
        self._started = started
        self._phase = PHASE_CONDITIONING
        self._phase_start = started
        self.phase_ms: dict[str, float] = {}
        self._images_sampled = 0
        self._last_steps = 0
        self.sampling_steps = 0

    def _elapsed_ms(self) -> float:
        return (time.perf_counter() - self._started) * 1000.0

    def _account(self) -> None:
        """Add the time since the current phase began (or was last accounted) to it."""
        now = time.perf_counter()
        self.phase_ms[self._phase] = self.phase_ms.get(self._phase, 0.0) + (now - self._phase_start) * 1000
        self._phase_start = now

    def _enter(self, phase: Phase) -> None:
        self._account()
        self._phase = phase

    def finish(self) -> None:
        self._account()

    def _tick(self, step: int, total: int, phase: Phase, preview: bytes | None = None) -> None:
        if self._on_tick is not None:
            self._on_tick(ProgressTick(step, total, self._elapsed_ms(), phase, preview))

    def on_preview(self, step: int, image: ImageArray) -> None:
        """The engine previews a step just before it reports the step's progress:
        keep it for that tick."""
        self._preview = image

    def on_progress(self, step: int, steps: int, seconds_per_step: float) -> None:
        if self._phase not in (PHASE_SAMPLING, PHASE_HIRES) or step <= 0:
            return
        self._last_steps = steps
        self.sampling_steps += 1
        preview, self._preview = self._preview, None
        png = None
        if preview is not None and (step % self._preview_interval == 0 or step == steps):
            png = encode_png(preview)
        self._tick(self._images_sampled * steps + step, self._batch * steps, self._phase, png)

    def on_log(self, level: int, message: str) -> None:
        if message.startswith("get_learned_condition completed"):
            self._enter(PHASE_SAMPLING)
        elif message.startswith(("sampling completed", "hires sampling ")):
            self._images_sampled += 1
        elif message.startswith("hires fix: upscaling"):
            self._images_sampled = 0
            self._enter(PHASE_HIRES)
        elif message.startswith("decoding ") and message.endswith("latents"):
            self._enter(PHASE_VAE)
        elif match := _DECODED.match(message):
            self._tick(int(match.group(1)), self._batch, PHASE_VAE)

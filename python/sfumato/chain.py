"""Jobs that run in stages on more than one model: the SDXL refiner.

The engine cannot hand latents from one model to another, so the refiner is a
second pass: the base model runs all its steps and decodes its images; the
refiner model then re-encodes each one and denoises it again from noise level
``1 - switch_at`` (img2img at ``strength = 1 - switch_at``, which runs about
``(1 - switch_at) * steps`` steps), with the same prompt and seed. Where the
base job asked for ESRGAN ``upscale`` passes, they run last, on the refined
images, with the base model's paired upscaler.

The stages run one after another on a thread of their own and report to one
:class:`~sfumato.results.DiffusionResult`: the base job's ticks as they come,
the refiner's with phase ``"refiner"`` (its VAE ticks keep ``"vae"``).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sfumato.engine.requests import PHASE_REFINER, PHASE_SAMPLING, ImageRequest, Phase
from sfumato.errors import JobCancelledError
from sfumato.images import decode_png
from sfumato.results import DiffusionResult, DiffusionStats
from sfumato.runtime.protocol import RunJob

Submit = Callable[[RunJob], DiffusionResult]
"""Queue one job on a model and return its result handle."""


@dataclass(frozen=True)
class RefinerPlan:
    """What the refiner stage needs.

    Attributes
    ----------
    base:
        Submits a job to the base model.
    refiner:
        Submits a job to the refiner model.
    request:
        The base job's request (its prompt, size, seed...).
    switch_at:
        The fraction of the denoising the base model stands for; the refiner
        re-does the rest.
    upscale_repeats:
        ESRGAN passes to run after refining (0 for none).
    """

    base: Submit
    refiner: Submit
    request: ImageRequest
    switch_at: float
    upscale_repeats: int = 0


def _sum(values: list[float | None]) -> float:
    return sum(v for v in values if v is not None)


class _Run:
    def __init__(self, plan: RefinerPlan, outer: DiffusionResult, called: float, reason: str) -> None:
        self.plan = plan
        self.outer = outer
        self.called = called
        self.reason = reason
        self.lock = threading.Lock()
        self.current: DiffusionResult | None = None
        self.stopped = False
        self.done: list[bytes] = []

    def cancel(self) -> bool:
        with self.lock:
            if self.stopped:
                return False
            self.stopped = True
            current = self.current
        if current is not None:
            current.cancel()
        self.outer._fail(JobCancelledError(self.reason, list(self.done)))
        return True

    def stage(self, job: RunJob, submit: Submit, phase: Phase | None) -> tuple[list[bytes], DiffusionStats]:
        """Run one stage, passing its ticks on; raises when it fails or was cancelled."""
        with self.lock:
            if self.stopped:
                raise JobCancelledError(self.reason, list(self.done))
            inner = self.current = submit(job)
        self.outer._start()
        for tick in inner.progress_stream:
            renamed = phase if phase is not None and tick.phase == PHASE_SAMPLING else tick.phase
            elapsed = (time.perf_counter() - self.called) * 1000.0
            self.outer.progress_stream.push(dataclasses.replace(tick, phase=renamed, elapsed_ms=elapsed))
        return inner.outputs.result(), inner.stats.result()

    def run(self) -> None:
        plan = self.plan
        try:
            base_pngs, base = self.stage(RunJob(request=plan.request), plan.base, None)
            refined: list[DiffusionStats] = []
            sizes: list[tuple[int, int]] = []
            strength = 1.0 - plan.switch_at
            for i, png in enumerate(base_pngs):
                request = dataclasses.replace(
                    plan.request,
                    init_image=decode_png(png),
                    mask_image=None,
                    strength=strength,
                    seed=plan.request.seed + i,
                    batch_count=1,
                    hires=None,
                    loras=[],
                    ref_images=(),
                )
                pngs, stats = self.stage(RunJob(request=request), plan.refiner, PHASE_REFINER)
                refined.append(stats)
                if plan.upscale_repeats:
                    pngs, stats = self.stage(
                        RunJob(image=decode_png(pngs[0]), repeats=plan.upscale_repeats), plan.base, None
                    )
                sizes.append((stats.width or 0, stats.height or 0))
                with self.lock:
                    self.done.append(pngs[0])
                    self.outer._add_image(i, pngs[0])
        except BaseException as exc:  # noqa: BLE001 - every failure ends the outer job, with its reason
            self.outer._fail(
                JobCancelledError(exc.reason, list(self.done)) if isinstance(exc, JobCancelledError) else exc
            )
            return
        steps = (base.total_steps or 0) + sum(s.total_steps or 0 for s in refined)
        denoise = _sum([base.denoise_ms, *(s.denoise_ms for s in refined)])
        stats = dataclasses.replace(
            base,
            generation_ms=_sum([base.generation_ms, *(s.generation_ms for s in refined)]),
            total_generation_ms=_sum([base.total_generation_ms, *(s.total_generation_ms for s in refined)]),
            total_wall_ms=(time.perf_counter() - self.called) * 1000.0,
            total_steps=steps,
            total_pixels=sum(w * h for w, h in sizes),
            width=sizes[-1][0],
            height=sizes[-1][1],
            conditioning_ms=_sum([base.conditioning_ms, *(s.conditioning_ms for s in refined)]),
            denoise_ms=denoise,
            vae_decode_ms=_sum([base.vae_decode_ms, *(s.vae_decode_ms for s in refined)]),
            steps_per_second=steps / (denoise / 1000.0) if denoise > 0 else None,
        )
        self.outer._finish(list(self.done), stats)


def run_with_refiner(plan: RefinerPlan, called: float, reason: str) -> DiffusionResult:
    """Start the stages of ``plan`` and return their one result handle at once.
    Cancelling it stops the stage that runs and starts no other; ``reason`` is
    the cancellation reason it reports."""
    outer = DiffusionResult()
    run = _Run(plan, outer, called, reason)
    outer._bind(run.cancel)
    threading.Thread(target=run.run, name="sfumato-refiner", daemon=True).start()
    return outer

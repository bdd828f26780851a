"""Runs the stored jobs, oldest first, on the SDK (a worker process per model): the
worker of ``sfumato worker``, and the one inside ``sfumato serve``.

The store is the queue: the runner claims the oldest queued job for a model it
serves, under a lease its heartbeat renews, reports its progress into the store
as it runs, and writes its outcome and images there. Its writes count only while
its claim owns the job: a job cancelled by request, or taken back because its
lease ran out, stops at the next step. A runner that stops gives its running job
back to the queue; one that dies leaves it to the lease's end.
"""

from __future__ import annotations

import io
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from prometheus_client import Histogram

import sfumato
from sfumato.api import diffusion_checked
from sfumato.engine.devices import check_device
from sfumato.engine.library import load_engine
from sfumato.errors import InvalidParameterError, JobCancelledError, SfumatoError
from sfumato.loading import check_precision
from sfumato.params import DiffusionParams
from sfumato.results import DiffusionResult
from sfumato.server.jobs.loads import LoadKey, load_arguments, local_files
from sfumato.server.jobs.plan import JobPlan, PlanVersionError, Upscale
from sfumato.server.jobs.store import (
    CANCEL_CHANNEL,
    CANCELLED,
    DONE,
    ERROR,
    LEASE_S,
    Claim,
    Job,
    JobStore,
    Preview,
    StoreUnavailableError,
    WorkerInfo,
)
from sfumato.server.models.catalog import AUXILIARY, UPSCALER, Catalog
from sfumato.server.settings import ServerSettings

logger = logging.getLogger("sfumato.server")

STORE_RETRY_S = 2.0
"""How often the runner tries a store it cannot reach."""

# The job-queue API's phase names, from the SDK's tick phases; with hires fix, the job-queue API
# reports "initial generation" (0-50%) and then "upscaling" (50-100%).
# A refiner pass reports "refining", and decodes once more at its end.
PHASES = {
    "sampling": "generation", "hires": "upscaling", "vae": "decoding", "upscale": "upscaling", "refiner": "refining",
}  # fmt: skip
HIRES_PHASES = {**PHASES, "sampling": "initial generation", "vae": "upscaling"}
SAMPLING_PHASES = ("sampling", "hires", "refiner")
"""The SDK's tick phases that count sampling steps."""


def progress_of(phase: str, step: int, total: int, hires: bool = False, refining: bool | None = None) -> float:
    """0-100 over the whole job: sampling is most of it, decoding the rest.
    With a refiner (``refining`` not ``None``), the base model's part spans
    0-50 and the refiner's (``refining=True``, from its first tick on) 50-100."""
    frac = step / total if total else 0.0
    if refining:
        spans = {"refiner": (50.0, 95.0), "vae": (95.0, 100.0), "upscale": (95.0, 100.0)}
    elif hires:
        spans = {"sampling": (0.0, 50.0), "hires": (50.0, 95.0), "vae": (95.0, 100.0), "upscale": (95.0, 100.0)}
    else:
        spans = {"sampling": (0.0, 90.0), "vae": (90.0, 100.0), "upscale": (90.0, 100.0)}
    low, high = spans.get(phase, (0.0, 100.0))
    pct = low + (high - low) * frac
    return round(pct / 2 if refining is False else pct, 1)


def encode_output(png: bytes, file_type: str, quality: int) -> bytes:
    """The PNG from the SDK, or the same image as JPEG (``jpg``) or WebP at ``quality``."""
    if file_type == "png":
        return png
    with Image.open(io.BytesIO(png)) as image:
        out = io.BytesIO()
        image.convert("RGB").save(out, format="JPEG" if file_type == "jpg" else file_type.upper(), quality=quality)
        return out.getvalue()


def check_runner(settings: ServerSettings) -> None:
    """Refuse, naming the flag, a lease or a job count a worker cannot run with.

    Raises
    ------
    SfumatoError
        For a lease that is not a positive number of seconds, fewer than one job at once,
        a ``--device`` this machine does not have, or a ``--precision`` it cannot run.
    """
    if not settings.lease_s > 0:
        raise SfumatoError(f"--lease: must be a positive number of seconds, got {settings.lease_s:g}")
    if settings.jobs_per_device < 1:
        raise SfumatoError(f"--jobs-per-device: must be at least 1, got {settings.jobs_per_device}")
    if settings.workers > 0:  # a front end runs no model: its machine's devices do not matter
        try:
            device = check_device(settings.device)
        except InvalidParameterError as exc:
            raise SfumatoError(f"--device: {exc.message}") from None
        try:
            check_precision(settings.precision, device, load_engine().cpu_variants, None)
        except InvalidParameterError as exc:
            raise SfumatoError(f"--precision: {exc.message}") from None


def route_of(plan: JobPlan) -> str:
    """The model name that routes a job to the workers that serve it."""
    return UPSCALER + plan.model if isinstance(plan.work, Upscale) else plan.model


@dataclass
class _Slot:
    """One of a worker's job threads: the job it holds (its claim and id), the generation
    once started, the models it uses, and its latest tick and preview (the preview kept
    after the job ends, so that a follower polling slower than the steps still gets one)."""

    claim: Claim | None = None
    job_id: str | None = None
    result: DiffusionResult | None = None
    in_use: set[str] = field(default_factory=set)
    live: dict[str, Any] = field(default_factory=dict)
    preview: Preview | None = None


class JobRunner:
    """A worker: ``jobs`` threads taking jobs from the store (one each at a time), a
    heartbeat renewing its registration and leases, and (on PostgreSQL) a listener for
    new jobs and cancels. The models it loads stay loaded."""

    def __init__(
        self,
        store: JobStore,
        catalog: Catalog,
        settings: ServerSettings,
        claimed: Histogram | None = None,
        lease_s: float = LEASE_S,
        jobs: int = 1,
    ) -> None:
        """``claimed`` observes each job's seconds from acceptance to its claim;
        ``lease_s``: how long a claim holds without a heartbeat; ``jobs``: how many jobs
        it runs at once."""
        self.store, self.catalog, self.settings, self.claimed = store, catalog, settings, claimed
        self.lease_s = lease_s
        host = socket.gethostname()
        self.id = f"{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.host, self.started = host, time.time()
        self._slots = [_Slot() for _ in range(jobs)]
        self._idle_note: str | None = None
        self._models: dict[LoadKey, str] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self.default_model: str | None = settings.default_model
        self._threads = [
            threading.Thread(target=self._loop, args=(slot,), name=f"sfumato-runner-{i}", daemon=True)
            for i, slot in enumerate(self._slots)
        ]
        self._beat_stop = threading.Event()
        self._beats = threading.Thread(target=self._heartbeats, name="sfumato-heartbeat", daemon=True)
        self._listener: threading.Thread | None = None
        listen = getattr(store, "listen", None)
        if listen is not None:
            self._listener = threading.Thread(
                target=listen, args=(self._heard, self._beat_stop), name="sfumato-listen", daemon=True
            )

    def start(self) -> None:
        """Register and take jobs (once the store can be reached)."""
        try:
            self._beat()
        except StoreUnavailableError as exc:  # the heartbeat registers it once the store is back
            logger.error("worker %s: %s; trying again", self.id, exc)
        for thread in self._threads:
            thread.start()
        self._beats.start()
        if self._listener is not None:
            self._listener.start()
        if self.store.shared:
            threading.Thread(target=self._hashing, name="sfumato-hash", daemon=True).start()

    def _hashing(self) -> None:
        """Hash the models it serves (each file once; new files as they come), then register
        their identities: a job that names one waits for a worker that has it, and
        hashing a large file never holds up the heartbeat."""
        while not self._beat_stop.is_set():
            entries = [self.catalog.entry(key) for key in self.catalog.holdings()]
            new = [e for e in entries if e is not None and self.catalog.identity(e, compute=False) is None]
            for entry in new:
                try:
                    self.catalog.identity(entry)
                except OSError as exc:  # removed or unreadable meanwhile: not registered
                    logger.warning("worker %s cannot hash %s: %s", self.id, entry.path, exc)
            if new:
                try:
                    self._beat()
                except StoreUnavailableError:
                    pass  # the heartbeat registers them once the store is back
            self._beat_stop.wait(self.lease_s / 3)

    def served(self) -> tuple[list[str], list[str]]:
        """The models this worker can serve (an upscaler as ``upscaler:NAME``) and those it has loaded."""
        models = [e.name for e in self.catalog.models()] + [UPSCALER + e.name for e in self.catalog.upscalers()]
        with self._lock:
            keys = list(self._models)
        loaded = {key.served_as for key in keys}
        return models, sorted(loaded & set(models))

    def info(self) -> tuple[WorkerInfo, dict[str, dict[str, Any]]]:
        """This worker as it registers; on a shared store, with the other files it holds,
        the identities of those hashed so far, and the facts a front end without the
        files validates requests by (by key)."""
        models, loaded = self.served()
        note = None if models else f"no model in {self.settings.models_dir}: it takes no job"
        facts = self.catalog.holdings() if self.store.shared else {}
        identities = {}
        for key in facts:
            entry = self.catalog.entry(key)
            identity = self.catalog.identity(entry, compute=False) if entry is not None else None
            if identity is not None:
                identities[key] = identity
        worker = WorkerInfo(
            id=self.id,
            host=self.host,
            pid=os.getpid(),
            started=self.started,
            last_seen=time.time(),
            running=sum(slot.claim is not None for slot in self._slots),
            slots=len(self._slots),
            models=tuple(models),
            loaded=tuple(loaded),
            note=note,
            identities=identities,
            files=tuple(key for key in facts if key.startswith(AUXILIARY)),
        )
        return worker, facts

    def _beat(self) -> None:
        """Register, renew the running jobs' leases, stop those no longer ours, and send
        back to the queue the jobs of lost workers."""
        info, facts = self.info()
        if info.note != self._idle_note:
            if info.note:
                logger.warning("worker %s: %s", self.id, info.note)
            self._idle_note = info.note
        with self._lock:
            before = [(slot.claim, slot.job_id) for slot in self._slots]
        held = self.store.heartbeat(info, self.lease_s, [job_id for _, job_id in before if job_id], facts)
        with self._lock:
            taken = [
                (slot.job_id, slot.result)
                for slot, (claim, job_id) in zip(self._slots, before, strict=True)
                if claim is not None and slot.claim is claim and job_id not in held
            ]
        for job_id, result in taken:
            if job_id is not None and result is not None:
                _give_up(job_id, result)
        again, failed = self.store.expire()
        if again or failed:
            logger.warning("queued again %d job(s) whose workers were lost; %d failed as lost", again, failed)
            self._wake.set()

    def _heartbeats(self) -> None:
        down = False
        while not self._beat_stop.wait(self.lease_s / 3):
            try:
                self._beat()
                down = False
            except StoreUnavailableError as exc:
                if not down:
                    logger.error("heartbeat: %s; trying again", exc)
                    down = True

    def _heard(self, channel: str, payload: str) -> None:
        """A notification: a new job wakes the loop; a cancel stops the job it names here."""
        if channel == CANCEL_CHANNEL:
            result = self._result_of(payload)
            if result is not None:
                result.cancel()
        else:
            self._wake.set()

    def _result_of(self, job_id: str) -> DiffusionResult | None:
        """The generation of a job running here."""
        with self._lock:
            return next((slot.result for slot in self._slots if slot.job_id == job_id), None)

    def tick_of(self, job_id: str) -> Any:
        """The latest progress tick of a job running here (``None`` elsewhere)."""
        with self._lock:
            return next((slot.live.get("tick") for slot in self._slots if slot.live.get("job_id") == job_id), None)

    def preview_of(self, job_id: str) -> Preview | None:
        """The latest preview of a job that runs (or last ran) here."""
        with self._lock:
            return next((s.preview for s in self._slots if s.preview is not None and s.preview.job_id == job_id), None)

    @property
    def running(self) -> bool:
        """Whether the runner is taking jobs."""
        return any(thread.is_alive() for thread in self._threads) and not self._stopping

    def wake(self) -> None:
        """A job was added."""
        self._wake.set()

    def stop(self) -> None:
        """Stop taking jobs and stop the running one, which goes back to the queue
        (not counted as an attempt); leave the workers' registry."""
        self._stopping = True
        self._wake.set()
        self._beat_stop.set()
        with self._lock:
            running = [slot.result for slot in self._slots if slot.result is not None]
        for result in running:
            result.cancel()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(30)
        try:
            self.store.unregister(self.id)
        except StoreUnavailableError as exc:  # its leases run out instead
            logger.warning("worker %s could not leave the registry: %s", self.id, exc)
        for model_id in self._models.values():
            if model_id in sfumato.loaded_models():
                sfumato.unload_model(model_id)

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued or running job, wherever it runs; returns whether it was active."""
        ended = self.store.end(job_id, CANCELLED, "cancelled by request")  # other workers hear of it
        result = self._result_of(job_id)
        stopped = result is not None and result.cancel()
        return ended or stopped

    def unload_idle(self, which: Callable[[LoadKey], bool] = lambda key: True) -> list[LoadKey]:
        """Unload the loaded models no job is running on (of those whose key ``which``
        accepts); their workers end. Returns their keys."""
        with self._lock:
            busy = set().union(*(slot.in_use for slot in self._slots))
            idle = {key: model_id for key, model_id in self._models.items() if model_id not in busy and which(key)}
            for key in idle:
                del self._models[key]
        for model_id in idle.values():
            if model_id in sfumato.loaded_models():
                sfumato.unload_model(model_id)
        return list(idle)

    def load(self, key: LoadKey, job: _Slot | None = None) -> str:
        """The SDK id of the model ``key`` names, loading it the first time (and unloading
        the idle worker of the same model with another VAE or paired ESRGAN); ``job``: the
        slot whose running job uses it (it is not idle)."""
        path, config = load_arguments(self.catalog, self.settings, key)
        with self._lock:
            model_id = self._models.get(key)
            if model_id is not None and job is not None:
                job.in_use.add(model_id)
        if model_id is None or model_id not in sfumato.loaded_models():
            self.unload_idle(lambda other: other != key and other.same_model(key))
            model_id = sfumato.load_model(path, model_config=config)
            with self._lock:
                self._models[key] = model_id
                if job is not None:
                    job.in_use.add(model_id)
        return model_id

    def _loop(self, slot: _Slot) -> None:
        down = False
        while not self._stopping:
            try:
                models, loaded = self.served()
                # On one machine's store this is the only worker: it takes every job, and
                # fails one whose model left its folder; on a shared one, only its models'.
                serves = models if self.store.shared else None
                job = self.store.claim(self.id, serves, loaded, self.lease_s) if serves != [] else None
                if down:
                    logger.warning("the job store is reachable again; taking jobs")
                    down = False
                if job is None:
                    self._wake.wait(1.0)
                    self._wake.clear()
                    continue
                if self.claimed is not None and job.started is not None:
                    self.claimed.observe(max(0.0, job.started - job.created))
                with self._lock:
                    slot.claim, slot.job_id = job.claim, job.id
                try:
                    self._run(job, job.claim, slot)
                except StoreUnavailableError:
                    raise
                except Exception as exc:  # the job fails; the server goes on
                    logger.exception("job %s failed", job.id)
                    self.store.end(job.id, ERROR, f"internal error: {type(exc).__name__}: {exc}", claim=job.claim)
                finally:
                    with self._lock:
                        slot.claim, slot.job_id = None, None
            except StoreUnavailableError as exc:
                # A job it was running stays 'processing' there, until its lease runs out.
                if not down:
                    logger.error("%s; trying again every %.0f s", exc, STORE_RETRY_S)
                    down = True
                self._wake.wait(STORE_RETRY_S)
                self._wake.clear()

    def _write(self, job_id: str, pngs: list[bytes], plan: JobPlan) -> tuple[list[str], list[bytes]]:
        """Encode a job's images as the plan asks and save them in this machine's outputs
        folder; returns their paths and bytes (which the store keeps for every front end)."""
        file_type, quality = plan.file_type, plan.jpeg_quality
        self.settings.outputs_dir.mkdir(parents=True, exist_ok=True)
        paths, encoded = [], []
        for i, png in enumerate(pngs):
            path = self.settings.outputs_dir / output_name(job_id, i, file_type)
            encoded.append(encode_output(png, file_type, quality))
            path.write_bytes(encoded[-1])
            paths.append(str(path))
        return paths, encoded

    def _memory_mb(self, model_id: str) -> float:
        status = next((s for s in sfumato.models_info() if s.model_id == model_id), None)
        return round(status.rss_bytes / 2**20, 2) if status else 0.0

    def _run(self, job: Job, claim: Claim, slot: _Slot) -> None:
        try:
            plan = JobPlan.from_json(job.request["plan"])
        except PlanVersionError as exc:
            self.store.end(job.id, ERROR, str(exc), claim=claim)
            return
        work = plan.work
        upscale_only = isinstance(work, Upscale)
        try:
            slot.preview = None
            self.store.progress(job.id, 0.0, "loading model", claim)
            key = LoadKey(plan.model, upscale_only, plan.control_net, plan.vae, plan.esrgan)
            model_id = self.load(key, job=slot)
            before = self._memory_mb(model_id)
            refining: bool | None = None
            refiner = None
            if plan.refiner is not None:
                self.store.progress(job.id, 0.0, "loading refiner", claim)
                refiner_id = self.load(LoadKey(plan.refiner.model), job=slot)
                refiner = {"model_id": refiner_id, "switch_at": plan.refiner.switch_at}
                refining = False
            started = time.perf_counter()
            if isinstance(work, Upscale):
                result = sfumato.upscale(model_id, image=work.image, repeats=work.repeats)
            else:  # checked when the plan was made: the engine request is built without a second check
                result = diffusion_checked(model_id, local_files(self.catalog, work), refiner=refiner)
            with self._lock:
                slot.result = result
            if self._stopping or not self.store.progress(job.id, 0.0, "starting", claim):
                result.cancel()  # stopping, or cancelled while its model loaded
            self._follow(
                job.id,
                claim,
                slot,
                result,
                started,
                isinstance(work, DiffusionParams) and work.hires is not None,
                refining,
            )
            pngs = result.outputs.result()
            stats = result.stats.result()
        except JobCancelledError as exc:
            if not self._stopping:  # keep the images it finished (refused if the job is no longer its)
                paths, encoded = self._write(job.id, exc.outputs, plan)
                result_of = {"output_paths": paths} if paths else None
                if not self.store.end(job.id, CANCELLED, str(exc), result=result_of, claim=claim, images=encoded):
                    _discard(job.id, paths)
            return
        except StoreUnavailableError:
            # Its outcome could not be written: stop it; the store has it running until its
            # lease runs out, and then it runs again (here or elsewhere).
            if slot.result is not None:
                slot.result.cancel()
            raise
        except SfumatoError as exc:
            self.store.end(job.id, ERROR, str(exc), claim=claim)
            return
        finally:
            with self._lock:
                slot.live, slot.result = {}, None
                slot.in_use.clear()
        done: dict[str, Any] = {
            "width": stats.width,
            "height": stats.height,
            "seed": stats.seed,
            "file_type": plan.file_type,
            "jpeg_quality": plan.jpeg_quality,
            "generation_time_sec": round(time.perf_counter() - started, 3),
            "memory_before_mb": before,
            "memory_after_mb": self._memory_mb(model_id),
            "decoder": stats.decoder,
            "device": stats.device,
            "worker": self.id,
        }
        paths, encoded = self._write(job.id, pngs, plan)
        if not self.store.end(job.id, DONE, claim=claim, images=encoded, result={"output_paths": paths, **done}):
            _discard(job.id, paths)

    def _follow(
        self,
        job_id: str,
        claim: Claim,
        slot: _Slot,
        result: DiffusionResult,
        started: float,
        hires: bool,
        refining: bool | None,
    ) -> None:
        """Report a running job's ticks: its progress and phase (at least every percent,
        and every sampling step), its live previews; stop it once the job is no longer
        this worker's. ``refining`` is ``False`` while a refiner pass is still to come."""
        last, step = -1.0, 0
        names = HIRES_PHASES if hires else PHASES
        for tick in result.progress_stream:
            slot.live = {"job_id": job_id, "tick": tick, "started": started}
            if tick.preview is not None:
                serial = slot.preview.serial + 1 if slot.preview is not None else 1
                slot.preview = Preview(job_id, serial, tick.step, tick.total_steps, tick.preview)
                if self.store.shared:  # front ends on other machines show it too
                    self.store.put_preview(slot.preview)
            if refining is False and tick.phase == "refiner":
                refining = True
            pct = progress_of(tick.phase, tick.step, tick.total_steps, hires, refining)
            sampling = tick.phase in SAMPLING_PHASES
            if pct - last >= 1.0 or tick.step == tick.total_steps or (sampling and tick.step != step):
                step = tick.step if sampling else 0
                steps = tick.total_steps if sampling else 0
                if not self.store.progress(job_id, pct, names.get(tick.phase, tick.phase), claim, step, steps):
                    _give_up(job_id, result)
                last = pct


def _give_up(job_id: str, result: DiffusionResult) -> None:
    """Stop a job this worker no longer holds (cancelled by request, or taken back when its
    lease ran out): nothing it writes for it counts any more."""
    if result.cancel():
        logger.warning("job %s is no longer this worker's (cancelled, or its lease ran out): stopping it", job_id)


def _discard(job_id: str, paths: list[str]) -> None:
    """A result the store refused (the job is no longer this worker's): its files go."""
    logger.warning("job %s: the store refused this worker's result: the job is no longer its", job_id)
    for path in paths:
        Path(path).unlink(missing_ok=True)


def output_name(job_id: str, index: int, file_type: str) -> str:
    """The file name of a job's ``index``-th image (ComfyUI's ``/view`` names it so)."""
    return f"{job_id}.{file_type}" if index == 0 else f"{job_id}-{index}.{file_type}"

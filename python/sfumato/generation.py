"""What ``diffusion`` and ``upscale`` hand a model's worker, and how its answers reach
the caller: the engine request built from validated parameters (sizes, source images,
LoRA files, hires), and the :class:`~sfumato.results.DiffusionResult` a job reports to."""

from __future__ import annotations

import dataclasses
import secrets
import time
from pathlib import Path
from typing import cast

from PIL import Image

from sfumato import images as imaging
from sfumato.engine.requests import (
    PHASE_CONDITIONING,
    PHASE_HIRES,
    PHASE_SAMPLING,
    PHASE_VAE,
    HiresParams,
    ImageRequest,
    PreviewMode,
    ProgressTick,
)
from sfumato.errors import InvalidParameterError
from sfumato.families.detect import FAMILY_ESRGAN, FAMILY_FLUX2, check_lora_file
from sfumato.families.embeddings import refuse_skipped
from sfumato.images import ImageArray
from sfumato.loading import detect_family, resolve_source
from sfumato.params import (
    CACHE_PRESETS,
    DEFAULT_CFG_SCALE,
    DEFAULT_SIZE,
    FAMILY_CFG_SCALE,
    HIRES_UPSCALERS,
    LORA_SUFFIXES,
    DiffusionParams,
    check_flow_shift,
    check_hires,
    check_images,
    check_loras,
    check_side,
)
from sfumato.results import DiffusionResult, DiffusionStats
from sfumato.runtime.host import REASON_CANCELLED, CancelReason, HostJob, LoadedModel, ModelHost
from sfumato.runtime.protocol import ImageDone, JobDone, Ready, RunJob


def _elapsed_ms(since: float) -> float:
    """Milliseconds since ``since`` (a ``time.perf_counter()`` reading)."""
    return (time.perf_counter() - since) * 1000.0


class Report:
    """Hands one job's events to its :class:`DiffusionResult`."""

    def __init__(self, result: DiffusionResult, called: float, upscale_only: bool) -> None:
        self.result = result
        self.called = called
        self.upscale_only = upscale_only
        self.sizes: dict[int, tuple[int, int]] = {}

    def started(self) -> None:
        self.result._start()

    def tick(self, tick: ProgressTick) -> None:
        self.result.progress_stream.push(dataclasses.replace(tick, elapsed_ms=_elapsed_ms(self.called)))

    def image(self, image: ImageDone) -> None:
        self.sizes[image.index] = (image.width, image.height)
        self.result._add_image(image.index, image.png)

    def failed(self, error: BaseException) -> None:
        self.result._fail(error)

    def cancelled(self, reason: CancelReason) -> None:
        self.result._cancelled(reason)

    def finished(self, done: JobDone, ready: Ready) -> None:
        pngs = self.result.partial_outputs
        width, height = self.sizes[0]
        common = dict(
            model_load_ms=ready.load_ms,
            generation_ms=done.generation_ms,
            total_generation_ms=done.generation_ms + done.postprocess_ms,
            total_wall_ms=_elapsed_ms(self.called),
            total_images=len(pngs),
            total_pixels=sum(w * h for w, h in self.sizes.values()),
            width=width,
            height=height,
            device=ready.device,
        )
        if self.upscale_only:
            stats = DiffusionStats(**common, postprocess_ms=done.generation_ms + done.postprocess_ms)  # type: ignore[arg-type]
        else:
            denoise_ms = done.phase_ms.get(PHASE_SAMPLING, 0.0) + done.phase_ms.get(PHASE_HIRES, 0.0)
            stats = DiffusionStats(
                **common,  # type: ignore[arg-type]
                total_steps=done.sampling_steps,
                total_generations=len(pngs),
                seed=done.seed,
                conditioning_ms=done.phase_ms.get(PHASE_CONDITIONING, 0.0),
                denoise_ms=denoise_ms,
                vae_decode_ms=done.phase_ms.get(PHASE_VAE, 0.0),
                postprocess_ms=done.postprocess_ms,
                steps_per_second=done.sampling_steps / (denoise_ms / 1000.0) if denoise_ms > 0 else None,
                decoder=ready.decoder,
            )
        self.result._finish(pngs, stats)


def check_timeout(timeout: object) -> None:
    """``timeout``: ``None`` or a positive number of seconds."""
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise InvalidParameterError("timeout", f"must be a positive number of seconds or None, got {timeout!r}")


def submit(host: ModelHost, run: RunJob, called: float, timeout: float | None) -> DiffusionResult:
    """Queue ``run`` on ``host``; its :class:`DiffusionResult` at once."""
    check_timeout(timeout)
    result = DiffusionResult()
    job = HostJob(run, Report(result, called, run.request is None), timeout)
    result._bind(lambda: host.cancel(job, REASON_CANCELLED))
    host.submit(job)
    return result


def _sources(params: DiffusionParams, model: LoadedModel) -> tuple[ImageArray | None, list[ImageArray]]:
    """The img2img source and the reference images, by :func:`check_images`' rules."""
    check_images(params, model.info, model.config.prediction, model.config.control_net_src is not None)
    check_flow_shift(params, model.info, model.config.prediction)
    source = None
    if params.init_image is not None:
        source = imaging.to_array(params.init_image, "init_image")
    references = [imaging.to_array(image, f"init_images[{i}]") for i, image in enumerate(params.init_images)]
    if model.info.family == FAMILY_FLUX2:
        references = ([source] if source is not None else []) + references
        source = None
    elif model.info.variant == "pix2pix" and not references:
        references = [source] if source is not None else []  # it edits the img2img source (A1111's img2img)
    return source, references


_AS_GIVEN = (
    *("prompt", "negative_prompt", "steps", "guidance", "clip_skip", "eta", "img_cfg_scale", "flow_shift"),
    *("scheduler",),
    *("batch_count", "strength", "vae_tiling", "control_strength", "preview_interval"),
)
"""The params the engine's request takes as they are, under the same names."""


def image_request(params: DiffusionParams, model: LoadedModel, refiner: LoadedModel | None = None) -> ImageRequest:
    """The engine's request for validated ``params`` on a loaded ``model``: the
    FLUX.2 reference rules, the size (given, else the source image's, else the
    default; a multiple of what both models take), the source and mask resized to
    it, LoRA files and hires resolved, the family's cfg default and a drawn seed.

    Raises
    ------
    InvalidParameterError
        Naming the field at fault.
    """
    prompts = {"prompt": params.prompt, "negative_prompt": params.negative_prompt}
    refuse_skipped(prompts, model.skipped_embeddings, "this model")
    if params.preview == "tae" and model.config.taesd_src is None:
        raise InvalidParameterError("preview", "'tae' needs a tiny autoencoder: load the model with its taesd_src")
    source, references = _sources(params, model)
    first = source if source is not None else (references[0] if references else None)
    w = params.width or (first.shape[1] if first is not None else DEFAULT_SIZE)
    h = params.height or (first.shape[0] if first is not None else DEFAULT_SIZE)
    multiple = max(model.size_multiple, refiner.size_multiple if refiner else 1)
    check_side("width", w, multiple)
    check_side("height", h, multiple)
    if source is not None:
        source = imaging.resize(source, w, h)
    mask_array = None
    if params.mask is not None:
        # Bilinear: a mask must not ring past its edges as Lanczos would.
        grey = imaging.to_array(params.mask, "mask", mode="L")
        mask_array = imaging.resize(grey, w, h, Image.Resampling.BILINEAR)
    control = None
    if params.control_image is not None:
        control = imaging.resize(imaging.to_array(params.control_image, "control_image"), w, h)
    return ImageRequest(
        **{name: getattr(params, name) for name in _AS_GIVEN},
        width=w,
        height=h,
        cfg_scale=FAMILY_CFG_SCALE.get(model.info.family, DEFAULT_CFG_SCALE)
        if params.cfg_scale is None
        else params.cfg_scale,
        sample_method=params.sampling_method,
        seed=params.seed if params.seed >= 0 else secrets.randbelow(2**31),
        init_image=source,
        mask_image=mask_array,
        control_image=control,
        ref_images=references,
        preview=cast("PreviewMode | None", params.preview),
        hires=engine_hires(params.hires),
        loras=lora_files(params.loras, model.config.lora_dir),
        cache_threshold=CACHE_PRESETS[params.cache_preset] if params.cache_preset else None,
    )


def lora_files(value: object, folder: Path | None) -> list[tuple[str, float]]:
    """``loras`` as ``(file, scale)``: names are matched against the folder's
    listing (never joined onto it); every file must hold LoRA tensors."""
    out = []
    for i, (item, scale) in enumerate(check_loras("loras", value)):
        field = f"loras[{i}]"
        path = Path(item).expanduser()
        if not path.is_absolute():
            if folder is None:
                raise InvalidParameterError(
                    field, f"{item!r} is a name; set model_config.lora_dir, or give an absolute path"
                )
            listing = {p.stem: p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in LORA_SUFFIXES}
            listing.update({p.name: p for p in listing.values()})
            if str(item) not in listing:
                have = ", ".join(sorted(p.stem for p in set(listing.values()))) or "none"
                raise InvalidParameterError(field, f"no LoRA named {str(item)!r} in {folder}; available: {have}")
            path = listing[str(item)]
        check_lora_file(path, field)
        out.append((str(path), scale))
    return out


def engine_hires(value: object) -> HiresParams | None:
    """``hires`` in engine terms; an ESRGAN upscaler is resolved and checked from its header."""
    config = check_hires("hires", value)
    if config is None:
        return None
    upscaler, model_path = config.upscaler, None
    if not (isinstance(upscaler, str) and upscaler in HIRES_UPSCALERS):
        path, _ = resolve_source(upscaler, "hires.upscaler")
        hint = f"hires.upscaler takes one of {', '.join(HIRES_UPSCALERS)} or an ESRGAN model"
        detect_family(path, "hires.upscaler", (FAMILY_ESRGAN,), hint)
        upscaler, model_path = "Model", str(path)
    return HiresParams(**(dataclasses.asdict(config) | {"upscaler": upscaler, "model_path": model_path}))

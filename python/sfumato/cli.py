"""The ``sfumato`` command: ``generate``, ``upscale``, ``serve``, ``info``, ``models``.

Flags carry the SDK's field names (``--cfg-scale`` is ``cfg_scale``) and take
their defaults from :class:`sfumato.params.DiffusionParams`, so the CLI, the SDK
and the HTTP schemas agree.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from sfumato.engine.cpu_variants import VariantTiming
from sfumato.engine.kernels import PRECISIONS
from sfumato.engine.requests import PREVIEW_MODES
from sfumato.errors import JobCancelledError, SfumatoError
from sfumato.families.companions import ROLES
from sfumato.params import (
    CACHE_PRESETS,
    PREDICTION_NAMES,
    REFINER_SWITCH_AT,
    RNG_NAMES,
    SAMPLING_METHODS,
    SCHEDULER_NAMES,
    WEIGHT_TYPE_NAMES,
    DiffusionParams,
    HiresConfig,
    ModelConfig,
    UpscalerConfig,
)
from sfumato.presets import PRESETS
from sfumato.server.settings import PREVIEW_METHODS, ServerSettings

DEFAULT_MODEL = "SD_V2_1_1B_Q8_0"
DEFAULT_UPSCALER = "REALESRGAN_X4PLUS"
DEFAULT_PROMPT = "a lighthouse on a rocky coast at dawn, oil painting"

_D = DiffusionParams(prompt=DEFAULT_PROMPT)
_M = ModelConfig()
_H = HiresConfig()
_U = UpscalerConfig()


def _model_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model_config")
    group.add_argument(
        "--device", default=_M.device, help=f"auto, cpu, gpu or an engine device name (default: {_M.device})"
    )
    group.add_argument(
        "--cpu-variant", default=_M.cpu_variant,
        help="the engine build's CPU variant (haswell, skylakex, zen4) or auto: the fastest by a probe (default)",
    )  # fmt: skip
    group.add_argument("--threads", type=int, default=_M.threads, help="CPU threads (default: physical cores)")
    group.add_argument(
        "--flash-attn", action="store_true", default=_M.flash_attn, help="flash attention (slower on CPU)"
    )
    group.add_argument(
        "--conv-direct", action="store_true", default=_M.conv_direct, help="direct convolutions in the UNet and VAE"
    )
    group.add_argument(
        "--offload-to-cpu", action="store_true", default=_M.offload_to_cpu,
        help="keep the weights in RAM, each part copied to the device when it runs",
    )  # fmt: skip
    group.add_argument(
        "--keep-clip-on-cpu", action="store_true", default=_M.keep_clip_on_cpu, help="text encoders on the CPU"
    )
    group.add_argument("--keep-vae-on-cpu", action="store_true", default=_M.keep_vae_on_cpu, help="the VAE on the CPU")
    group.add_argument(
        "--max-vram", type=float, default=_M.max_vram, metavar="GIB",
        help="device memory a graph may take before the engine splits it (default: 0, never)",
    )  # fmt: skip
    group.add_argument("--rng", choices=RNG_NAMES, default=_M.rng, help="noise generator (cpu: as torch on CPU)")
    group.add_argument(
        "--weight-type", choices=WEIGHT_TYPE_NAMES, default=_M.weight_type, help="convert weights at load"
    )
    group.add_argument(
        "--precision", choices=PRECISIONS, default=_M.precision,
        help="CPU arithmetic: exact (f32) or bf16 (CPUs with AVX512-BF16 or AMX; weights converted to bf16)",
    )  # fmt: skip
    group.add_argument("--prediction", choices=list(PREDICTION_NAMES), default=_M.prediction)
    group.add_argument("--vae", dest="vae_model_src", default=_M.vae_model_src, help="a separate VAE file")
    group.add_argument(
        "--clip-l", dest="clip_l_model_src", default=_M.clip_l_model_src, help="CLIP-L text encoder (SDXL, SD3, FLUX.1)"
    )
    group.add_argument(
        "--clip-g", dest="clip_g_model_src", default=_M.clip_g_model_src, help="CLIP-G text encoder (SDXL, SD3)"
    )
    group.add_argument(
        "--t5xxl", dest="t5xxl_model_src", default=_M.t5xxl_model_src, help="T5-XXL text encoder (SD3, FLUX.1)"
    )
    group.add_argument(
        "--llm", dest="llm_model_src", default=_M.llm_model_src, help="Qwen3 text encoder (FLUX.2 [klein])"
    )
    group.add_argument(
        "--embedding-dir", default=_M.embedding_dir, help="a folder of textual-inversion embeddings (.pt, .safetensors)"
    )
    group.add_argument(
        "--control-net", dest="control_net_src", default=_M.control_net_src, help="a ControlNet for --control-image"
    )
    group.add_argument(
        "--taesd", dest="taesd_src", default=_M.taesd_src, help="a tiny autoencoder that decodes in the VAE's place"
    )
    group.add_argument(
        "--taesd-preview-only",
        action="store_true",
        default=_M.taesd_preview_only,
        help="the --taesd autoencoder only draws previews (--preview tae); the VAE decodes the images",
    )
    group.add_argument(
        "--tile-size", type=int, default=_U.tile_size, help=f"ESRGAN tile size (default: {_U.tile_size})"
    )
    group.add_argument(
        "--lora-dir", dest="lora_dir", default=_M.lora_dir, help="folder that --lora names are looked up in"
    )


def _generation_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("diffusion")
    g.add_argument("--prompt", "-p", default=_D.prompt)
    g.add_argument("--negative-prompt", default=_D.negative_prompt)
    g.add_argument("--width", "-W", type=int, default=_D.width, help="default: 512, or the init image's width")
    g.add_argument("--height", "-H", type=int, default=_D.height, help="default: 512, or the init image's height")
    g.add_argument("--steps", type=int, default=_D.steps)
    g.add_argument("--cfg-scale", type=float, default=_D.cfg_scale, help="default: 7, or 1 for FLUX.1 and FLUX.2")
    g.add_argument(
        "--clip-skip", type=int, default=_D.clip_skip, help="2 skips CLIP's last layer (default: the family's)"
    )
    g.add_argument(
        "--eta", type=float, default=_D.eta, help="noise of euler_a / ddim_trailing / tcd (default: engine's)"
    )
    g.add_argument("--img-cfg-scale", type=float, default=_D.img_cfg_scale, help="image guidance (instruct-pix2pix)")
    g.add_argument("--guidance", type=float, default=_D.guidance)
    g.add_argument("--sampling-method", choices=SAMPLING_METHODS, default=_D.sampling_method)
    g.add_argument("--scheduler", choices=SCHEDULER_NAMES, default=_D.scheduler)
    g.add_argument("--seed", type=int, default=_D.seed, help="-1 picks one (reported in the stats)")
    g.add_argument("--batch-count", type=int, default=_D.batch_count)
    g.add_argument("--vae-tiling", action="store_true", default=_D.vae_tiling)
    g.add_argument("--cache-preset", choices=list(CACHE_PRESETS), default=_D.cache_preset)
    g.add_argument("--init-image", default=_D.init_image, help="an image file: img2img")
    g.add_argument(
        "--ref-image",
        "--init-images",
        dest="init_images",
        action="append",
        default=[],
        help="a further FLUX.2 reference image (repeat the flag for more)",
    )
    g.add_argument("--mask", default=_D.mask, help="a mask image for --init-image: white is painted anew")
    g.add_argument("--strength", type=float, default=_D.strength)
    g.add_argument("--control-image", default=_D.control_image, help="an image file that guides --control-net")
    g.add_argument(
        "--preview",
        choices=PREVIEW_MODES,
        default=_D.preview,
        help="write the forming image to OUTPUT/sfumato_preview.png",
    )
    g.add_argument(
        "--preview-interval", type=int, default=_D.preview_interval, help="preview every N steps (default 1)"
    )
    g.add_argument(
        "--control-strength", type=float, default=_D.control_strength, help="ControlNet strength, 0..2 (default: 0.9)"
    )
    g.add_argument(
        "--lora", "--loras", dest="loras", action="append", default=[], metavar="NAME[:SCALE]",
        help="apply a LoRA (a name in --lora-dir or a path; scale default 1); repeatable",
    )  # fmt: skip
    g.add_argument("--hires", action="store_true", help="hires fix: a second pass at --hires-scale times the size")
    g.add_argument("--hires-scale", type=float, default=_H.scale, help=f"hires size factor (default: {_H.scale:g})")
    g.add_argument(
        "--hires-upscaler",
        default=_H.upscaler,
        help=f"a latent mode, Lanczos, Nearest or an ESRGAN file (default: {_H.upscaler})",
    )
    g.add_argument("--hires-steps", type=int, default=_H.steps, help="hires steps (default 0: --steps)")
    g.add_argument(
        "--hires-strength",
        type=float,
        default=_H.denoising_strength,
        help=f"hires denoising strength (default: {_H.denoising_strength:g})",
    )
    g.add_argument(
        "--upscale", type=int, nargs="?", const=1, default=None, metavar="REPEATS",
        help="run the paired ESRGAN (--upscaler) REPEATS times (default 1 when given)",
    )  # fmt: skip


def build_parser(preset: Mapping[str, Any] | None = None) -> argparse.ArgumentParser:
    """The argument parser of the ``sfumato`` command; ``preset`` (one of
    :data:`sfumato.presets.PRESETS`) replaces the defaults of ``generate``."""
    parser = argparse.ArgumentParser(prog="sfumato", description="Local image generation on stable-diffusion.cpp")
    parser.add_argument("--verbose", "-v", action="store_true", help="show the engine's log")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate images from a prompt (or an init image)")
    gen.add_argument(
        "--model", "-m", default=DEFAULT_MODEL, help=f"file, folder or registry constant (default: {DEFAULT_MODEL})"
    )
    gen.add_argument("--upscaler", default=None, help="an ESRGAN to pair with the model, for --upscale")
    gen.add_argument("--refiner", default=None, help="a second model that refines each image (all-in-one file)")
    gen.add_argument(
        "--refiner-switch-at",
        type=float,
        default=REFINER_SWITCH_AT,
        help=f"the fraction of denoising the base does (default: {REFINER_SWITCH_AT})",
    )
    gen.add_argument(
        "--preset", choices=list(PRESETS), default=None, help="settings of a distilled model; other flags override them"
    )
    gen.add_argument("--output", "-o", type=Path, default=Path("."), help="folder for the PNGs (default: .)")
    gen.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    gen.add_argument("--timeout", type=float, default=None, help="stop the job after this many seconds of running")
    _model_flags(gen)
    _generation_flags(gen)

    up = sub.add_parser("upscale", help="upscale an image with an ESRGAN")
    up.add_argument("image", type=Path)
    up.add_argument(
        "--model", "-m", default=DEFAULT_UPSCALER, help=f"ESRGAN file or constant (default: {DEFAULT_UPSCALER})"
    )
    up.add_argument("--repeats", type=int, default=1)
    up.add_argument("--output", "-o", type=Path, default=None, help="output PNG (default: IMAGE-upscaled.png)")
    up.add_argument("--quiet", "-q", action="store_true")
    up.add_argument("--timeout", type=float, default=None, help="stop the job after this many seconds of running")
    _model_flags(up)

    srv = sub.add_parser("serve", help="run the HTTP server (job queue API; see the README)")
    defaults = ServerSettings()
    srv.add_argument("--host", default=defaults.host, help=f"default: {defaults.host}")
    srv.add_argument("--port", type=int, default=defaults.port, help=f"default: {defaults.port}")
    wrk = sub.add_parser("worker", help="run jobs from a PostgreSQL job store that sfumato serve front ends share")
    for command in (srv, wrk):
        _folder_flags(command, defaults)
    srv.add_argument(
        "--workers", type=int, choices=(0, 1), default=defaults.workers,
        help="1: run jobs in this server (default); 0: a front end for sfumato worker processes (PostgreSQL only)",
    )  # fmt: skip
    srv.add_argument("--default-model", default=None, help="model name used when a request names none")
    srv.add_argument("--queue-size", type=int, default=defaults.queue_size, help="max jobs waiting or running")
    srv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set SFUMATO_API_KEY)")
    srv.add_argument("--retention-hours", type=float, default=defaults.retention_s / 3600, help="keep finished jobs")
    srv.add_argument(
        "--preview-method", choices=PREVIEW_METHODS, default=defaults.preview_method,
        help="live previews of ComfyUI API prompts, as ComfyUI's flag (default: none)",
    )  # fmt: skip
    srv.add_argument(
        "--max-pixels", type=int, default=defaults.max_pixels, help="largest width x height one image may have"
    )
    srv.add_argument("--max-steps", type=int, default=defaults.max_steps, help="most sampling steps per image")
    srv.add_argument("--max-images", type=int, default=defaults.max_images, help="most images per request")
    srv.add_argument(
        "--allow-private-urls", action="store_true", help="let url_upload fetch loopback and private addresses"
    )

    if preset:
        gen.set_defaults(**preset)
    info = sub.add_parser("info", help="engine version, library path, system info and devices")
    info.add_argument("--json", action="store_true")
    sub.add_parser("models", help="list the registry constants and whether they are cached")
    return parser


def _folder_flags(command: argparse.ArgumentParser, defaults: ServerSettings) -> None:
    """The flags ``serve`` and ``worker`` share: the folders, the store, the lease, threads."""
    command.add_argument("--models", type=Path, default=defaults.models_dir, help="models folder (default: ./models)")
    command.add_argument("--loras", type=Path, default=defaults.loras_dir, help="LoRA folder (default: ./loras)")
    command.add_argument("--upscalers", type=Path, default=defaults.upscalers_dir, help="default: ./upscalers")
    command.add_argument(
        "--controlnets", type=Path, default=defaults.controlnets_dir, help="ControlNet folder (./controlnets)"
    )
    command.add_argument(
        "--config", type=Path, default=None, metavar="TOML",
        help="models config: models made of several files, per-model defaults (default: models.toml in --models)",
    )  # fmt: skip
    command.add_argument(
        "--vaes", type=Path, default=defaults.vaes_dir, help="separate VAE files models may decode with (./vaes)"
    )
    command.add_argument(
        "--embeddings", type=Path, default=defaults.embeddings_dir, help="textual-inversion embeddings (./embeddings)"
    )
    command.add_argument(
        "--data", type=Path, default=defaults.data_dir, help="job store and outputs/ folder (default: ./sfumato-data)"
    )
    command.add_argument(
        "--store", default=None, metavar="URL",
        help="the job store: postgresql://... (or set SFUMATO_STORE); default: SQLite in --data",
    )  # fmt: skip
    command.add_argument(
        "--lease", type=float, default=defaults.lease_s, metavar="SECONDS",
        help=f"how long a worker's claim holds without its heartbeat (default: {defaults.lease_s:g})",
    )  # fmt: skip
    command.add_argument(
        "--jobs-per-device", type=int, default=defaults.jobs_per_device, metavar="N",
        help=f"jobs run at once on this worker's device (default: {defaults.jobs_per_device})",
    )  # fmt: skip
    command.add_argument("--threads", type=int, default=None, help="CPU threads per model")
    command.add_argument(
        "--device", default=defaults.device,
        help="the device models run on: auto, cpu, gpu or an engine device name such as Vulkan0 "
        f"(default: {defaults.device}; a models config may set one per model)",
    )  # fmt: skip
    command.add_argument(
        "--precision", choices=PRECISIONS, default=defaults.precision,
        help="the CPU kernels' arithmetic: exact (f32, the default) or bf16 (CPUs with AVX512-BF16 or AMX-BF16; "
        "a models config may set it per model)",
    )  # fmt: skip


def _model_config(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    config: dict[str, Any] = {
        "mode": mode, "device": args.device, "cpu_variant": args.cpu_variant, "threads": args.threads,
        "flash_attn": args.flash_attn,
        "conv_direct": args.conv_direct, "rng": args.rng, "weight_type": args.weight_type, "precision": args.precision,
        "prediction": args.prediction, "offload_to_cpu": args.offload_to_cpu,
        "keep_clip_on_cpu": args.keep_clip_on_cpu, "keep_vae_on_cpu": args.keep_vae_on_cpu,
        "max_vram": args.max_vram,
    }  # fmt: skip
    if mode == "upscale":
        config["upscaler"] = {"tile_size": args.tile_size}
    else:
        config.update({role.key: getattr(args, role.key) for role in ROLES.values()})
        config["lora_dir"], config["embedding_dir"] = args.lora_dir, args.embedding_dir
        config["taesd_preview_only"] = args.taesd_preview_only
        if args.upscaler:
            config["upscaler"] = {"model_src": args.upscaler, "tile_size": args.tile_size}
    return config


def _lora_arg(text: str) -> dict[str, Any]:
    """``NAME[:SCALE]``: a number after the last colon is the scale (default 1)."""
    value, weight = text, 1.0
    name, colon, scale = text.rpartition(":")
    if colon:
        try:
            value, weight = name, float(scale)
        except ValueError:
            pass
    return {"path" if Path(value).is_absolute() else "name": value, "scale": weight}


class _ProgressBar:
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


# Set by the CLI's Ctrl-C handler (_on_ctrl_c) and never cleared: the raise of a
# KeyboardInterrupt can be swallowed (Python ignores exceptions raised in __del__
# methods and other finalizers, where a signal handler may run), the flag cannot.
_interrupted = threading.Event()
# How often a job's progress loop looks at that flag while no tick arrives.
_INTERRUPT_POLL_S = 0.1


def _on_ctrl_c(_signum: int, _frame: Any) -> None:
    _interrupted.set()
    raise KeyboardInterrupt


def _check_interrupt() -> None:
    """Raise the KeyboardInterrupt of a Ctrl-C whose first raise was swallowed."""
    if _interrupted.is_set():
        raise KeyboardInterrupt


def _run_job(result: Any, quiet: bool, preview: Path | None = None) -> tuple[list[bytes], Any]:
    """Show the job's progress (and write each preview to ``preview``) and return its
    outputs and stats. Ctrl-C cancels the job (its worker stops at once) before the
    interrupt goes on."""
    bar = _ProgressBar(not quiet)
    stream = result.progress_stream
    try:
        index = 0
        while True:
            _check_interrupt()
            tick = stream.next_tick(index, _INTERRUPT_POLL_S)
            if tick is None:
                if stream.ended:
                    break
                continue
            index += 1
            bar.update(tick)
            if preview is not None and tick.preview is not None:
                preview.write_bytes(tick.preview)
        _check_interrupt()
    except KeyboardInterrupt:
        result.cancel()
        raise
    finally:
        bar.close()
    return result.outputs.result(), result.stats.result()


def _write_pngs(folder: Path, stem: str, outputs: list[bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, png in enumerate(outputs):
        path = folder / f"{stem}_{i}.png"
        path.write_bytes(png)
        print(path)


def _generate(args: argparse.Namespace) -> int:
    import sfumato

    model_id = sfumato.load_model(args.model, model_config=_model_config(args, "diffusion"))
    result = None
    refiner_id = None
    try:
        if args.refiner:
            companions = {role.key: None for role in ROLES.values()}  # the refiner is a file that loads alone
            config = {**_model_config(args, "diffusion"), **companions, "upscaler": None}
            refiner_id = sfumato.load_model(args.refiner, model_config=config)
        params = {f.name: getattr(args, f.name) for f in fields(DiffusionParams)}
        params["upscale"] = {"repeats": args.upscale} if args.upscale is not None else None
        params["loras"] = [_lora_arg(text) for text in args.loras]
        params["hires"] = (
            {"scale": args.hires_scale, "upscaler": args.hires_upscaler, "steps": args.hires_steps,
             "denoising_strength": args.hires_strength}
            if args.hires else None
        )  # fmt: skip
        refiner = {"model_id": refiner_id, "switch_at": args.refiner_switch_at} if refiner_id else None
        result = sfumato.diffusion(model_id, **params, refiner=refiner, timeout=args.timeout)
        watch = None
        if args.preview:
            args.output.mkdir(parents=True, exist_ok=True)
            watch = args.output / "sfumato_preview.png"
        outputs, stats = _run_job(result, args.quiet, watch)
    except (JobCancelledError, KeyboardInterrupt):
        if result is not None:  # keep what the job finished before it stopped
            _write_pngs(args.output, "sfumato_cancelled", result.partial_outputs)
        raise
    finally:
        sfumato.unload_model(model_id)
        if refiner_id is not None:
            sfumato.unload_model(refiner_id)
    _write_pngs(args.output, f"sfumato_{stats.seed}", outputs)
    print(json.dumps(asdict(stats), indent=2))
    return 0


def _upscale(args: argparse.Namespace) -> int:
    import sfumato

    model_id = sfumato.load_model(args.model, model_config=_model_config(args, "upscale"))
    try:
        result = sfumato.upscale(model_id, image=args.image, repeats=args.repeats, timeout=args.timeout)
        outputs, stats = _run_job(result, args.quiet)
    finally:
        sfumato.unload_model(model_id)
    target = args.output or args.image.with_name(f"{args.image.stem}-upscaled.png")
    target.write_bytes(outputs[0])
    print(target)
    print(json.dumps(asdict(stats), indent=2))
    return 0


def _settings(args: argparse.Namespace, **more: Any) -> ServerSettings:
    """The settings of ``serve`` or ``worker`` from their shared flags (and ``more``)."""
    import os

    return ServerSettings(
        models_dir=args.models, loras_dir=args.loras, upscalers_dir=args.upscalers, embeddings_dir=args.embeddings,
        controlnets_dir=args.controlnets, vaes_dir=args.vaes, data_dir=args.data, models_config=args.config,
        store=args.store or os.environ.get("SFUMATO_STORE"), lease_s=args.lease, threads=args.threads,
        jobs_per_device=args.jobs_per_device, device=args.device, precision=args.precision, **more,
    )  # fmt: skip


def _serve(args: argparse.Namespace) -> int:
    import os

    from sfumato.server.app import serve

    if args.queue_size < 1:
        raise SfumatoError(f"--queue-size must be at least 1, got {args.queue_size}")
    settings = _settings(
        args, host=args.host, port=args.port, default_model=args.default_model, workers=args.workers,
        queue_size=args.queue_size, api_key=args.api_key or os.environ.get("SFUMATO_API_KEY"),
        retention_s=args.retention_hours * 3600, max_pixels=args.max_pixels,
        max_steps=args.max_steps, max_images=args.max_images, allow_private_urls=args.allow_private_urls,
        preview_method=args.preview_method,
    )  # fmt: skip
    serve(settings, log_level="info" if args.verbose else "warning")
    return 0


def _worker(args: argparse.Namespace) -> int:
    from sfumato.server.worker import work

    logging.getLogger("sfumato").setLevel(logging.INFO if args.verbose else logging.WARNING)
    work(_settings(args))
    return 0


def _module_info(module: Any) -> dict[str, Any]:
    names = ("name", "loaded", "error", "devices", "kernels")
    return {"path": str(module.path), **{name: getattr(module, name) for name in names}}


def engine_info() -> dict[str, Any]:
    """What ``sfumato info`` reports, as a dict."""
    from sfumato.engine.build import backend_features, llamafile_enabled
    from sfumato.engine.devices import list_devices
    from sfumato.engine.kernels import kernels_choice
    from sfumato.engine.library import ENGINE_VERSION_REQUIRED, load_engine

    engine = load_engine()
    features = backend_features(engine)
    return {
        "engine_version": engine.version,
        "engine_version_required": ENGINE_VERSION_REQUIRED,
        "library": str(engine.path),
        "build": asdict(engine.build) if engine.build is not None else None,
        "backend_features": features,
        "llamafile": llamafile_enabled(features),
        "physical_cores": engine.physical_cores,
        "system_info": " ".join(engine.system_info.split()),
        "modules": [_module_info(m) for m in engine.modules],
        "kernels": {"choice": kernels_choice(), "running": engine.cpu_kernels},
        "cpu_variant": asdict(engine.cpu_choice) if engine.cpu_choice is not None else None,
        "devices": [asdict(d) for d in list_devices(engine)],
    }


def _info(args: argparse.Namespace) -> int:
    info = engine_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    build = info["build"]
    print(f"engine version: {info['engine_version']} (sfumato requires {info['engine_version_required']})")
    print(f"library:        {info['library']}")
    if build is None:
        print("build:          not built by sfumato (no build.json beside the library)")
    else:
        target = "native (this machine's CPU)" if build["native"] else "portable"
        print(f"build:          {build['flavour']}, {target}, {build['build_type']}, {build['compiler']}")
        flags = " ".join(f"-D{name}={value}" for name, value in build["options"].items())
        print(f"build flags:    {flags}")
    for backend, found in info["backend_features"].items():
        listed = " ".join(name if value == "1" else f"{name}={value}" for name, value in found.items())
        print(f"{backend + ' features:':<16}{listed or '(none reported)'}")
    print(f"llamafile:      {'on' if info['llamafile'] else 'off'}")
    print(f"physical cores: {info['physical_cores']}")
    print(f"system info:    {info['system_info']}")
    if info["modules"]:
        print("backend modules:")
        for m in info["modules"]:
            state = "loaded" if m["loaded"] else "not loaded"
            state += f": {m['error']}" if m["error"] else ""
            print(f"  {m['name']:<14} {state} ({m['path']})")
            if m["kernels"]:
                listed = ", ".join(f"{op} ({isa})" for op, isa in m["kernels"].items())
                print(f"  {'':<14} sfumato kernels: {listed}")
    running = info["kernels"]["running"]
    which = ", ".join(running) if running else "none: ggml's own run"
    print(f"kernels:        {which} (SFUMATO_KERNELS={info['kernels']['choice']})")
    choice = info["cpu_variant"]
    if choice is not None:
        print(f"cpu variant:    {choice['variant']} ({choice['how']})")
        for t in choice["timings"]:
            if t["error"] is not None:
                print(f"  {t['variant']:<14} {t['error']}")
            else:
                timing = VariantTiming(**t)
                sizes = "; ".join(
                    f"at {size}: {timing.step_s(size) * 1000:.1f} ms (attention {p['attention_s'] * 1000:.1f}, "
                    f"3x3 conv {p['conv_s'] * 1000:.1f}, linear {p['linear_s'] * 1000:.1f})"
                    for size, p in t["sizes"].items()
                )
                print(f"  {t['variant']:<14} {sizes}")
    print("devices:")
    for d in info["devices"]:
        memory = f"{d['memory_free'] / 2**30:.1f} of {d['memory_total'] / 2**30:.1f} GiB free"
        kind = d["type"] + (", software: used only by name" if d["software"] else "")
        print(f"  {d['name']:<10} {d['description']} ({kind}; {memory})")
    return 0


def _models(_args: argparse.Namespace) -> int:
    from sfumato.registry import REGISTRY, cached_path

    for name, model in REGISTRY.items():
        path = cached_path(model)
        state = f"cached at {path}" if path.is_file() else f"not cached ({model.source_url})"
        print(f"{name:<28} {model.family:<7} {state}")
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse a command line; a ``--preset`` supplies the defaults of the flags it sets."""
    args = build_parser().parse_args(argv)
    if getattr(args, "preset", None):
        args = build_parser(PRESETS[args.preset]).parse_args(argv)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``sfumato`` command; returns the exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR, format="%(name)s: %(message)s")
    handlers = {"generate": _generate, "upscale": _upscale, "serve": _serve, "worker": _worker, "info": _info,
                "models": _models}  # fmt: skip
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_ctrl_c)
    try:
        return handlers[args.command](args)
    except SfumatoError as exc:
        print(f"sfumato: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sfumato: interrupted; the job was cancelled", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The ``sfumato`` command's flags: their names are the SDK's fields (``--cfg-scale`` is
``cfg_scale``) and their defaults come from :class:`sfumato.params.DiffusionParams`, so the
CLI, the SDK and the HTTP schemas agree."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sfumato.engine.kernels import PRECISIONS
from sfumato.engine.requests import PREVIEW_MODES
from sfumato.families.companions import FAMILY_TEXT_ENCODERS, ROLES
from sfumato.families.detect import FAMILY_NAMES
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


_SWITCHES = {
    "flash_attn": "flash attention (slower on CPU)",
    "conv_direct": "direct convolutions in the UNet and VAE",
    "offload_to_cpu": "keep the weights in RAM, each part copied to the device when it runs",
    "keep_clip_on_cpu": "text encoders on the CPU",
    "keep_vae_on_cpu": "the VAE on the CPU",
}
"""The ``model_config`` switches every command that loads a model takes, as ``--flash-attn`` and so on."""

_SETTINGS = ("device", "cpu_variant", "threads", "rng", "weight_type", "precision", "prediction", "max_vram")
"""The other ``model_config`` keys those commands pass as their flags give them."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _model_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model_config")
    group.add_argument(
        "--device", default=_M.device, help=f"auto, cpu, gpu or an engine device name (default: {_M.device})"
    )
    group.add_argument(
        "--cpu-variant",
        default=_M.cpu_variant,
        help="the engine build's CPU variant (haswell, skylakex, zen4, sapphirerapids) or auto: the fastest by a probe "
        "(default)",
    )
    group.add_argument("--threads", type=int, default=_M.threads, help="CPU threads (default: physical cores)")
    for name, text in _SWITCHES.items():
        group.add_argument(_flag(name), action="store_true", default=getattr(_M, name), help=text)
    group.add_argument(
        "--max-vram",
        type=float,
        default=_M.max_vram,
        metavar="GIB",
        help="device memory a graph may take before the engine splits it (default: 0, never)",
    )
    group.add_argument("--rng", choices=RNG_NAMES, default=_M.rng, help="noise generator (cpu: as torch on CPU)")
    group.add_argument(
        "--weight-type", choices=WEIGHT_TYPE_NAMES, default=_M.weight_type, help="convert weights at load"
    )
    group.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=_M.precision,
        help="CPU arithmetic: exact (f32) or bf16 (CPUs with AVX512-BF16 or AMX; weights converted to bf16)",
    )
    group.add_argument("--prediction", choices=list(PREDICTION_NAMES), default=_M.prediction)
    for role in ROLES.values():
        users = [FAMILY_NAMES[f] for f, roles in FAMILY_TEXT_ENCODERS.items() if role.name in roles]
        text = f"the {role.label} file" + (f" ({', '.join(users)})" if users else "")
        group.add_argument(_flag(role.name), dest=role.key, default=getattr(_M, role.key), metavar="FILE", help=text)
    group.add_argument(
        "--embedding-dir", default=_M.embedding_dir, help="a folder of textual-inversion embeddings (.pt, .safetensors)"
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
    g.add_argument("--prompt", "-p", default=None, help=f"the prompt, if not given as PROMPT (default: {_D.prompt!r})")
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
    g.add_argument(
        "--flow-shift", type=float, default=_D.flow_shift, help="a flow-matching model's sigma shift (default: its own)"
    )
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
        "--lora",
        "--loras",
        dest="loras",
        action="append",
        default=[],
        metavar="NAME[:SCALE]",
        help="apply a LoRA (a name in --lora-dir or a path; scale default 1); repeatable",
    )
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
        "--upscale",
        type=int,
        nargs="?",
        const=1,
        default=None,
        metavar="REPEATS",
        help="run the paired ESRGAN (--upscaler) REPEATS times (default 1 when given)",
    )


def build_parser(preset: Mapping[str, Any] | None = None) -> argparse.ArgumentParser:
    """The argument parser of the ``sfumato`` command; ``preset`` (one of
    :data:`sfumato.presets.PRESETS`) replaces the defaults of ``generate``."""
    parser = argparse.ArgumentParser(prog="sfumato", description="Local image generation on stable-diffusion.cpp")
    parser.add_argument("--verbose", "-v", action="store_true", help="show the engine's log")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate images from a prompt (or an init image)")
    gen.add_argument("prompt_text", nargs="?", default=None, metavar="PROMPT", help="the prompt (or --prompt)")
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
        "--workers",
        type=int,
        choices=(0, 1),
        default=defaults.workers,
        help="1: run jobs in this server (default); 0: a front end for sfumato worker processes (PostgreSQL only)",
    )
    srv.add_argument("--default-model", default=None, help="model name used when a request names none")
    srv.add_argument("--queue-size", type=int, default=defaults.queue_size, help="max jobs waiting or running")
    srv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set SFUMATO_API_KEY)")
    srv.add_argument("--retention-hours", type=float, default=defaults.retention_s / 3600, help="keep finished jobs")
    srv.add_argument(
        "--preview-method",
        choices=PREVIEW_METHODS,
        default=defaults.preview_method,
        help="live previews of ComfyUI API prompts, as ComfyUI's flag (default: none)",
    )
    srv.add_argument("--max-steps", type=int, default=defaults.max_steps, help="most sampling steps per image")
    srv.add_argument(
        "--max-pixels", type=int, default=defaults.max_pixels, help="largest width x height one image may have"
    )
    srv.add_argument("--max-images", type=int, default=defaults.max_images, help="most images per request")
    srv.add_argument(
        "--allow-private-urls", action="store_true", help="let url_upload fetch loopback and private addresses"
    )

    if preset:
        gen.set_defaults(**preset)
    info = sub.add_parser("info", help="engine version, library path, system info and devices")
    info.add_argument("--json", action="store_true")
    listing = sub.add_parser(
        "models", help="list the registry constants and whether they are cached, or what a folder of models holds"
    )
    listing.add_argument(
        "folder", nargs="?", type=Path, default=None, help="a folder: each model file in it with its family"
    )
    return parser


_FOLDERS = {
    "models_dir": "the models folder (a front end, --workers 0, without one serves what workers register)",
    "loras_dir": "LoRAs",
    "upscalers_dir": "ESRGAN upscalers",
    "controlnets_dir": "ControlNets",
    "vaes_dir": "separate VAE files models may decode with",
    "embeddings_dir": "textual-inversion embeddings",
    "data_dir": "the job store and its outputs/ folder",
}
"""The folders ``serve`` and ``worker`` read, each a flag named as its setting (``--models``)."""


def _folder_flags(command: argparse.ArgumentParser, defaults: ServerSettings) -> None:
    """The flags ``serve`` and ``worker`` share: the folders, the store, the lease, threads."""
    for name, text in _FOLDERS.items():
        default = getattr(defaults, name)
        flag = "--" + name.removesuffix("_dir")
        command.add_argument(
            flag, dest=name, type=Path, default=default, metavar="DIR", help=f"{text} (default: ./{default})"
        )
    command.add_argument(
        "--config",
        dest="models_config",
        type=Path,
        default=None,
        metavar="TOML",
        help="models config: models made of several files, per-model defaults (default: models.toml in --models)",
    )
    command.add_argument(
        "--store",
        default=None,
        metavar="URL",
        help="the job store: postgresql://... (or set SFUMATO_STORE); default: SQLite in --data",
    )
    command.add_argument(
        "--lease",
        dest="lease_s",
        type=float,
        default=defaults.lease_s,
        metavar="SECONDS",
        help=f"how long a worker's claim holds without its heartbeat (default: {defaults.lease_s:g})",
    )
    command.add_argument(
        "--jobs-per-device",
        type=int,
        default=defaults.jobs_per_device,
        metavar="N",
        help=f"jobs run at once on this worker's device (default: {defaults.jobs_per_device})",
    )
    command.add_argument("--threads", type=int, default=None, help="CPU threads per model")
    command.add_argument(
        "--device",
        default=defaults.device,
        help="the device models run on: auto, cpu, gpu or an engine device name such as Vulkan0 "
        f"(default: {defaults.device}; a models config may set one per model)",
    )
    command.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=defaults.precision,
        help="the CPU kernels' arithmetic: exact (f32, the default) or bf16 (CPUs with AVX512-BF16 or AMX-BF16; "
        "a models config may set it per model)",
    )


def model_config_of(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    config: dict[str, Any] = {"mode": mode} | {name: getattr(args, name) for name in (*_SETTINGS, *_SWITCHES)}
    if mode == "upscale":
        config["upscaler"] = {"tile_size": args.tile_size}
    else:
        config.update({role.key: getattr(args, role.key) for role in ROLES.values()})
        config["lora_dir"], config["embedding_dir"] = args.lora_dir, args.embedding_dir
        config["taesd_preview_only"] = args.taesd_preview_only
        if args.upscaler:
            config["upscaler"] = {"model_src": args.upscaler, "tile_size": args.tile_size}
    return config


def lora_arg(text: str) -> dict[str, Any]:
    """``NAME[:SCALE]``: a number after the last colon is the scale (default 1)."""
    value, weight = text, 1.0
    name, colon, scale = text.rpartition(":")
    if colon:
        try:
            value, weight = name, float(scale)
        except ValueError:
            pass
    return {"path" if Path(value).is_absolute() else "name": value, "scale": weight}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse a command line; a ``--preset`` supplies the defaults of the flags it sets."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "preset", None):
        parser = build_parser(PRESETS[args.preset])
        args = parser.parse_args(argv)
    if args.command == "generate":
        if args.prompt_text is not None and args.prompt is not None:
            parser.error("the prompt is given twice, as PROMPT and as --prompt: give it once")
        args.prompt = next((text for text in (args.prompt_text, args.prompt) if text is not None), _D.prompt)
    return args

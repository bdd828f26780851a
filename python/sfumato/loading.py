"""What ``load_model`` does before a worker starts: the model source resolved (a path,
or a registry constant downloaded), its family detected and its companion files checked
from their headers, where it runs (device, CPU variant, precision), and what its worker
is told to load. Nothing here starts a process (:mod:`sfumato.api` does)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import gguf

from sfumato.engine.cpu_variants import ENV_CPU_VARIANT, bf16_variants, check_variant
from sfumato.engine.devices import Device, check_device, device_env
from sfumato.engine.kernels import ENV_PRECISION
from sfumato.engine.library import load_engine
from sfumato.engine.requests import ContextParams
from sfumato.errors import InvalidModelError, InvalidParameterError, ModelNotFoundError
from sfumato.families.companions import (
    ROLES,
    check_companion,
    family_files,
    label,
    sdxl_projection_hint,
    split_unet_hint,
)
from sfumato.families.detect import (
    DIFFUSION_FAMILIES,
    FAMILY_CHROMA,
    FAMILY_ESRGAN,
    FAMILY_NAMES,
    FAMILY_SDXL,
    PIXEL_SPACE_VARIANTS,
    ModelInfo,
    detect,
)
from sfumato.families.embeddings import TEXT_WIDTHS, Embedding, sort_out
from sfumato.families.embeddings import scan as scan_embeddings
from sfumato.params import FAMILY_SIZE_MULTIPLE, PREDICTION_NAMES, ModelConfig, UpscalerConfig, parse_model_config
from sfumato.registry import REGISTRY, RegistryModel, cache_dir, resolve
from sfumato.runtime.host import LoadedModel
from sfumato.runtime.protocol import LoadSpec

ModelSource = Union[str, "os.PathLike[str]", RegistryModel]
"""A local file, a diffusers folder, or a registry constant (or its name)."""


@dataclass(frozen=True)
class LoadProgress:
    """A ``load_model`` progress report: ``stage`` is "download" or "load"."""

    percentage: float
    stage: str


def resolve_source(
    source: ModelSource, field: str, on_progress: Callable[[float], None] | None = None
) -> tuple[Path, RegistryModel | None]:
    """Turn a model source into a local path (downloading registry constants).

    Raises
    ------
    ModelNotFoundError
        When a path does not exist, or a constant is not cached and cannot be downloaded.
    """
    if isinstance(source, RegistryModel):
        return resolve(source, on_progress), source
    if isinstance(source, str) and source in REGISTRY and not Path(source).exists():
        return resolve(REGISTRY[source], on_progress), REGISTRY[source]
    if not isinstance(source, (str, os.PathLike)):
        raise InvalidParameterError(field, f"must be a path or a registry constant, got {type(source).__name__}")
    path = Path(source).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"{field}: no file or folder at {str(path)!r} (registry constants: {', '.join(sorted(REGISTRY))})"
        )
    return path, None


def detect_family(path: Path, field: str, expected: tuple[str, ...], hint: str) -> ModelInfo:
    """The family of the model at ``path``, refused (``field``, with ``hint``) unless one of ``expected``."""
    info = detect(path)
    if info.family not in expected:
        name = FAMILY_NAMES[info.family]
        article = "an" if name[0] in "AEIOUS" else "a"
        raise InvalidModelError(f"{field}: {path} is {article} {name} model; {hint}")
    return info


def companion_files(
    sources: Mapping[str, Any],
    info: ModelInfo,
    key: Callable[[str], str] = lambda role: f"model_config.{ROLES[role].key}",
) -> dict[str, Path]:
    """Resolve and check the companion files ``sources`` (role -> path or registry
    constant) names for the model of ``info``; ``key`` names a role's field in errors.

    Raises
    ------
    InvalidParameterError
        For a required companion missing, one the model does not take, or one of the wrong kind.
    ModelNotFoundError
        For a path that does not exist.
    """
    files = family_files(info)
    family = FAMILY_NAMES[info.family]
    found: dict[str, Path] = {}
    for role in ROLES.values():
        source = sources.get(role.name)
        if source is None:
            if role.name in files.required:
                named = label(role.name, info)
                what = "a diffusion model alone" if info.split else f"a {family} checkpoint without its {named}"
                raise InvalidParameterError(key(role.name), f"required: {info.path} is {what}; pass its {named} here")
            continue
        if role.name not in files.accepted:
            takes = ", ".join(f"{key(r)} ({label(r, info)})" for r in files.accepted)
            why = (
                f"{info.path} carries its own {role.label}" if role.name in info.carries else f"{family} takes {takes}"
            )
            if info.variant in PIXEL_SPACE_VARIANTS:
                why = f"{info.path} denoises pixels, not latents: it takes no {role.label} ({family} takes {takes})"
            raise InvalidParameterError(key(role.name), f"not used: {why}")
        path, _ = resolve_source(source, key(role.name))
        try:
            check_companion(path, role.name, info)
        except InvalidParameterError as exc:
            raise InvalidParameterError(key(role.name), exc.message) from None
        found[role.name] = path.resolve()
    return found


def embeddings_of(config: ModelConfig, info: ModelInfo) -> tuple[dict[str, Embedding], dict[str, str]]:
    """The embeddings of ``model_config.embedding_dir`` that the model's text encoders
    take, by name, and why each other file of the folder is skipped."""
    if config.embedding_dir is None:
        return {}, {}
    if info.family not in TEXT_WIDTHS:
        takes = ", ".join(FAMILY_NAMES[f] for f in TEXT_WIDTHS)
        raise InvalidParameterError(
            "model_config.embedding_dir",
            f"{FAMILY_NAMES[info.family]} has no CLIP text encoder to take textual-inversion embeddings ({takes} do)",
        )
    return sort_out(*scan_embeddings(config.embedding_dir), info.family)


def check_precision(precision: str, device: Device, variants: dict[str, Path], cpu_variant: str | None) -> None:
    """Refuse ``model_config.precision='bf16'`` where it cannot run: a GPU device, a CPU
    without AVX512-BF16 or AMX-BF16, or a named CPU variant without the bf16 kernels.

    Raises
    ------
    InvalidParameterError
        Naming ``model_config.precision`` (or ``model_config.cpu_variant``) and why.
    """
    if precision != "bf16":
        return
    if device.type != "cpu":
        raise InvalidParameterError(
            "model_config.precision", f"'bf16' is a mode of sfumato's CPU kernels, and this model runs on {device.name}"
        )
    carriers = bf16_variants(variants, "model_config.precision")
    if cpu_variant is not None and cpu_variant not in carriers:
        raise InvalidParameterError(
            "model_config.cpu_variant", f"{cpu_variant!r} has no bf16 kernels; precision 'bf16' runs {sorted(carriers)}"
        )


def weight_bytes(file_bytes: int, weight_type: str | None) -> int:
    """A model's weights in memory: its files' size, scaled by ``weight_type``'s bits
    per weight (gguf's block sizes) over 16 when it is converted at load (releases are
    f16 files)."""
    if weight_type is None:
        return file_bytes
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[weight_type.upper()]]
    return int(file_bytes * (size * 8 / block) / 16.0)


def file_bytes(path: Path | None) -> int:
    """The bytes of a file, or of every file under a folder (0 for ``None``)."""
    if path is None:
        return 0
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


@dataclass(frozen=True)
class Placement:
    """Where a model runs: its engine device, CPU variant (``None``: the probe's), the
    weight type it is converted to at load (``None``: as stored), and its worker's
    environment."""

    device: Device
    cpu_variant: str | None
    weight_type: str | None
    env: dict[str, str]


def placement(config: ModelConfig) -> Placement:
    """Check ``config``'s device, CPU variant and precision against this machine and build."""
    device = check_device(config.device)
    variants = load_engine().cpu_variants
    cpu_variant = check_variant(config.cpu_variant, variants, "model_config.cpu_variant")
    check_precision(config.precision, device, variants, cpu_variant)
    weight_type = config.weight_type or ("bf16" if config.precision == "bf16" else None)
    env = device_env(device)
    if cpu_variant is not None:
        env[ENV_CPU_VARIANT] = cpu_variant
    env[ENV_PRECISION] = config.precision
    return Placement(device, cpu_variant, weight_type, env)


@dataclass(frozen=True)
class Parts:
    """The files a diffusion model loads from, checked: the detected model, its
    companions by role, its paired ESRGAN, and its embeddings (and why others are skipped)."""

    info: ModelInfo
    companions: dict[str, Path]
    upscaler: Path | None
    embeddings: dict[str, Embedding]
    skipped_embeddings: dict[str, str]


def diffusion_parts(config: ModelConfig, path: Path) -> Parts:
    """Detect the diffusion model at ``path`` and check every file ``config`` adds to it."""
    hint = "load ESRGAN upscalers with model_config={'mode': 'upscale'}"
    info = detect_family(path, "model_src", DIFFUSION_FAMILIES, hint)
    companions = companion_files({r.name: getattr(config, r.key) for r in ROLES.values()}, info)
    upscaler = None
    if config.upscaler is not None:
        upscaler, _ = resolve_source(config.upscaler.model_src, "model_config.upscaler.model_src")
        detect_family(upscaler, "model_config.upscaler.model_src", (FAMILY_ESRGAN,), "an ESRGAN is needed")
        upscaler = upscaler.resolve()
    embeddings, skipped = embeddings_of(config, info)
    return Parts(info, companions, upscaler, embeddings, skipped)


_CONTEXT_FIELDS = {
    "flash_attn": ("flash_attn", "diffusion_flash_attn"),
    "conv_direct": ("diffusion_conv_direct", "vae_conv_direct"),
    "offload_to_cpu": ("offload_params_to_cpu",),
    "keep_clip_on_cpu": ("keep_clip_on_cpu",),
    "keep_vae_on_cpu": ("keep_vae_on_cpu",),
    "rng": ("rng",),
}
"""The ``model_config`` keys the engine's context takes as they are, and the fields they set."""


def context_params(
    config: ModelConfig, path: Path, parts: Parts, registered: RegistryModel | None, weight_type: str | None
) -> ContextParams:
    """The engine's context parameters of a diffusion model made of ``parts``."""
    prediction = PREDICTION_NAMES[config.prediction]
    if prediction is None and registered is not None:
        prediction = registered.prediction
    paths: dict[str, Any] = {f"{role}_path": str(file) for role, file in parts.companions.items()}
    info = parts.info
    model_path = None if info.split else str(path)
    if info.split and info.family == FAMILY_SDXL:
        model_path = str(split_unet_hint(cache_dir() / "hints"))
    if not info.split and info.family == FAMILY_SDXL:  # (an all-in-one file takes no text encoders)
        projection = sdxl_projection_hint(path, cache_dir() / "hints")
        if projection is not None:
            paths["clip_g_path"] = str(projection)
    return ContextParams(
        **paths,
        model_path=model_path,
        diffusion_model_path=str(path) if info.split else None,
        tae_preview_only=config.taesd_preview_only,
        embeddings=tuple((e.name, str(e.path)) for e in parts.embeddings.values()),
        **{field: getattr(config, key) for key, fields in _CONTEXT_FIELDS.items() for field in fields},
        n_threads=config.threads or -1,
        wtype=weight_type,
        prediction=prediction,
        max_vram=float(config.max_vram),
        # Chroma masks its attention, which the engine's flash attention breaks: no fused
        # kernel unless asked, and flash attention asked for runs without the mask.
        fused_attention=info.family != FAMILY_CHROMA,
        chroma_use_dit_mask=not (info.family == FAMILY_CHROMA and config.flash_attn),
    )


@dataclass(frozen=True)
class Prepared:
    """A model ready to start: what its worker loads, in which environment, and what
    its id stands for."""

    spec: LoadSpec
    env: dict[str, str]
    model: LoadedModel


def prepare(
    model_src: ModelSource,
    model_type: str,
    model_config: ModelConfig | Mapping[str, Any] | None,
    report: Callable[[LoadProgress], None],
) -> Prepared:
    """Every check of :func:`sfumato.api.load_model`, in order, and what it starts.

    Raises
    ------
    InvalidParameterError, ModelNotFoundError, InvalidModelError, UnsupportedModelError
    """
    if model_type != "diffusion":
        raise InvalidParameterError("model_type", f"must be 'diffusion', got {model_type!r}")
    config = parse_model_config(model_config)
    where = placement(config)
    path, registered = resolve_source(model_src, "model_src", lambda pct: report(LoadProgress(pct, "download")))
    report(LoadProgress(0.0, "load"))
    path = path.resolve()
    if config.mode == "upscale":
        info = detect_family(path, "model_src", (FAMILY_ESRGAN,), "mode='upscale' needs an ESRGAN upscaler")
        parts = Parts(info, {}, path, {}, {})
        context = None
    else:
        parts = diffusion_parts(config, path)
        context = context_params(config, path, parts, registered, where.weight_type)
    threads = config.threads or -1
    spec = LoadSpec(
        model_id=uuid.uuid4().hex,
        context=context,
        upscaler_path=str(parts.upscaler) if parts.upscaler else None,
        threads=threads,
        tile_size=(config.upscaler or UpscalerConfig()).tile_size,
    )
    files = {path, parts.upscaler, *parts.companions.values()}
    model = LoadedModel(
        model_id=spec.model_id,
        info=parts.info,
        config=config,
        has_diffusion=context is not None,
        has_upscaler=parts.upscaler is not None,
        size_multiple=FAMILY_SIZE_MULTIPLE.get(parts.info.family, 8),
        skipped_embeddings=parts.skipped_embeddings,
        device=where.device.name,
        device_bytes=where.device.memory_total,
        weight_bytes=weight_bytes(sum(file_bytes(p) for p in files), where.weight_type),
    )
    return Prepared(spec, where.env, model)

"""The models config: server models made of several files, and per-model defaults.

A diffusion model that needs companion files (a split SDXL UNet, an SD3 MMDiT
without its text encoders, a FLUX.1 or FLUX.2 [klein] transformer) cannot be
named by a request alone; the models config names it once, with its files::

    # models.toml, in the models folder (or any file: sfumato serve --config FILE)
    [models.klein]
    file = "flux-2-klein-4b-Q4_0.gguf"   # the diffusion model, or a checkpoint
    llm = "Qwen3-4B-Q4_0.gguf"           # companions: clip_l, clip_g, t5xxl, llm, vae, taesd
    vae = "flux2-vae.safetensors"
    steps = 4                            # defaults for what a request leaves out
    cfg_scale = 1.0

Relative paths are taken from the config file's folder. Every file is checked
as the SDK's ``load_model`` checks it (family, required and accepted
companions, their headers) when the config is read, so a mistake is found at
start-up: :class:`ModelsConfigError` names the file, the model and the key.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sfumato import presets
from sfumato.engine.kernels import PRECISIONS
from sfumato.errors import InvalidModelError, InvalidParameterError, SfumatoError
from sfumato.families.companions import ROLES
from sfumato.families.detect import (
    DIFFUSION_FAMILIES,
    FAMILY_FLUX1,
    FAMILY_NAMES,
    FAMILY_QWEN_IMAGE,
    ModelInfo,
    detect,
)
from sfumato.limits import bounds
from sfumato.loading import companion_files
from sfumato.params import (
    ANY_FAMILY_SIDE_MULTIPLE,
    PREDICTION_NAMES,
    DiffusionParams,
    ModelConfig,
    check_bool,
    check_choice,
    check_flow_shift,
    check_int,
    check_number,
    check_side,
)
from sfumato.server.models import names

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

COMPANION_KEYS = ("clip_l", "clip_g", "t5xxl", "llm", "vae", "taesd")
"""The companion roles a model's table may name, each a file."""

DEFAULT_KEYS = ("preset", "sampler", "scheduler", "steps", "cfg_scale", "img_cfg_scale", "guidance", "flow_shift",
                "width", "height")  # fmt: skip
"""The per-model defaults a table may set: what a request leaves out takes them."""

MODEL_KEYS = ("file", *COMPANION_KEYS, "prediction", "edits", "device", "cpu_variant", "precision", *DEFAULT_KEYS)

DEFAULTED_FIELDS = ("sampling_method", "scheduler", "steps", "cfg_scale", "img_cfg_scale", "guidance", "flow_shift",
                    "width", "height")  # fmt: skip
"""The :class:`~sfumato.params.DiffusionParams` fields a model's defaults fill."""


class ModelsConfigError(SfumatoError):
    """A models config that cannot be served: its message names the file, the model and the key."""

    def __init__(self, file: Path, model: str | None, key: str | None, message: str) -> None:
        parts = [*(("models", model) if model is not None else ()), *((key,) if key is not None else ())]
        super().__init__(f"{file}: {'.'.join(parts)}: {message}" if parts else f"{file}: {message}")
        self.file, self.model, self.key, self.message = file, model, key, message


@dataclass(frozen=True)
class ConfiguredModel:
    """One model of the config, checked.

    Attributes
    ----------
    name:
        Its name in every API (the table's key).
    path:
        The diffusion model (or checkpoint) file.
    info:
        What detection found in it.
    companions:
        Role (``clip_l``, ``llm``, ``vae``, ...) -> file.
    prediction:
        ``model_config.prediction``.
    device:
        ``model_config.device`` for this model (``None``: the server's ``--device``).
    cpu_variant:
        ``model_config.cpu_variant`` for this model (``None``: ``auto``).
    precision:
        ``model_config.precision`` for this model (``None``: the server's ``--precision``).
    defaults:
        :data:`DEFAULTED_FIELDS` -> the value a request that leaves the field out takes.
    edits:
        A FLUX.1 Kontext model: an image-to-image request's image (A1111 img2img, OpenAI
        ``images.edit``, the job queue's ``init_image``) is the reference it edits, not
        an img2img source (unless a mask makes it inpainting). Its header does not tell
        Kontext from [dev], so the table says it.
    """

    name: str
    path: Path
    info: ModelInfo
    companions: Mapping[str, Path] = field(default_factory=dict)
    prediction: str = ModelConfig.prediction
    defaults: Mapping[str, Any] = field(default_factory=dict)
    device: str | None = None
    cpu_variant: str | None = None
    precision: str | None = None
    edits: bool = False

    def load_config(self) -> dict[str, Any]:
        """Its ``model_config`` keys for :func:`sfumato.load_model`."""
        out: dict[str, Any] = {ROLES[role].key: path for role, path in self.companions.items()}
        out["prediction"] = self.prediction
        placement = {"device": self.device, "cpu_variant": self.cpu_variant, "precision": self.precision}
        return out | {key: value for key, value in placement.items() if value is not None}

    def encoder_files(self) -> frozenset[str]:
        """The file names of its separate text encoders."""
        return frozenset(path.name for role, path in self.companions.items() if role not in ("vae", "taesd"))


def read_models_config(path: Path, *, max_steps: int, max_pixels: int) -> dict[str, ConfiguredModel]:
    """The models of the config at ``path``, each checked; the server's limits
    bound the defaults.

    Raises
    ------
    ModelsConfigError
        Naming the file, the model and the key at fault.
    """
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelsConfigError(path, None, None, f"cannot be read ({exc.strerror or exc})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ModelsConfigError(path, None, None, f"is not valid TOML: {exc}") from None
    unknown = sorted(set(document) - {"models"})
    if unknown:
        raise ModelsConfigError(path, None, unknown[0], "unknown key; a models config holds [models.NAME] tables")
    tables = document.get("models", {})
    if not isinstance(tables, dict):
        raise ModelsConfigError(path, None, "models", "must be a table of [models.NAME] tables")
    out = {}
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise ModelsConfigError(path, name, None, f"must be a table ([models.{name}]) with at least file = ...")
        out[name] = _model(path, name, table, max_steps, max_pixels)
    return out


def _file(config: Path, model: str, key: str, value: object) -> Path:
    if not isinstance(value, str) or not value:
        raise ModelsConfigError(config, model, key, f"must be a file path (a string), got {value!r}")
    found = Path(os.path.abspath(config.parent / Path(value).expanduser()))  # links kept: their names show
    if not found.exists():
        raise ModelsConfigError(config, model, key, f"no file at {str(found)!r}")
    return found


def _model(config: Path, name: str, table: dict[str, Any], max_steps: int, max_pixels: int) -> ConfiguredModel:
    unknown = sorted(set(table) - set(MODEL_KEYS))
    if unknown:
        raise ModelsConfigError(config, name, unknown[0], f"unknown key; a model takes {', '.join(MODEL_KEYS)}")
    if "file" not in table:
        raise ModelsConfigError(config, name, "file", "missing: the diffusion model (or checkpoint) file")
    path = _file(config, name, "file", table["file"])
    try:
        info = detect(path)
    except InvalidModelError as exc:
        raise ModelsConfigError(config, name, "file", str(exc)) from None
    if info.family not in DIFFUSION_FAMILIES:
        raise ModelsConfigError(
            config, name, "file", f"{path.name} is {FAMILY_NAMES[info.family]}, not a diffusion model"
        )
    files = {role: _file(config, name, role, table[role]) for role in COMPANION_KEYS if role in table}
    try:
        companion_files(files, info, key=lambda role: role)  # the SDK's checks, as load_model makes them
        prediction = check_choice("prediction", table.get("prediction", ModelConfig.prediction), PREDICTION_NAMES)
        defaults = _defaults(table, max_steps, max_pixels)
        if "flow_shift" in defaults:
            check_flow_shift(DiffusionParams(prompt="", flow_shift=defaults["flow_shift"]), info, prediction)
        # Their availability is the worker's to check, at load: a front end may have no GPU,
        # and another engine build.
        device, cpu_variant = table.get("device"), table.get("cpu_variant")
        if device is not None and (not isinstance(device, str) or not device):
            raise InvalidParameterError("device", f"must be 'auto', 'cpu', 'gpu' or a device name, got {device!r}")
        if cpu_variant is not None and (not isinstance(cpu_variant, str) or not cpu_variant):
            raise InvalidParameterError("cpu_variant", f"must be 'auto' or a CPU variant's name, got {cpu_variant!r}")
        precision = table.get("precision")
        if precision is not None:
            check_choice("precision", precision, PRECISIONS)
        edits = table.get("edits", False)
        check_bool("edits", edits)
        kontext = info.family == FAMILY_FLUX1 and info.variant in ("dev", "schnell")
        if edits and not (kontext or info.family == FAMILY_QWEN_IMAGE):
            raise InvalidParameterError(
                "edits",
                "is for FLUX.1 Kontext (a [dev]-layout transformer) and Qwen-Image-Edit; this file is "
                f"{FAMILY_NAMES[info.family]}"
                f"{f' {info.variant}' if info.variant else ''} (FLUX.2 edits with prediction = 'flux2_flow')",
            )
    except InvalidParameterError as exc:
        raise ModelsConfigError(config, name, exc.field, exc.message) from None
    return ConfiguredModel(name, path, info, files, prediction, defaults, device, cpu_variant, precision, edits)


def _defaults(table: Mapping[str, Any], max_steps: int, max_pixels: int) -> dict[str, Any]:
    """The request defaults of a model's table: its preset's, then its own keys over them."""
    out: dict[str, Any] = {}
    if "preset" in table:
        out.update(presets.PRESETS[check_choice("preset", table["preset"], presets.PRESETS)])
    if "sampler" in table:
        sampler = table["sampler"]
        if not isinstance(sampler, str):
            raise InvalidParameterError("sampler", f"must be a sampler name (a string), got {sampler!r}")
        out["sampling_method"], implied = names.sampler(sampler, "sampler")
        if implied is not None:
            out["scheduler"] = implied
    if "scheduler" in table:
        scheduler = table["scheduler"]
        if not isinstance(scheduler, str):
            raise InvalidParameterError("scheduler", f"must be a scheduler name (a string), got {scheduler!r}")
        out["scheduler"] = names.scheduler(scheduler, "scheduler")
    if "steps" in table:
        out["steps"] = check_int("steps", table["steps"], 1, max_steps)
    for key in ("cfg_scale", "img_cfg_scale", "guidance", "flow_shift"):
        if key in table:
            out[key] = check_number(key, table[key], *bounds(key))
    for side in ("width", "height"):
        if side in table:
            out[side] = check_side(side, table[side], ANY_FAMILY_SIDE_MULTIPLE)
    width, height = out.get("width"), out.get("height")
    if width is not None and height is not None and width * height > max_pixels:
        raise InvalidParameterError("width", f"{width}x{height} is more than this server's {max_pixels} pixels")
    return out

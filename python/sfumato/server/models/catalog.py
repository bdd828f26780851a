"""The models, LoRAs and upscalers a server offers, found in its folders.

Requests name them; a name is only ever looked up among the entries listed
here, never joined onto a path, so no name can reach outside its folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Collection, Mapping
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from sfumato.errors import InvalidModelError, InvalidParameterError
from sfumato.families.companions import check_companion, family_files
from sfumato.families.detect import DIFFUSION_FAMILIES, FAMILY_ESRGAN, ModelInfo, check_lora_file, detect
from sfumato.families.embeddings import Embedding, NotAnEmbeddingError, read_embedding
from sfumato.families.embeddings import scan as scan_embeddings
from sfumato.registry import cache_dir
from sfumato.server.models.config import ConfiguredModel, ModelsConfigError, read_models_config
from sfumato.server.settings import ServerSettings

logger = logging.getLogger("sfumato.server")

MODEL_SUFFIXES = (".gguf", ".safetensors", ".ckpt", ".pth")
TAESD_SIDECAR = ".taesd.safetensors"
UPSCALER = "upscaler:"
"""How a worker registers an upscaler, and how an upscale job names its model to route it."""
LORA, VAE, CONTROL_NET, EMBEDDING = "lora:", "vae:", "control_net:", "embedding:"
"""How a worker registers the other files a job may name, and how a job names them to route it."""
AUXILIARY = (LORA, VAE, CONTROL_NET, EMBEDDING)
HASHES = "sha256.json"
"""The file of known hashes in the model cache folder, by file path, size and mtime."""

_hashes_lock = threading.Lock()
_hashes_seen: dict[str, str] = {}  # this process's, so that a heartbeat reads no file


def _known_hashes() -> dict[str, str]:
    try:
        found = json.loads((cache_dir() / HASHES).read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def file_sha256(path: Path, compute: bool = True) -> str | None:
    """A file's sha256 (A1111's model hash), computed once per version of the file (its
    path, size and mtime) and kept in the model cache folder; ``None`` when not known
    yet and not ``compute``."""
    real = path.resolve()
    stat = real.stat()
    key = f"{real}|{stat.st_size}|{stat.st_mtime_ns}"
    with _hashes_lock:
        known = _hashes_seen.get(key) or _known_hashes().get(key)
        if known is not None:
            _hashes_seen[key] = known
    if known is not None or not compute:
        return known
    digest = hashlib.sha256()
    with open(real, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    value = digest.hexdigest()
    with _hashes_lock:  # other processes may write it too: each write replaces it whole
        _hashes_seen[key] = value
        known_now = {**_known_hashes(), key: value}
        target = cache_dir() / HASHES
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = target.with_name(f"{HASHES}.{os.getpid()}.{threading.get_ident()}")
        scratch.write_text(json.dumps(known_now, indent=0))
        os.replace(scratch, target)
    return value


def candidates(folder: Path) -> list[Path]:
    """The files of ``folder`` that may be models (by suffix) and its diffusers folders, sorted."""
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.iterdir()
        if (p.is_file() and p.suffix.lower() in MODEL_SUFFIXES) or (p.is_dir() and (p / "unet").is_dir())
    )


def taesd_sidecar(model: Path) -> Path:
    """Where a model's own tiny autoencoder lies: ``NAME.taesd.safetensors`` beside
    ``NAME.gguf`` (or the diffusers folder ``NAME``). When it is there, the model
    decodes with it instead of its VAE."""
    name = model.stem if model.is_file() else model.name
    return model.with_name(name + TAESD_SIDECAR)


@dataclass(frozen=True)
class Entry:
    """A usable file (or diffusers folder): its name, path and detected family; a
    model of the models config carries its ``config`` (companions and defaults)."""

    name: str
    path: Path
    info: ModelInfo | None = None
    config: ConfiguredModel | None = None
    tiny: Path | None = None
    sha256: str | None = None
    facts: Mapping[str, Any] = field(default_factory=dict)
    """Set on a front end without model files: the tiny autoencoder, identity and facts
    the worker that holds the file registered."""

    @property
    def file_name(self) -> str:
        """How clients that list files name it (A1111's titles, ComfyUI's lists): the
        file's name, or a configured model's own name, since it is several files."""
        return self.config.name if self.config is not None else self.path.name

    @property
    def taesd(self) -> Path | None:
        """The tiny autoencoder a model decodes with: the config's, else its sidecar file."""
        if self.tiny is not None:
            return self.tiny
        if self.config is not None and "taesd" in self.config.companions:
            return self.config.companions["taesd"]
        tiny = taesd_sidecar(self.path)
        return tiny if tiny.is_file() else None


class Catalog:
    """Lists a folder's models, detecting each file's family once (per mtime)."""

    def __init__(self, settings: ServerSettings) -> None:
        self.models_dir, self.loras_dir, self.upscalers_dir = (
            settings.models_dir,
            settings.loras_dir,
            settings.upscalers_dir,
        )
        self.embeddings_dir, self.controlnets_dir = settings.embeddings_dir, settings.controlnets_dir
        self.vaes_dir = settings.vaes_dir
        self.settings = settings
        self._config: tuple[float, dict[str, ConfiguredModel]] | None = None
        self._embeddings: dict[tuple[Path, float], Embedding | NotAnEmbeddingError] = {}
        self._seen: dict[tuple[Path, float], ModelInfo | None] = {}
        self._facts_seen: dict[tuple[str, Path, float], dict[str, Any]] = {}
        self._lock = threading.Lock()  # concurrent first requests read each header once

    def _detect(self, path: Path) -> ModelInfo | None:
        key = (path, path.stat().st_mtime)
        with self._lock:
            if key not in self._seen:
                try:
                    self._seen[key] = detect(path)
                except InvalidModelError:
                    self._seen[key] = None  # not a model sfumato can load: not offered
            return self._seen[key]

    def configured(self) -> dict[str, ConfiguredModel]:
        """The models of the models config, read again when the file changes. An
        edit that breaks it is logged, and the models read before stay served.

        Raises
        ------
        ModelsConfigError
            When the config named by ``--config`` is missing, or is broken on its first read.
        """
        path = self.settings.models_config_path
        try:
            mtime = path.stat().st_mtime
        except OSError:
            if self.settings.models_config is not None:
                raise ModelsConfigError(path, None, None, "no such file (given as the models config)") from None
            return {}
        with self._lock:
            if self._config is not None and self._config[0] == mtime:
                return self._config[1]
            try:
                found = read_models_config(path, max_steps=self.settings.max_steps, max_pixels=self.settings.max_pixels)
            except ModelsConfigError as exc:
                if self._config is None:
                    raise
                logger.error("%s; the models read before stay served until it is fixed", exc)
                self._config = (mtime, self._config[1])
                return self._config[1]
            self._config = (mtime, found)
            return found

    def models(self) -> list[Entry]:
        """The diffusion models of ``models_dir`` that load alone, then the models
        of the models config (which also names the ones that need companion files:
        a split SDXL UNet, an SD3 or FLUX transformer). A configured model takes
        the place of a file of its name."""
        configured = self.configured()
        out = []
        for path in candidates(self.models_dir):
            name = path.stem if path.is_file() else path.name
            if path.name.endswith(TAESD_SIDECAR) or name in configured:
                continue
            info = self._detect(path)
            if info is not None and info.family != FAMILY_ESRGAN and not family_files(info).required:
                out.append(Entry(name, path, info))
        return out + [Entry(m.name, m.path, m.info, m) for m in configured.values()]

    def upscalers(self) -> list[Entry]:
        """The ESRGAN models of ``upscalers_dir``."""
        out = []
        for path in candidates(self.upscalers_dir):
            info = self._detect(path)
            if info is not None and info.family == FAMILY_ESRGAN:
                out.append(Entry(path.stem, path, info))
        return out

    def embeddings(self) -> tuple[list[Embedding], dict[str, str]]:
        """The textual-inversion embeddings of ``embeddings_dir`` (each file read once
        per mtime), and why each other candidate file is not one."""
        return scan_embeddings(self.embeddings_dir, self._read_embedding)

    def _read_embedding(self, path: Path) -> Embedding:
        key = (path, path.stat().st_mtime)
        with self._lock:
            if key not in self._embeddings:
                try:
                    self._embeddings[key] = read_embedding(path)
                except NotAnEmbeddingError as exc:
                    self._embeddings[key] = exc
            found = self._embeddings[key]
        if isinstance(found, NotAnEmbeddingError):
            raise found
        return found

    def controlnets(self) -> list[Entry]:
        """The ControlNet files of ``controlnets_dir`` (checked against a model when a request pairs them)."""
        return [Entry(p.stem, p) for p in candidates(self.controlnets_dir) if p.is_file()]

    def vaes(self) -> list[Entry]:
        """The VAE files of ``vaes_dir`` (checked against a model when a request pairs them)."""
        return [Entry(p.stem, p) for p in candidates(self.vaes_dir) if p.is_file()]

    def vae(self, name: str) -> Entry | None:
        """A VAE by its name or its file name."""
        return next((e for e in self.vaes() if name in (e.name, e.path.name)), None)

    def companions(self, roles: Collection[str]) -> list[Entry]:
        """The files the models config names in ``roles`` (each file once), by file name."""
        found = {
            path: None
            for model in self.configured().values()
            for role, path in model.companions.items()
            if role in roles
        }
        return [Entry(path.name, path) for path in sorted(found, key=lambda p: p.name)]

    def loras(self) -> list[Entry]:
        """The LoRA files of ``loras_dir``."""
        return [Entry(p.stem, p) for p in candidates(self.loras_dir) if p.is_file()]

    def model(self, name: str) -> Entry | None:
        return next((e for e in self.models() if e.name == name), None)

    def entry(self, key: str) -> Entry | None:
        """The model, or other file, a registration key names (``upscaler:NAME``,
        ``lora:NAME``, ``vae:NAME``, ``control_net:NAME``, ``embedding:NAME``)."""
        listings: dict[str, Callable[[], list[Entry]]] = {
            UPSCALER: self.upscalers,
            LORA: self.loras,
            VAE: self.vaes,
            CONTROL_NET: self.controlnets,
            EMBEDDING: lambda: [Entry(e.name, e.path) for e in self.embeddings()[0]],
        }
        for prefix, listing in listings.items():
            if key.startswith(prefix):
                return next((e for e in listing() if e.name == key.removeprefix(prefix)), None)
        return self.model(key)

    def hash_all(self) -> None:
        """Compute (or find in the cache) every model's and upscaler's identity."""
        for entry in [*self.models(), *self.upscalers()]:
            try:
                self.identity(entry)
            except OSError as exc:
                logger.warning("cannot hash %s: %s", entry.path, exc)

    def identity(self, entry: Entry, compute: bool = True) -> str | None:
        """What a model is, whatever its name: the sha256 of its file; for a diffusers
        folder or a configured model of several files, the sha256 of its files' hashes
        in order. ``None`` when not known yet and not ``compute``."""
        if entry.config is not None:
            files = [entry.path, *(entry.config.companions[role] for role in sorted(entry.config.companions))]
        elif entry.path.is_dir():
            files = sorted(p for p in entry.path.rglob("*") if p.is_file())
        else:
            return file_sha256(entry.path, compute)
        parts = [file_sha256(file, compute) for file in files]
        if any(part is None for part in parts):
            return None
        return hashlib.sha256("\n".join(f"{p}" for p in parts).encode()).hexdigest()

    def check_lora(self, entry: Entry, field: str) -> None:
        """Refuse a LoRA of the LoRA folder whose file holds no LoRA.

        Raises
        ------
        InvalidParameterError
            Naming ``field``.
        """
        check_lora_file(entry.path, field)

    def check_fits(self, entry: Entry, role: str, info: ModelInfo) -> None:
        """Refuse a VAE or ControlNet (``role``) of its folder that a model of ``info``'s
        family cannot take.

        Raises
        ------
        InvalidParameterError
            Naming the role.
        """
        try:
            check_companion(entry.path, role, info)
        except InvalidParameterError as exc:
            raise InvalidParameterError(role, exc.message) from None

    def absent(self, key: str) -> str | None:
        """Why a name no listing holds is not a bad name but a missing worker (a 503), or
        ``None``: a catalog of local folders lists everything it has."""
        return None

    def holdings(self) -> dict[str, dict[str, Any]]:
        """What a worker registers: everything its folders hold, by key (a model's
        name, ``upscaler:NAME``, ``lora:NAME``, ...), with the facts a front end without
        the files validates requests by, found by the same checks (each file's once per
        version of it)."""
        out: dict[str, dict[str, Any]] = {}
        for entry in self.models():
            out[entry.name] = _model_facts(entry)  # read from the entry: the catalog keeps its header's
        for entry in self.upscalers():
            out[UPSCALER + entry.name] = {"path": str(entry.path)}
        for entry in self.loras():
            out[LORA + entry.name] = self._facts(LORA + entry.name, entry, self._lora_facts)
        for entry in self.vaes():
            out[VAE + entry.name] = self._facts(VAE + entry.name, entry, partial(self._fit_facts, role="vae"))
        for entry in self.controlnets():
            key = CONTROL_NET + entry.name
            out[key] = self._facts(key, entry, partial(self._fit_facts, role="control_net"))
        found, unreadable = self.embeddings()
        for embedding in found:
            out[EMBEDDING + embedding.name] = {"path": str(embedding.path), "shapes": list(embedding.shapes)}
        for name, why in unreadable.items():
            out[EMBEDDING + name] = {"unreadable": why}
        return out

    def _facts(self, key: str, entry: Entry, find: Callable[[Entry], dict[str, Any]]) -> dict[str, Any]:
        stamp = (key, entry.path, entry.path.stat().st_mtime if entry.path.exists() else 0.0)
        with self._lock:
            known = self._facts_seen.get(stamp)
        if known is None:
            known = find(entry)
            with self._lock:
                self._facts_seen[stamp] = known
        return known

    def _lora_facts(self, entry: Entry) -> dict[str, Any]:
        try:
            self.check_lora(entry, "lora")
        except InvalidParameterError as exc:
            return {"path": str(entry.path), "refused": exc.message}
        return {"path": str(entry.path)}

    def _fit_facts(self, entry: Entry, role: str) -> dict[str, Any]:
        refused = {}
        for family in DIFFUSION_FAMILIES:
            try:
                self.check_fits(entry, role, ModelInfo(entry.path, family, "gguf"))
            except InvalidParameterError as exc:
                refused[family] = exc.message
        return {"path": str(entry.path), "refused": refused}


def _model_facts(entry: Entry) -> dict[str, Any]:
    """What a front end reads of a model: its file name, family (its detection), the
    models config's defaults and companions, and its tiny autoencoder."""
    info = asdict(entry.info) if entry.info is not None else None
    if info is not None:
        info["path"], info["carries"] = str(info["path"]), sorted(info["carries"])
    config = None
    if entry.config is not None:
        config = {
            "file": str(entry.config.path),
            "companions": {role: str(path) for role, path in entry.config.companions.items()},
            "prediction": entry.config.prediction,
            "defaults": dict(entry.config.defaults),
            "edits": entry.config.edits,
        }
    tiny = entry.taesd
    return {
        "path": str(entry.path),
        "info": info,
        "config": config,
        "taesd": str(tiny) if tiny is not None else None,
    }

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
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from sfumato.errors import InvalidModelError
from sfumato.families.companions import family_files
from sfumato.families.detect import FAMILY_ESRGAN, ModelInfo, detect
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

    @property
    def file_name(self) -> str:
        """How clients that list files name it (A1111's titles, ComfyUI's lists): the
        file's name, or a configured model's own name, since it is several files."""
        return self.config.name if self.config is not None else self.path.name

    @property
    def taesd(self) -> Path | None:
        """The tiny autoencoder a model decodes with: the config's, else its sidecar file."""
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

    @staticmethod
    def _candidates(folder: Path) -> list[Path]:
        if not folder.is_dir():
            return []
        return sorted(
            p
            for p in folder.iterdir()
            if (p.is_file() and p.suffix.lower() in MODEL_SUFFIXES) or (p.is_dir() and (p / "unet").is_dir())
        )

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
        for path in self._candidates(self.models_dir):
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
        for path in self._candidates(self.upscalers_dir):
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
        return [Entry(p.stem, p) for p in self._candidates(self.controlnets_dir) if p.is_file()]

    def vaes(self) -> list[Entry]:
        """The VAE files of ``vaes_dir`` (checked against a model when a request pairs them)."""
        return [Entry(p.stem, p) for p in self._candidates(self.vaes_dir) if p.is_file()]

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
        return [Entry(p.stem, p) for p in self._candidates(self.loras_dir) if p.is_file()]

    def model(self, name: str) -> Entry | None:
        return next((e for e in self.models() if e.name == name), None)

    def entry(self, route: str) -> Entry | None:
        """The model or (``upscaler:NAME``) upscaler a job's route names."""
        if route.startswith(UPSCALER):
            return next((e for e in self.upscalers() if e.name == route.removeprefix(UPSCALER)), None)
        return self.model(route)

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

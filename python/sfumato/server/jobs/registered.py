"""A front end's catalog without model files: what the live workers of a shared job
store registered.

``sfumato serve --workers 0 --store postgresql://...`` with no models folder lists
the union of what live workers hold, and validates each request by the facts their
registrations carry (family, companions, defaults, which VAEs and ControlNets fit
which family, which LoRAs hold LoRA tensors, embeddings' widths). Those facts come
from the checks a worker runs on its own files (:meth:`Catalog.holdings`), so a bad
request gets the same error through any front end. A name held by more than one
worker is taken from the oldest live one, and a job pins that file's sha256, so it
runs on a file the same as the one it was checked against.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

from sfumato.errors import InvalidParameterError
from sfumato.families.detect import ModelInfo
from sfumato.families.embeddings import Embedding
from sfumato.server.jobs.store import Holding, JobStore
from sfumato.server.models.catalog import CONTROL_NET, EMBEDDING, LORA, UPSCALER, VAE, Catalog, Entry
from sfumato.server.models.config import ConfiguredModel
from sfumato.server.settings import ServerSettings

REFRESH_S = 1.0
"""How long a front end reuses the registrations it read."""
KINDS = {UPSCALER: "upscaler", LORA: "LoRA", VAE: "VAE", CONTROL_NET: "ControlNet", EMBEDDING: "embedding"}
"""The kinds of registered files, by key prefix, as messages name them."""


def kind_of(key: str) -> tuple[str, str]:
    """What a registration key names: its kind (as messages say it) and its name."""
    for prefix, kind in KINDS.items():
        if key.startswith(prefix):
            return kind, key.removeprefix(prefix)
    return "model", key


class RegisteredCatalog(Catalog):
    """The catalog of a front end that holds no model files: the live workers'
    registrations (read again after :data:`REFRESH_S`)."""

    def __init__(self, settings: ServerSettings, store: JobStore) -> None:
        super().__init__(settings)
        self.store = store
        self._read: tuple[float, list[Holding]] | None = None
        self._reading = threading.Lock()

    def _holdings(self) -> list[Holding]:
        with self._reading:
            now = time.monotonic()
            if self._read is None or now - self._read[0] > REFRESH_S:
                self._read = (now, self.store.holdings(self.settings.lease_s))
            return self._read[1]

    def refresh(self) -> None:
        """Read the registrations again at the next call (a worker registered or left)."""
        with self._reading:
            self._read = None

    def _live(self, prefix: str) -> dict[str, Holding]:
        """The live holdings of one kind (``""``: models), by name; the oldest worker's first."""
        found: dict[str, Holding] = {}
        for held in self._holdings():
            if not held.live or kind_of(held.key)[0] != (KINDS.get(prefix) or "model"):
                continue
            found.setdefault(held.key.removeprefix(prefix), held)
        return found

    def _entries(self, prefix: str) -> list[Entry]:
        return [_file(name, held) for name, held in sorted(self._live(prefix).items())]

    def entry(self, key: str) -> Entry | None:
        kind, name = kind_of(key)
        if kind in ("model", "upscaler"):
            return super().entry(key)
        held = next((h for h in self._holdings() if h.live and h.key == key), None)
        return _file(name, held) if held is not None else None

    def configured(self) -> dict[str, ConfiguredModel]:
        return {e.name: e.config for e in self.models() if e.config is not None}

    def models(self) -> list[Entry]:
        """The live workers' models: their files by file name, then the models of their
        models configs, as a folder lists them."""
        found = [_model(name, held) for name, held in self._live("").items()]
        return sorted(found, key=lambda e: (e.config is not None, "" if e.config is not None else e.path.name))

    def upscalers(self) -> list[Entry]:
        return self._entries(UPSCALER)

    def loras(self) -> list[Entry]:
        return self._entries(LORA)

    def vaes(self) -> list[Entry]:
        return self._entries(VAE)

    def controlnets(self) -> list[Entry]:
        return self._entries(CONTROL_NET)

    def embeddings(self) -> tuple[list[Embedding], dict[str, str]]:
        found, unreadable = [], {}
        for name, held in sorted(self._live(EMBEDDING).items()):
            if "shapes" in held.facts:
                shapes = tuple((int(v), int(w)) for v, w in held.facts["shapes"])
                found.append(Embedding(name, Path(held.facts["path"]), shapes))
            else:
                unreadable[name] = str(held.facts.get("unreadable", "not registered with its shapes"))
        return found, unreadable

    def companions(self, roles: Collection[str]) -> list[Entry]:
        found = {
            path.name: path
            for model in self.configured().values()
            for role, path in model.companions.items()
            if role in roles
        }
        return [Entry(name, found[name]) for name in sorted(found)]

    def identity(self, entry: Entry, compute: bool = True) -> str | None:
        """The sha256 the worker that holds it registered (``None`` until it is hashed)."""
        return entry.sha256

    def hash_all(self) -> None:
        """Nothing to hash: the workers hash their own files."""

    def check_lora(self, entry: Entry, field: str) -> None:
        refused = entry.facts.get("refused")
        if refused:
            raise InvalidParameterError(field, str(refused))

    def check_fits(self, entry: Entry, role: str, info: ModelInfo) -> None:
        refused = entry.facts.get("refused", {}).get(info.family)
        if refused:
            raise InvalidParameterError(role, str(refused))

    def absent(self, key: str) -> str | None:
        """Why ``key`` is no live worker's: none is live yet, or the workers that held it
        left (a 503 until one that holds it registers); ``None`` for a name no worker ever
        registered (a bad name)."""
        held = self._holdings()
        kind, name = kind_of(key)
        if not any(h.live for h in held):
            return (
                f"no worker is registered with the job store yet, so no {kind} can run (this front end holds no "
                "model files: start sfumato worker with its --models folder; requests succeed once it registers)"
            )
        gone = next((h for h in held if not h.live and h.key == key), None)
        if gone is None:
            return None
        ago = max(0.0, time.time() - gone.last_seen)
        return (
            f"no live worker holds {kind} {name!r}: worker {gone.worker} held it and left {ago:.0f} s ago "
            f"(start a sfumato worker that holds it)"
        )


def _file(name: str, held: Holding) -> Entry:
    """A registered file other than a model, as an entry: its path on the worker, its sha256 and facts."""
    return Entry(name, Path(held.facts.get("path", name)), sha256=held.identity, facts=held.facts)


def _model(name: str, held: Holding) -> Entry:
    """A registered model as an entry: its detection and models-config table as the worker read them."""
    facts: dict[str, Any] = dict(held.facts)
    info = _info(facts["info"]) if facts.get("info") else None
    config = None
    table = facts.get("config")
    if table and info is not None:
        config = ConfiguredModel(
            name=name,
            path=Path(table["file"]),
            info=info,
            companions={role: Path(path) for role, path in table["companions"].items()},
            prediction=table["prediction"],
            defaults=table["defaults"],
            edits=table.get("edits", False),
        )
    tiny = Path(facts["taesd"]) if facts.get("taesd") else None
    return Entry(name, Path(facts.get("path", name)), info, config, tiny=tiny, sha256=held.identity, facts=facts)


def _info(data: dict[str, Any]) -> ModelInfo:
    return ModelInfo(**{**data, "path": Path(data["path"]), "carries": frozenset(data["carries"])})

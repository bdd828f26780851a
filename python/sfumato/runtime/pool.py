"""Model residency: reuse of identical loads, reference counts, and a memory budget.

Loading the same source with the same config again returns the same model id
and counts one more reference; the model is unloaded when the last reference
is. A budget (``max_loaded_models`` and/or ``max_loaded_bytes`` of worker
memory) is kept by evicting the least recently used idle model from memory
before another one loads. An evicted model keeps its id: its next job loads it
again, in a new worker.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from sfumato.errors import InvalidParameterError, UnknownModelIdError
from sfumato.runtime.host import ModelHost

logger = logging.getLogger("sfumato.runtime")


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise InvalidParameterError(name, f"must be a positive integer, got {raw!r}")
    return int(raw)


@dataclass
class Budget:
    """Limits on what stays in memory; ``None`` is no limit.

    The defaults come from ``SFUMATO_MAX_LOADED_MODELS`` and
    ``SFUMATO_MAX_LOADED_BYTES``.
    """

    max_loaded_models: int | None = None
    max_loaded_bytes: int | None = None

    @classmethod
    def from_env(cls) -> Budget:
        return cls(_env_int("SFUMATO_MAX_LOADED_MODELS"), _env_int("SFUMATO_MAX_LOADED_BYTES"))


class ModelPool:
    """The loaded models of the SDK, by id."""

    def __init__(self, budget: Budget | None = None) -> None:
        self.budget = budget or Budget()
        self._lock = threading.RLock()
        self._load_lock = threading.Lock()
        self._hosts: dict[str, ModelHost] = {}
        self._keys: dict[Hashable, str] = {}
        self._refs: dict[str, int] = {}
        self._estimates: dict[str, int] = {}

    def acquire(
        self, key: Hashable, model_id: str, create: Callable[[], ModelHost], estimate_bytes: int
    ) -> tuple[str, bool]:
        """The id of the model loaded as ``key`` and whether it was loaded now.

        The first time, ``create`` loads it as ``model_id`` (it must return a
        started host); ``estimate_bytes`` sizes it for the budget until its
        worker's memory has been measured.
        """
        with self._load_lock:  # loads run one at a time, so the budget sees each
            with self._lock:
                existing = self._keys.get(key)
                if existing is not None:
                    self._refs[existing] += 1
                    return existing, False
                self._estimates[model_id] = estimate_bytes
            try:
                host = create()
            except BaseException:
                with self._lock:
                    self._estimates.pop(model_id, None)
                raise
            with self._lock:
                self._hosts[model_id] = host
                self._keys[key] = model_id
                self._refs[model_id] = 1
            return model_id, True

    def get(self, model_id: str) -> ModelHost:
        with self._lock:
            host = self._hosts.get(model_id)
        if host is None:
            raise UnknownModelIdError(f"no loaded model has id {model_id!r} (never loaded, or unloaded)")
        return host

    def release(self, model_id: str) -> ModelHost | None:
        """Drop one reference; returns the host, closed, when it was the last."""
        host = self.get(model_id)
        with self._lock:
            self._refs[model_id] -= 1
            if self._refs[model_id] > 0:
                return None
            del self._hosts[model_id], self._refs[model_id], self._estimates[model_id]
            self._keys = {k: v for k, v in self._keys.items() if v != model_id}
        host.close()
        return host

    def shutdown(self) -> None:
        """Unload every model, whatever its references (at interpreter exit)."""
        with self._lock:
            hosts = list(self._hosts.values())
            self._hosts.clear()
            self._keys.clear()
            self._refs.clear()
            self._estimates.clear()
        for host in hosts:
            host.close()

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._hosts)

    def refs(self, model_id: str) -> int:
        with self._lock:
            return self._refs.get(model_id, 0)

    def _size(self, host: ModelHost) -> int:
        if host.ready is not None:
            return host.ready.rss_bytes
        with self._lock:
            return self._estimates.get(host.model.model_id, 0)

    def make_room(self, incoming: ModelHost) -> None:
        """Evict least recently used idle models until ``incoming`` fits the budget.

        Called before a worker starts. Busy models are never evicted: when only
        busy ones remain, the budget is exceeded for a while and a warning says so.
        """
        limit_models, limit_bytes = self.budget.max_loaded_models, self.budget.max_loaded_bytes
        if limit_models is None and limit_bytes is None:
            return
        with self._lock:
            others = [h for h in self._hosts.values() if h is not incoming and h.resident]
        others.sort(key=lambda h: h.last_used)
        need = self._size(incoming)

        def over() -> bool:
            count_over = limit_models is not None and len(others) + 1 > limit_models
            bytes_over = limit_bytes is not None and sum(map(self._size, others)) + need > limit_bytes
            return count_over or bytes_over

        for host in list(others):
            if not over():
                return
            if host.evict():
                others.remove(host)
        if over():
            logger.warning(
                "memory budget exceeded: %d model(s) resident besides %s, none idle to evict",
                len(others), incoming.model.model_id,
            )  # fmt: skip

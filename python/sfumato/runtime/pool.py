"""Model residency: reuse of identical loads, reference counts, and a memory
budget per device.

Loading the same source with the same config again returns the same model id
and counts one more reference; the model is unloaded when the last reference
is. Each device has a budget (``max_loaded_models`` and ``max_loaded_bytes``; the
bytes default to the device's memory: RAM for the CPU, VRAM for a GPU). Before a
model loads, the least recently used idle models *of its device* are evicted until
it fits; when it cannot fit even so (its own size, or busy models), the load is
refused with :class:`~sfumato.errors.InsufficientMemoryError`. A busy model is
never evicted. An evicted model keeps its id: its next job loads it again, in a
new worker. A model's size is its worker's resident memory on the CPU, and its
weights' estimate on a GPU (whose memory the process's RSS does not show).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from sfumato.errors import InsufficientMemoryError, InvalidParameterError, UnknownModelIdError
from sfumato.runtime.host import ModelHost


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
        """The budget of every device without one of its own."""
        self.device_budgets: dict[str, Budget] = {}
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

    def budget_of(self, device: str) -> Budget:
        """The budget ``device`` is held to."""
        with self._lock:
            return self.device_budgets.get(device, self.budget)

    def _size(self, host: ModelHost) -> int:
        if host.model.device == "CPU" and host.ready is not None:
            return host.ready.rss_bytes
        with self._lock:
            return self._estimates.get(host.model.model_id, 0)

    def make_room(self, incoming: ModelHost) -> None:
        """Evict least recently used idle models of ``incoming``'s device until it fits
        that device's budget. Called before a worker starts.

        Raises
        ------
        InsufficientMemoryError
            When it does not fit even so: it is larger than the budget, or the
            models that would have to go are busy (never evicted).
        """
        device = incoming.model.device
        budget = self.budget_of(device)
        limit_models = budget.max_loaded_models
        limit_bytes = budget.max_loaded_bytes or incoming.model.device_bytes or None
        with self._lock:
            others = [h for h in self._hosts.values() if h is not incoming and h.resident and h.model.device == device]
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
            held = sum(map(self._size, others))
            limits = [f"{limit_models} model(s)"] if limit_models is not None else []
            limits += [f"{_mib(limit_bytes)}"] if limit_bytes is not None else []
            if limit_bytes is not None and need > limit_bytes:
                why = "it is larger than the budget"
            else:
                busy = ", ".join(h.model.model_id for h in others)
                why = f"{len(others)} busy model(s) hold {_mib(held)} there ({busy}), and a busy model is never evicted"
            raise InsufficientMemoryError(
                f"model {incoming.model.model_id} ({_mib(need)}) does not fit {device}'s memory budget of "
                f"{' and '.join(limits)}: {why}; raise the budget (set_memory_budget, SFUMATO_MAX_LOADED_BYTES), "
                "unload a model or choose another device"
            )


def _mib(size: int) -> str:
    return f"{size / 2**20:.0f} MiB"

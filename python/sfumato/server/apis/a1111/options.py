"""A1111's settings store (``/options``) over the job store, and the current model it names."""

from __future__ import annotations

from typing import Any

from sfumato.errors import InvalidParameterError
from sfumato.server.apis.a1111.schemas import OPTION_DEFAULTS, OWN_VAE, HonouredOptions, PreviewOptions, validated
from sfumato.server.planning import pick_entry
from sfumato.server.state import ServerState


def current_model(state: ServerState) -> str | None:
    """The model a request that names none runs: the default, else the folder's first."""
    available = state.catalog.models()
    return state.runner.default_model or (available[0].name if available else None)


def options(state: ServerState) -> dict[str, Any]:
    """A1111's settings: its defaults, what clients stored, and the current model's title."""
    current = state.catalog.model(current_model(state) or "")
    return {
        **OPTION_DEFAULTS,
        **state.store.options(),
        "sd_model_checkpoint": current.file_name if current else None,
    }


def restore_default_model(state: ServerState) -> None:
    """Make the model a client chose last the default again, unless the server was
    started with one."""
    stored = state.store.options().get("sd_model_checkpoint")
    if state.settings.default_model is None and isinstance(stored, str):
        state.runner.default_model = next((e.name for e in state.catalog.models() if stored == e.file_name), None)


def set_options(state: ServerState, written: dict[str, Any]) -> None:
    """Store the settings given (durably, with the jobs), after checking the ones sfumato
    acts on; ``sd_model_checkpoint`` switches the default model."""
    merged = {**options(state), **written}
    vae = validated(HonouredOptions, merged).vae()
    validated(PreviewOptions, merged)
    if vae is not None and state.catalog.vae(vae) is None:
        have = ", ".join([*OWN_VAE[:2], *(e.path.name for e in state.catalog.vaes())])
        raise InvalidParameterError("sd_vae", f"no VAE named {vae!r}; available: {have}")
    if "sd_model_checkpoint" in written:
        if not isinstance(written["sd_model_checkpoint"], str):
            raise InvalidParameterError("sd_model_checkpoint", "must be a model's title or name")
        entry = pick_entry(state, written["sd_model_checkpoint"], "sd_model_checkpoint")
        state.runner.default_model = entry.name
        written = {**written, "sd_model_checkpoint": entry.file_name}
    state.store.set_options(written)

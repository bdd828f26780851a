"""Sampler and scheduler names as HTTP clients spell them, mapped to the engine's."""

from __future__ import annotations

from sfumato.errors import InvalidParameterError
from sfumato.params import SAMPLING_METHODS, SCHEDULER_NAMES

# Display name -> (engine sampling method, scheduler the name implies or None).
SAMPLER_TITLES: dict[str, tuple[str, str | None]] = {
    "Euler": ("euler", None), "Euler a": ("euler_a", None), "Heun": ("heun", None), "DPM2": ("dpm2", None),
    "DPM++ 2S a": ("dpm++2s_a", None), "DPM++ 2M": ("dpm++2m", None), "DPM++ 2M Karras": ("dpm++2m", "karras"),
    "DPM++ 2S a Karras": ("dpm++2s_a", "karras"), "DPM2 Karras": ("dpm2", "karras"),
    "Euler Karras": ("euler", "karras"), "Heun Karras": ("heun", "karras"), "LCM": ("lcm", None),
    "DDIM": ("ddim_trailing", None), "TCD": ("tcd", None), "IPNDM": ("ipndm", None), "IPNDM_V": ("ipndm_v", None),
    "Res Multistep": ("res_multistep", None), "ER SDE": ("er_sde", None),
}  # fmt: skip

# Display name (lower case) -> engine scheduler.
SCHEDULER_TITLES: dict[str, str] = {
    "automatic": "", "uniform": "discrete", "normal": "discrete", "karras": "karras", "exponential": "exponential",
    "sgm uniform": "sgm_uniform", "simple": "simple", "align your steps": "ays", "kl optimal": "kl_optimal",
    "smoothstep": "smoothstep", "gits": "gits", "lcm": "lcm",
}  # fmt: skip


def sampler(name: str, field: str) -> tuple[str, str | None]:
    """The engine sampling method (and implied scheduler) for a display or engine name."""
    if name in SAMPLER_TITLES:
        return SAMPLER_TITLES[name]
    if name in SAMPLING_METHODS:
        return name, None
    known = f"{', '.join(SAMPLER_TITLES)} or an engine name ({', '.join(SAMPLING_METHODS)})"
    raise InvalidParameterError(field, f"unknown sampler {name!r}; use one of {known}")


def scheduler(name: str, field: str) -> str | None:
    """The engine scheduler for a display or engine name (``None``: the engine's default)."""
    if name in SCHEDULER_NAMES:
        return name
    if name.lower() in SCHEDULER_TITLES:
        return SCHEDULER_TITLES[name.lower()] or None
    raise InvalidParameterError(field, f"unknown scheduler {name!r}; use one of {', '.join(SCHEDULER_NAMES)}")


def sampler_title(method: str | None) -> str:
    """The display name of an engine sampling method (its engine name where no title is
    only that method; "Automatic" for the engine's choice)."""
    titles = (title for title, (engine, implied) in SAMPLER_TITLES.items() if engine == method and implied is None)
    return next(titles, method or "Automatic")


def scheduler_title(name: str | None) -> str:
    """The display name of an engine scheduler ("Automatic" for the engine's choice)."""
    titles = (title for title, engine in SCHEDULER_TITLES.items() if engine == (name or ""))
    return next(titles, name or "automatic").title()


# ComfyUI's sampler names -> the engine's; only names the engine runs are offered.
COMFY_SAMPLERS: dict[str, str] = {
    "euler": "euler", "euler_ancestral": "euler_a", "heun": "heun", "dpm_2": "dpm2",
    "dpmpp_2s_ancestral": "dpm++2s_a", "dpmpp_2m": "dpm++2m", "lcm": "lcm", "ipndm": "ipndm", "ipndm_v": "ipndm_v",
    "ddim": "ddim_trailing", "res_multistep": "res_multistep", "er_sde": "er_sde",
    # The engine's own, under their engine names (ComfyUI has no such sampler).
    "tcd": "tcd", "res_2s": "res_2s", "dpm++2mv2": "dpm++2mv2",
}  # fmt: skip

# ComfyUI's scheduler names -> the engine's; the engine's extras under their own names.
COMFY_SCHEDULERS: dict[str, str] = {
    "normal": "discrete", "karras": "karras", "exponential": "exponential", "sgm_uniform": "sgm_uniform",
    "simple": "simple", "kl_optimal": "kl_optimal",
    "ays": "ays", "gits": "gits", "smoothstep": "smoothstep", "lcm": "lcm", "bong_tangent": "bong_tangent",
}  # fmt: skip

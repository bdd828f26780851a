"""Sampling settings that few-step distilled checkpoints need.

Distilled SDXL variants are ordinary SDXL files (detection cannot tell them
apart), but they only make pictures with the settings they were distilled
for. Each preset is a mapping of :func:`sfumato.diffusion` keyword arguments:

    sfumato.diffusion(model_id, prompt="a lighthouse", **sfumato.presets.SDXL_TURBO)

A keyword given after the preset overrides it. With ``cfg_scale=1`` the engine
runs no unconditional pass, so each step costs one UNet evaluation instead of
two, and ``negative_prompt`` has no effect.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

SDXL_TURBO: Mapping[str, Any] = MappingProxyType(
    {"sampling_method": "euler_a", "steps": 1, "cfg_scale": 1.0, "width": 512, "height": 512}
)
"""SDXL-Turbo (adversarial diffusion distillation): 1 step (up to 4), no
classifier-free guidance, trained at 512x512."""

SDXL_LIGHTNING_4STEP: Mapping[str, Any] = MappingProxyType(
    {
        "sampling_method": "euler",
        "scheduler": "sgm_uniform",
        "steps": 4,
        "cfg_scale": 1.0,
        "width": 1024,
        "height": 1024,
    }
)
"""SDXL-Lightning 4-step checkpoints: Euler on evenly spaced ("trailing")
timesteps, no classifier-free guidance, 1024x1024. The 2- and 8-step
checkpoints take the same settings with ``steps`` 2 or 8."""

PRESETS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {"sdxl-turbo": SDXL_TURBO, "sdxl-lightning-4step": SDXL_LIGHTNING_4STEP}
)
"""The presets by name (the CLI's ``--preset``)."""

"""The models a worker loads for its jobs: what identifies one (:class:`LoadKey`), and
the file and ``model_config`` the catalog gives it."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sfumato.errors import SfumatoError
from sfumato.families.embeddings import TEXT_WIDTHS
from sfumato.params import HIRES_UPSCALERS, DiffusionParams, HiresConfig
from sfumato.server.models.catalog import LORA, UPSCALER, Catalog
from sfumato.server.settings import ServerSettings


@dataclass(frozen=True)
class LoadKey:
    """A loaded model as jobs ask for it: a catalog model (or, ``upscaler``, an ESRGAN of
    the upscalers folder), with a ControlNet, a VAE in place of its own and a paired
    ESRGAN (``esrgan``) of their folders; each combination is its own SDK model."""

    name: str
    upscaler: bool = False
    control_net: str | None = None
    vae: str | None = None
    esrgan: str | None = None

    @property
    def served_as(self) -> str:
        """The name a worker registers it under (an upscaler as ``upscaler:NAME``)."""
        return UPSCALER + self.name if self.upscaler else self.name

    def same_model(self, other: LoadKey) -> bool:
        """Whether ``other`` is this model with another VAE or paired ESRGAN: loading one
        unloads the other's idle worker, so that switching the VAE reloads the model."""
        return (self.name, self.upscaler, self.control_net) == (other.name, other.upscaler, other.control_net)


def load_arguments(catalog: Catalog, settings: ServerSettings, key: LoadKey) -> tuple[Path, dict[str, Any]]:
    """The file and ``model_config`` that load ``key``.

    Raises
    ------
    SfumatoError
        When a file it names is no longer in its folder.
    """
    entries = catalog.upscalers() if key.upscaler else catalog.models()
    entry = next((e for e in entries if e.name == key.name), None)
    if entry is None:
        raise SfumatoError(f"{'upscaler' if key.upscaler else 'model'} {key.name!r} is no longer in its folder")
    config: dict[str, Any] = {"threads": settings.threads, "device": settings.device, "precision": settings.precision}
    if key.upscaler:
        return entry.path, {**config, "mode": "upscale"}
    if entry.config is not None:
        config.update(entry.config.load_config())
    if entry.taesd is not None:
        config["taesd_src"] = entry.taesd
    if key.control_net is not None:
        control = next((e for e in catalog.controlnets() if e.name == key.control_net), None)
        if control is None:
            raise SfumatoError(f"ControlNet {key.control_net!r} is no longer in its folder")
        config["control_net_src"] = control.path
    if key.vae is not None:
        paired = catalog.vae(key.vae)
        if paired is None:
            raise SfumatoError(f"VAE {key.vae!r} is no longer in its folder")
        config["vae_model_src"] = paired.path
    if key.esrgan is not None:
        esrgan = next((e for e in catalog.upscalers() if e.name == key.esrgan), None)
        if esrgan is None:
            raise SfumatoError(f"upscaler {key.esrgan!r} is no longer in its folder")
        config["upscaler"] = {"model_src": esrgan.path}
    if entry.info is not None and entry.info.family in TEXT_WIDTHS and catalog.embeddings_dir.is_dir():
        config["embedding_dir"] = catalog.embeddings_dir
    return entry.path, config


def local_files(catalog: Catalog, work: DiffusionParams) -> DiffusionParams:
    """A planned generation with the files it names (LoRAs, a hires ESRGAN) as this
    machine's paths, found in its folders by name (a plan of version 3 or before names
    them by path already).

    Raises
    ------
    SfumatoError
        When a file it names is no longer in its folder.
    """
    loras = []
    for lora in work.loras:
        if "name" in lora:
            entry = catalog.entry(LORA + str(lora["name"]))
            if entry is None:
                raise SfumatoError(f"LoRA {lora['name']!r} is no longer in its folder")
            lora = {"path": str(entry.path.resolve()), "scale": lora["scale"]}
        loras.append(lora)
    hires = work.hires
    if isinstance(hires, HiresConfig) and hires.upscaler not in HIRES_UPSCALERS:
        if not Path(str(hires.upscaler)).is_absolute():
            entry = catalog.entry(UPSCALER + str(hires.upscaler))
            if entry is None:
                raise SfumatoError(f"upscaler {hires.upscaler!r} is no longer in its folder")
            hires = replace(hires, upscaler=str(entry.path))
    return replace(work, loras=tuple(loras), hires=hires)

"""The typed plan of a server job (:class:`JobPlan`) and its JSON form in the job store.

:meth:`JobPlan.to_json` writes it; :meth:`JobPlan.from_json` reads it back,
including the untyped plans (version 1) of stores written before plans had a
version, and refuses by name a plan it cannot read.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Literal

from sfumato.params import HIRES_UPSCALERS, DiffusionParams, HiresConfig
from sfumato.server.models.catalog import CONTROL_NET, LORA, UPSCALER, VAE


def _b64(data: bytes | None) -> str | None:
    return base64.b64encode(data).decode() if data is not None else None


def _unb64(data: str | None) -> bytes | None:
    return base64.b64decode(data) if data is not None else None


FileType = Literal["png", "jpg", "webp"]
"""How the outputs folder keeps images (webp for the OpenAI API's ``output_format``)."""


_IMAGES = ("init_image", "mask", "control_image")
"""The fields of a generation that hold an image file's bytes (base64 in the JSON form)."""


def params_to_json(params: DiffusionParams) -> dict[str, Any]:
    """The JSON form of a planned generation: its fields by their SDK names, images in
    base64, ``hires`` as its fields."""
    out = {f.name: getattr(params, f.name) for f in fields(DiffusionParams)}
    for name in _IMAGES:
        out[name] = _b64(out[name])
    out["init_images"] = [_b64(image) for image in params.init_images]
    out["loras"] = [dict(lora) for lora in params.loras]
    out["hires"] = asdict(params.hires) if isinstance(params.hires, HiresConfig) else None
    return out


def params_from_json(data: Mapping[str, Any]) -> DiffusionParams:
    """A planned generation as :func:`params_to_json` wrote it (or version 2's form, the
    same keys less some; what is missing takes its default)."""
    known = {f.name for f in fields(DiffusionParams)}
    values = {k: v for k, v in data.items() if k in known}
    for name in _IMAGES:
        values[name] = _unb64(values.get(name))
    values["init_images"] = tuple(base64.b64decode(image) for image in values.get("init_images", ()))
    values["loras"] = tuple(dict(lora) for lora in values.get("loras", ()))
    hires = values.get("hires")
    values["hires"] = HiresConfig(**hires) if hires is not None else None
    return DiffusionParams(**values)


@dataclass(frozen=True)
class Upscale:
    """The SDK's ``upscale`` fields of an upscale-only job."""

    image: bytes
    repeats: int = 1

    def to_json(self) -> dict[str, Any]:
        return {"image": _b64(self.image), "repeats": self.repeats}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Upscale:
        return cls(image=base64.b64decode(data["image"]), repeats=data.get("repeats", 1))


@dataclass(frozen=True)
class Refiner:
    """The catalog model that refines a generation's images, from ``switch_at`` of the denoising on."""

    model: str
    switch_at: float


class PlanVersionError(ValueError):
    """A stored plan this version of sfumato cannot read."""


@dataclass(frozen=True)
class JobPlan:
    """What the runner executes for one job.

    Attributes
    ----------
    model:
        The catalog name of the model to run: a diffusion model, or for an
        :class:`Upscale` job an upscaler.
    work:
        The generation, as the SDK's parameters checked once when the plan was made
        (the size resolved, LoRAs and a hires ESRGAN named as their folders list them,
        images as file bytes), or the upscale.
    refiner:
        A second model that refines the generation's images.
    control_net:
        The catalog name of the ControlNet the model loads with, for the
        generation's ``control_image``.
    vae:
        The catalog name of a VAE file the model loads with, decoding (and
        encoding) in its own VAE's place.
    esrgan:
        The catalog name of the upscaler the model loads paired with, for the
        generation's ``upscale`` passes.
    file_type, jpeg_quality:
        How the outputs folder keeps the images.
    """

    VERSION: ClassVar[int] = 4
    """Version 1 was the untyped dict of the same keys, without ``version``; version 2
    kept fewer of the generation's fields (and hires without ``tile_size``); version 3
    named LoRAs and a hires ESRGAN by their paths on the accepting machine, where
    version 4 names them as their folders list them (each worker finds its own file)."""

    model: str
    work: DiffusionParams | Upscale
    refiner: Refiner | None = None
    control_net: str | None = None
    vae: str | None = None
    esrgan: str | None = None
    file_type: FileType = "png"
    jpeg_quality: int = 85

    @property
    def generation(self) -> DiffusionParams:
        """The generation of a generation job.

        Raises
        ------
        TypeError
            For an upscale job.
        """
        if not isinstance(self.work, DiffusionParams):
            raise TypeError(f"the plan of model {self.model!r} is an upscale, not a generation")
        return self.work

    def files(self) -> list[str]:
        """The other files the plan names beside its model, as workers register them
        (``lora:NAME``, ``vae:NAME``, ``control_net:NAME``, ``upscaler:NAME``, a refiner's
        model name): a worker runs the job only if it holds each of them."""
        keys = [] if self.refiner is None else [self.refiner.model]
        if isinstance(self.work, DiffusionParams):
            keys += [LORA + str(lora["name"]) for lora in self.work.loras if "name" in lora]
            hires = self.work.hires
            if isinstance(hires, HiresConfig) and hires.upscaler not in HIRES_UPSCALERS:
                keys.append(UPSCALER + str(hires.upscaler))
        named = {CONTROL_NET: self.control_net, VAE: self.vae, UPSCALER: self.esrgan}
        keys += [prefix + name for prefix, name in named.items() if name is not None]
        return list(dict.fromkeys(keys))

    @staticmethod
    def stored_prompt(data: Mapping[str, Any]) -> str:
        """The prompt of a plan in its JSON form (any version), without decoding its
        images: what a listing of many jobs needs. Empty for an upscale or an unreadable plan."""
        params = data.get("params")
        prompt = params.get("prompt") if "model" in data and isinstance(params, Mapping) else None
        return prompt if isinstance(prompt, str) else ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "version": self.VERSION,
            "params": self.work.to_json() if isinstance(self.work, Upscale) else params_to_json(self.work),
            "file_type": self.file_type,
            "jpeg_quality": self.jpeg_quality,
        }
        out["upscaler" if isinstance(self.work, Upscale) else "model"] = self.model
        if self.refiner is not None:
            out["refiner"] = asdict(self.refiner)
        files = {"control_net": self.control_net, "vae": self.vae, "esrgan": self.esrgan}
        return out | {key: name for key, name in files.items() if name is not None}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> JobPlan:
        """A plan as :meth:`to_json` wrote it, or as version 1 stored it.

        Raises
        ------
        PlanVersionError
            For a plan of a later version, or one that is not a plan.
        """
        version = data.get("version", 1)
        if not isinstance(version, int) or not 1 <= version <= cls.VERSION:
            raise PlanVersionError(
                f"the stored plan has version {version!r}; this sfumato reads versions 1 to {cls.VERSION}"
            )
        try:
            refiner = data.get("refiner")
            work: DiffusionParams | Upscale
            if "upscaler" in data:
                model, work = data["upscaler"], Upscale.from_json(data["params"])
            else:
                model, work = data["model"], params_from_json(data["params"])
            return cls(
                model=model,
                work=work,
                refiner=Refiner(**refiner) if refiner else None,
                control_net=data.get("control_net"),
                vae=data.get("vae"),
                esrgan=data.get("esrgan"),
                file_type=data["file_type"],
                jpeg_quality=data["jpeg_quality"],
            )
        except (KeyError, TypeError, binascii.Error) as exc:
            message = f"the stored plan is not a version-{version} plan: {type(exc).__name__}: {exc}"
            raise PlanVersionError(message) from None

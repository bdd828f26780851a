"""The typed plan of a server job (:class:`JobPlan`) and its JSON form in the job store.

:meth:`JobPlan.to_json` writes it; :meth:`JobPlan.from_json` reads it back,
including the untyped plans (version 1) of stores written before plans had a
version, and refuses by name a plan it cannot read.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal

from sfumato.params import DiffusionParams


def _b64(data: bytes | None) -> str | None:
    return base64.b64encode(data).decode() if data is not None else None


def _unb64(data: str | None) -> bytes | None:
    return base64.b64decode(data) if data is not None else None


FileType = Literal["png", "jpg", "webp"]
"""How the outputs folder keeps images (webp for the OpenAI API's ``output_format``)."""


@dataclass(frozen=True)
class Lora:
    """A LoRA resolved in the LoRA folder: its file and strength."""

    path: str
    scale: float


@dataclass(frozen=True)
class Hires:
    """Hires fix as checked: ``upscaler`` is ``"Latent"`` (or another latent mode) or an ESRGAN file's path."""

    scale: float
    upscaler: str
    steps: int
    denoising_strength: float


@dataclass(frozen=True)
class Generation:
    """The SDK's ``diffusion`` fields of a generation job, checked."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    cfg_scale: float | None
    sampling_method: str | None
    scheduler: str | None
    seed: int
    batch_count: int
    strength: float
    init_image: bytes | None = None
    mask: bytes | None = None
    hires: Hires | None = None
    loras: tuple[Lora, ...] = ()
    control_image: bytes | None = None
    control_strength: float = 0.9
    preview: str | None = None
    preview_interval: int = 1
    clip_skip: int = DiffusionParams.clip_skip
    guidance: float = DiffusionParams.guidance
    upscale: int = 0
    """ESRGAN passes over the decoded images (the plan's ``esrgan``)."""

    def _fields(self, image: Callable[[bytes | None], Any]) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in _GENERATION_SCALARS}
        out.update(init_image=image(self.init_image), mask=image(self.mask))
        out.update(control_image=image(self.control_image), control_strength=self.control_strength)
        out.update(preview=self.preview, preview_interval=self.preview_interval)
        out.update(clip_skip=self.clip_skip, guidance=self.guidance)
        out["upscale"] = {"repeats": self.upscale} if self.upscale else None
        out.update(loras=[asdict(lora) for lora in self.loras], hires=asdict(self.hires) if self.hires else None)
        return out

    def sdk_arguments(self) -> dict[str, Any]:
        """Keyword arguments of :func:`sfumato.diffusion`."""
        return self._fields(lambda data: data)

    def to_json(self) -> dict[str, Any]:
        """The JSON form: images in base64."""
        return self._fields(_b64)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Generation:
        hires = data.get("hires")
        return cls(
            **{k: data[k] for k in _GENERATION_SCALARS},
            init_image=_unb64(data.get("init_image")),
            mask=_unb64(data.get("mask")),
            hires=Hires(**hires) if hires is not None else None,
            loras=tuple(Lora(**lora) for lora in data.get("loras", ())),
            control_image=_unb64(data.get("control_image")),
            control_strength=data.get("control_strength", cls.control_strength),
            preview=data.get("preview"),
            preview_interval=data.get("preview_interval", cls.preview_interval),
            clip_skip=data.get("clip_skip", cls.clip_skip),
            guidance=data.get("guidance", cls.guidance),
            upscale=(data.get("upscale") or {}).get("repeats", 0),
        )


_GENERATION_SCALARS = (
    "prompt",
    "negative_prompt",
    "width",
    "height",
    "steps",
    "cfg_scale",
    "sampling_method",
    "scheduler",
    "seed",
    "batch_count",
    "strength",
)


@dataclass(frozen=True)
class Upscale:
    """The SDK's ``upscale`` fields of an upscale-only job."""

    image: bytes
    repeats: int = 1

    def sdk_arguments(self) -> dict[str, Any]:
        """Keyword arguments of :func:`sfumato.upscale`."""
        return {"image": self.image, "repeats": self.repeats}

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
        The generation or the upscale.
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

    VERSION: ClassVar[int] = 2
    """Version 1 was the untyped dict of the same keys, without ``version``."""

    model: str
    work: Generation | Upscale
    refiner: Refiner | None = None
    control_net: str | None = None
    vae: str | None = None
    esrgan: str | None = None
    file_type: FileType = "png"
    jpeg_quality: int = 85

    @property
    def generation(self) -> Generation:
        """The generation of a generation job.

        Raises
        ------
        TypeError
            For an upscale job.
        """
        if not isinstance(self.work, Generation):
            raise TypeError(f"the plan of model {self.model!r} is an upscale, not a generation")
        return self.work

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
            "params": self.work.to_json(),
            "file_type": self.file_type,
            "jpeg_quality": self.jpeg_quality,
        }
        out["upscaler" if isinstance(self.work, Upscale) else "model"] = self.model
        if self.refiner is not None:
            out["refiner"] = asdict(self.refiner)
        if self.control_net is not None:
            out["control_net"] = self.control_net
        if self.vae is not None:
            out["vae"] = self.vae
        if self.esrgan is not None:
            out["esrgan"] = self.esrgan
        return out

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
            work: Generation | Upscale
            if "upscaler" in data:
                model, work = data["upscaler"], Upscale.from_json(data["params"])
            else:
                model, work = data["model"], Generation.from_json(data["params"])
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

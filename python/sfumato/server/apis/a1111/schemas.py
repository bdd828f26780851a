"""The request and response bodies of the AUTOMATIC1111 API, and its settings (options)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sfumato import images as imaging
from sfumato.errors import InvalidParameterError
from sfumato.limits import field
from sfumato.params import DiffusionParams
from sfumato.server.jobs.plan import FileType
from sfumato.server.models import names
from sfumato.server.planning import carried, decode_image, prompt_loras

CONTROL_UNIT = "alwayson_scripts.controlnet.args[0]"
Model = TypeVar("Model", bound=BaseModel)


def validated(model: type[Model], data: object, prefix: str = "") -> Model:
    """``data`` as ``model``; its first problem as an error naming the field (``prefix`` + its place)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise InvalidParameterError(f"{prefix}{where}", error["msg"]) from None


class ControlUnit(BaseModel):
    """One unit of A1111's ControlNet extension (``alwayson_scripts.controlnet.args``):
    the fields sfumato honours; others (``resize_mode``, ``pixel_perfect``, ...) are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, description="a name from GET /controlnet/model_list")
    image: str | dict[str, Any] | None = Field(None, description="base64 image, or {'image': base64}")
    input_image: str | None = Field(None, description="the extension's older name for image")
    weight: float = field("a1111", "weight")
    module: str = Field("none", description="the preprocessor: only 'none' (send a preprocessed image)")

    @field_validator("module")
    @classmethod
    def _no_preprocessor(cls, value: str) -> str:
        if value.lower() not in ("none", ""):
            raise ValueError(f"the preprocessor {value!r} does not run in sfumato; send a preprocessed image (none)")
        return value

    def image_bytes(self) -> bytes:
        image = self.image.get("image") if isinstance(self.image, dict) else self.image
        data = image or self.input_image
        field = "image" if image else "input_image"
        if not isinstance(data, str) or not data:
            raise InvalidParameterError(f"{CONTROL_UNIT}.image", "is required: the control image, base64")
        return decode_image(data, f"{CONTROL_UNIT}.{field}")


class Txt2ImgBody(BaseModel):
    """The fields of A1111's txt2img that sfumato honours, with A1111's defaults;
    other A1111 fields are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = field("a1111", "seed")
    sampler_name: str | None = None
    sampler_index: str = "Euler"
    scheduler: str | None = None
    batch_size: int = field("a1111", "batch_size")
    n_iter: int = field("a1111", "n_iter")
    steps: int = field("a1111", "steps")
    cfg_scale: float = field("a1111", "cfg_scale")
    width: int = field("a1111", "width")
    height: int = field("a1111", "height")
    override_settings: dict[str, Any] = Field(default_factory=dict)
    send_images: bool = True
    enable_hr: bool = False
    hr_scale: float = field("a1111", "hr_scale")
    hr_upscaler: str = "Latent"
    hr_second_pass_steps: int = field("a1111", "hr_second_pass_steps")
    denoising_strength: float = field("a1111", "denoising_strength")
    refiner_checkpoint: str | None = None
    refiner_switch_at: float = field("a1111", "refiner_switch_at")
    alwayson_scripts: dict[str, Any] = Field(
        default_factory=dict, description="'controlnet': {'args': [one unit: image, model, weight, module 'none']}"
    )

    # The SDK's names of fields -> A1111's, for errors raised under the SDK's.
    SENT_AS: ClassVar[dict[str, str]] = {
        "model": "override_settings.sd_model_checkpoint",
        "batch_count": "batch_size",
        "hires.scale": "hr_scale",
        "hires.upscaler": "hr_upscaler",
        "hires.steps": "hr_second_pass_steps",
        "hires.denoising_strength": "denoising_strength",
        "control_net": f"{CONTROL_UNIT}.model",
        "control_image": f"{CONTROL_UNIT}.image",
        "control_strength": f"{CONTROL_UNIT}.weight",
        "vae": "override_settings.sd_vae",
        "sampling_method": "sampler_name",
    }

    def sent_fields(self) -> set[str]:
        """The fields the client sent; the legacy ``sampler_index`` counts as ``sampler_name``."""
        return self.model_fields_set | ({"sampler_name"} if "sampler_index" in self.model_fields_set else set())

    def control_unit(self) -> ControlUnit | None:
        """The enabled unit of ``alwayson_scripts.controlnet``, if any.

        Raises
        ------
        InvalidParameterError
            For a unit sfumato cannot run, naming its field.
        """
        script = self.alwayson_scripts.get("controlnet")
        if script is None:
            return None
        field = "alwayson_scripts.controlnet.args"
        args = script.get("args") if isinstance(script, dict) else None
        if not isinstance(args, list) or not all(isinstance(unit, dict) for unit in args):
            raise InvalidParameterError(field, "must be a list of ControlNet units (objects)")
        enabled = [(i, unit) for i, unit in enumerate(args) if unit.get("enabled", True)]
        if len(enabled) > 1:
            raise InvalidParameterError(f"{field}[{enabled[1][0]}]", "sfumato runs one ControlNet unit per request")
        if not enabled:
            return None
        i, unit = enabled[0]
        return validated(ControlUnit, unit, f"{field}[{i}].")

    def to_params(self) -> DiffusionParams:
        """The SDK's params of this request: ``<lora:name:scale>`` tags become LoRAs,
        ``batch_size`` times ``n_iter`` images are made, and ``enable_hr`` adds the hires pass."""
        sampling_method, scheduler = names.sampler(self.sampler_name or self.sampler_index, "sampler_name")
        if self.scheduler is not None:
            scheduler = names.scheduler(self.scheduler, "scheduler")
        hires = None
        if self.enable_hr:
            hires = {
                "scale": self.hr_scale,
                "upscaler": self.hr_upscaler,
                "steps": self.hr_second_pass_steps,
                "denoising_strength": self.denoising_strength,
            }
        prompt, loras = prompt_loras(self.prompt)
        params = DiffusionParams(
            **carried(self, ("negative_prompt", "width", "height", "steps", "cfg_scale", "seed")),
            prompt=prompt,
            sampling_method=sampling_method,
            scheduler=scheduler,
            batch_count=self.batch_size * self.n_iter,
            hires=hires,
            loras=loras,
        )
        unit = self.control_unit()
        if unit is None:
            return params
        return replace(params, control_image=unit.image_bytes(), control_strength=unit.weight)


class Img2ImgBody(Txt2ImgBody):
    init_images: list[str] = Field(min_length=1, max_length=1)
    mask: str | None = None
    inpainting_mask_invert: int = field("a1111", "inpainting_mask_invert")
    image_cfg_scale: float | None = field(
        "a1111", "image_cfg_scale", description="an instruct-pix2pix model's image guidance (None: cfg_scale)"
    )

    SENT_AS: ClassVar[dict[str, str]] = {**Txt2ImgBody.SENT_AS, "img_cfg_scale": "image_cfg_scale"}

    def to_params(self) -> DiffusionParams:
        """:meth:`Txt2ImgBody.to_params` from ``init_images[0]``, with ``denoising_strength``
        and ``image_cfg_scale``; no hires pass."""
        mask = None
        if self.mask:
            grey = imaging.to_array(decode_image(self.mask, "mask"), "mask", mode="L")
            mask = imaging.encode_png(255 - grey if self.inpainting_mask_invert else grey)
        return replace(
            super().to_params(),
            hires=None,
            init_image=decode_image(self.init_images[0], "init_images"),
            mask=mask,
            strength=self.denoising_strength,
            img_cfg_scale=self.image_cfg_scale,
        )


# The settings A1111 clients read, with A1111's defaults. sfumato honours sd_model_checkpoint,
# HonouredOptions' and PreviewOptions' keys; every other key a client writes is stored and
# read back, and has no effect.
OPTION_DEFAULTS: dict[str, Any] = {
    "sd_model_checkpoint": None, "sd_checkpoint_hash": None, "sd_vae": "Automatic", "CLIP_stop_at_last_layers": 1,
    "samples_format": "png", "jpeg_quality": 80, "enable_pnginfo": True, "send_seed": True, "send_size": True,
    "eta_noise_seed_delta": 0, "eta_ddim": 0.0, "eta_ancestral": 1.0, "s_churn": 0.0, "s_tmin": 0.0,
    "s_noise": 1.0, "img2img_fix_steps": False, "sd_vae_overrides_per_model_preferences": True,
    "live_previews_enable": True, "show_progress_every_n_steps": 10, "show_progress_type": "Approx NN",
    "live_preview_content": "Prompt", "return_grid": True, "do_not_show_images": False, "samples_save": True,
    "outdir_samples": "", "sd_checkpoints_limit": 1, "upscaler_for_img2img": None,
}  # fmt: skip
SAMPLES_FORMATS: dict[str, FileType] = {"png": "png", "jpg": "jpg", "jpeg": "jpg", "webp": "webp"}
OWN_VAE = ("Automatic", "None", "")  # sd_vae values that keep the model's own VAE


class HonouredOptions(BaseModel):
    """The options sfumato acts on, checked as a client writes them."""

    model_config = ConfigDict(extra="ignore")

    CLIP_stop_at_last_layers: int = field("a1111", "CLIP_stop_at_last_layers")
    samples_format: str = "png"
    jpeg_quality: int = field("a1111", "jpeg_quality")
    sd_vae: str = "Automatic"

    @field_validator("samples_format")
    @classmethod
    def _format(cls, value: str) -> str:
        if value.lower() not in SAMPLES_FORMATS:
            raise ValueError(f"is {value!r}; sfumato writes {', '.join(SAMPLES_FORMATS)}")
        return value

    def file_type(self) -> FileType:
        return SAMPLES_FORMATS[self.samples_format.lower()]

    def vae(self) -> str | None:
        """A VAE of the VAEs folder to decode with, or ``None``: the model's own."""
        return None if self.sd_vae in OWN_VAE else self.sd_vae

    def clip_skip(self) -> int:
        """The SDK's clip skip: A1111's 1 (every layer) is the family's own setting."""
        return DiffusionParams.clip_skip if self.CLIP_stop_at_last_layers <= 1 else self.CLIP_stop_at_last_layers


class PreviewOptions(BaseModel):
    """A1111's live-preview settings, with A1111's defaults: previews on, every 10
    steps. Every ``show_progress_type`` is served by the latent projection: the
    engine's VAE previews decode on every step whatever the interval, which on a
    CPU would add a whole decode to each step."""

    model_config = ConfigDict(extra="ignore")

    live_previews_enable: bool = True
    show_progress_every_n_steps: int = field("a1111", "show_progress_every_n_steps")
    show_progress_type: str = "Approx NN"

    def params(self) -> dict[str, Any]:
        """The SDK's preview fields these settings ask for (0 or -1 steps: none while sampling)."""
        if not self.live_previews_enable or self.show_progress_every_n_steps <= 0:
            return {}
        return {"preview": "proj", "preview_interval": self.show_progress_every_n_steps}


class ImagesResponse(BaseModel):
    images: list[str]
    parameters: dict[str, Any]
    info: str


class ProgressState(BaseModel):
    skipped: bool = False
    interrupted: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: ProgressState
    current_image: str | None = None
    textinfo: str | None = None
    current_task: str | None = None


class ExtraSingleImageBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    image: str = Field(min_length=1)
    upscaling_resize: float = field("a1111", "upscaling_resize")
    upscaler_1: str = "None"


class ExtraSingleImageResponse(BaseModel):
    html_info: str = ""
    image: str


class BatchImage(BaseModel):
    data: str = Field(min_length=1, description="base64 image")
    name: str = ""


class ExtraBatchImagesBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    imageList: list[BatchImage] = Field(min_length=1, max_length=16)  # noqa: N815 - A1111's name
    upscaling_resize: float = field("a1111", "upscaling_resize")
    upscaler_1: str = "None"


class ExtraBatchImagesResponse(BaseModel):
    html_info: str = ""
    images: list[str]


class PngInfoBody(BaseModel):
    image: str = Field(min_length=1, description="base64 PNG")

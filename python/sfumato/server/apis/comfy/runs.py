"""What each node type does when the walk evaluates it (registered by :func:`runs`)."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from PIL import Image, ImageFilter

from sfumato.errors import InvalidParameterError
from sfumato.params import ANY_FAMILY_SIDE_MULTIPLE, DiffusionParams
from sfumato.server.apis.comfy.nodes import input_image
from sfumato.server.apis.comfy.values import (
    Clip,
    Conditioning,
    Decoded,
    Guider,
    Latent,
    LoraUse,
    Mask,
    Model,
    Noise,
    Picture,
    SamplerChoice,
    Sampling,
    Sigmas,
    Upscaled,
    UpscaleModel,
    Vae,
)
from sfumato.server.apis.comfy.walk import Run, Walk
from sfumato.server.planning import check_image

# --- node runs -------------------------------------------------------------------------------------


RUNS: dict[str, Run] = {}
"""Each node type's run, by ComfyUI class type."""


def runs(*class_types: str) -> Callable[[Run], Run]:
    """Register the decorated function as the run of ``class_types``."""

    def register(run: Run) -> Run:
        for class_type in class_types:
            RUNS[class_type] = run
        return run

    return register


@runs("CheckpointLoaderSimple")
def _checkpoint(w: Walk, node: str, v: dict[str, Any]) -> tuple[Any, ...]:
    name = w.entry_name(node, "ckpt_name", "checkpoints", v["ckpt_name"])
    return Model(name, node), Clip(name, node), Vae(name, node)


@runs("VAELoader")
def _vae_file(w: Walk, node: str, v: dict[str, Any]) -> tuple[Any, ...]:
    name = v["vae_name"]
    found = w.state.catalog.vae(name)
    if found is not None:
        return (Vae(None, node, found.name),)
    if any(e.file_name == name for e in w.state.catalog.companions(("vae",))):
        return (Vae(None, node, companion=name),)
    raise w.refuse(node, "vae_name", f"{name!r} is no longer in its folder or the models config", name)


@runs("UNETLoader")
def _unet(w: Walk, node: str, v: dict[str, Any]) -> tuple[Any, ...]:
    return (Model(w.entry_name(node, "unet_name", "diffusion_models", v["unet_name"]), node, input="unet_name"),)


@runs("CLIPLoader", "DualCLIPLoader", "TripleCLIPLoader")
def _clip_files(w: Walk, node: str, v: dict[str, Any]) -> tuple[Any, ...]:
    files = frozenset(value for name, value in v.items() if name.startswith("clip_name"))
    return (Clip(None, node, encoders=files),)


def _clip_mismatch(w: Walk, clip: Clip, model: Model) -> str | None:
    """Why ``clip`` cannot prompt ``model`` (``None`` when it can): a checkpoint's own
    CLIP prompts only that checkpoint, and separate text encoders only the configured
    model that names exactly those files."""
    if clip.checkpoint is not None:
        return None if clip.checkpoint == model.checkpoint else "the prompt is encoded by another checkpoint's CLIP"
    entry = w.state.catalog.model(model.checkpoint)
    wanted = entry.config.encoder_files() if entry is not None and entry.config is not None else frozenset()
    if clip.encoders == wanted:
        return None
    takes = ", ".join(sorted(wanted)) or "the text encoders in its own file (CheckpointLoaderSimple)"
    return f"sfumato runs {model.checkpoint!r} with the text encoders of its models config: {takes}"


@runs("LoraLoader")
def _lora(w: Walk, node: str, v: dict[str, Any]) -> tuple[Any, ...]:
    if v["strength_clip"] != v["strength_model"]:
        raise w.refuse(
            node,
            "strength_clip",
            "the engine applies a LoRA at one strength to the model and its text "
            f"encoders: make it strength_model's ({v['strength_model']})",
            v["strength_clip"],
        )
    model, clip = v["model"], v["clip"]
    if (why := _clip_mismatch(w, clip, model)) is not None:
        raise w.refuse(node, "clip", why)
    use = LoraUse(w.entry_name(node, "lora_name", "loras", v["lora_name"]), v["strength_model"], node)
    return replace(model, loras=(*model.loras, use)), replace(clip, loras=(*clip.loras, use))


@runs("ModelSamplingSD3", "ModelSamplingAuraFlow")
def _flow_shift(w: Walk, node: str, v: dict[str, Any]) -> tuple[Any, ...]:
    return (replace(v["model"], flow_shift=v["shift"], flow_shift_node=node),)


@runs("CLIPSetLastLayer")
def _clip_skip(w: Walk, node: str, v: dict[str, Any]) -> tuple[Any, ...]:
    # -1 keeps every layer: the family's own setting; -2 skips the last one (clip_skip 2).
    stop = v["stop_at_clip_layer"]
    return (replace(v["clip"], clip_skip=DiffusionParams.clip_skip if stop == -1 else -stop, clip_skip_node=node),)


@runs("CLIPTextEncode")
def _text(w: Walk, node: str, v: dict[str, Any]) -> tuple[Any, ...]:
    return (Conditioning(v["text"], v["clip"], node),)


@runs("FluxGuidance")
def _guidance(w: Walk, node: str, v: dict[str, Any]) -> tuple[Any, ...]:
    return (replace(v["conditioning"], guidance=v["guidance"], guidance_node=node),)


@runs("ReferenceLatent")
def _reference(w: Walk, node: str, v: dict[str, Any]) -> tuple[Any, ...]:
    latent: Latent = v["latent"]
    if latent.init is None or latent.sampled is not None or latent.mask is not None:
        raise w.refuse(node, "latent", "a reference is an encoded image (VAEEncode of a LoadImage)")
    conditioning: Conditioning = v["conditioning"]
    return (replace(conditioning, references=(*conditioning.references, latent.init), reference_node=node),)


@runs("TextEncodeQwenImageEdit", "TextEncodeQwenImageEditPlus")
def _qwen_edit_text(w: Walk, node: str, v: dict[str, Any]) -> tuple[Any, ...]:
    given = [name for name in ("image", "image1", "image2", "image3") if v.get(name) is not None]
    pictures = tuple(_loaded(w, node, name, v[name]) for name in given)
    conditioning = Conditioning(v["prompt"], v["clip"], node, text_input="prompt", references=pictures)
    return (replace(conditioning, reference_node=node, reference_input=given[0]) if given else conditioning,)


@runs("EmptyLatentImage", "EmptySD3LatentImage")
def _empty(w: Walk, node: str, v: dict[str, Any]) -> tuple[Any, ...]:
    if v["batch_size"] > w.state.settings.max_images:
        raise w.refuse(
            node,
            "batch_size",
            f"is {v['batch_size']}; this server makes up to {w.state.settings.max_images} images per prompt",
            v["batch_size"],
        )
    for side in ("width", "height"):
        if v[side] % ANY_FAMILY_SIDE_MULTIPLE:
            raise w.refuse(node, side, f"must be a multiple of {ANY_FAMILY_SIDE_MULTIPLE}, got {v[side]}", v[side])
    return (Latent(v["width"], v["height"], v["batch_size"], (node, "width")),)


@runs("LoadImage")
def _load(w: Walk, node: str, v: dict[str, Any]) -> tuple[Any, ...]:
    try:
        found = input_image(w.state, v["image"])
        if found is None:
            raise InvalidParameterError("image", f"no uploaded image is named {v['image']!r}")
        data = check_image(found, "image")
        with Image.open(io.BytesIO(data)) as image:
            size = image.size
            alpha = image.getchannel("A") if "A" in image.getbands() else None
            mask = Image.eval(alpha, lambda a: 255 - a) if alpha is not None else Image.new("L", size, 0)
    except (OSError, InvalidParameterError) as exc:
        raise w.refuse(node, "image", f"cannot be read: {exc}", v["image"]) from None
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return Picture(data, size[0], size[1], node), Mask(buffer.getvalue(), node)


def _loaded(w: Walk, node: str, name: str, pixels: object) -> Picture:
    if not isinstance(pixels, Picture):
        raise w.refuse(
            node,
            name,
            "sfumato encodes a loaded image (LoadImage); a decoded one would be a second "
            "sampling, which one prompt does not run",
        )
    return pixels


def _encoded(w: Walk, node: str, picture: Picture, vae: Vae, mask: Mask | None) -> Latent:
    width, height = (side - side % ANY_FAMILY_SIDE_MULTIPLE for side in (picture.width, picture.height))
    if not width or not height:
        raise w.refuse(
            node,
            "pixels",
            f"the image is {picture.width}x{picture.height}; sfumato needs at least "
            f"{ANY_FAMILY_SIDE_MULTIPLE} pixels a side",
        )
    return Latent(width, height, 1, (picture.node, "image"), init=picture, mask=mask, vae=vae)


@runs("InstructPixToPixConditioning")
def _pix2pix(w: Walk, node: str, v: dict[str, Any]) -> tuple[Any, ...]:
    picture = _loaded(w, node, "pixels", v["pixels"])
    size = _encoded(w, node, picture, v["vae"], None)  # the edited image's latent size
    positive, negative = (replace(v[side], edit=picture, edit_node=node) for side in ("positive", "negative"))
    return positive, negative, replace(size, init=None)


@runs("VAEEncode")
def _encode(w: Walk, node: str, v: dict[str, Any]) -> tuple[Any, ...]:
    return (_encoded(w, node, _loaded(w, node, "pixels", v["pixels"]), v["vae"], None),)


@runs("VAEEncodeForInpaint")
def _encode_inpaint(w: Walk, node: str, v: dict[str, Any]) -> tuple[Any, ...]:
    mask: Mask = v["mask"]
    grow = v["grow_mask_by"]
    if grow:
        with Image.open(io.BytesIO(mask.png)) as image:
            grown = image.filter(ImageFilter.MaxFilter(2 * grow + 1))
        buffer = io.BytesIO()
        grown.save(buffer, format="PNG")
        mask = Mask(buffer.getvalue(), mask.node)
    return (_encoded(w, node, _loaded(w, node, "pixels", v["pixels"]), v["vae"], mask),)


@runs("SetLatentNoiseMask")
def _noise_mask(w: Walk, node: str, v: dict[str, Any]) -> tuple[Any, ...]:
    latent: Latent = v["samples"]
    if latent.init is None or latent.sampled is not None:
        raise w.refuse(node, "samples", "sfumato inpaints an encoded image (VAEEncode of a LoadImage)")
    return (replace(latent, mask=v["mask"]),)


def _sampled(w: Walk, node: str, latent: Latent, sampling: Sampling) -> Latent:
    if latent.sampled is not None:
        raise w.refuse(node, "latent_image", "sfumato samples once per prompt; this latent is sampled already")
    if latent.init is None and sampling.denoise != 1.0:
        raise w.refuse(
            node,
            "denoise",
            "an empty latent is sampled from pure noise: denoise must be 1 (for image to image, VAEEncode a LoadImage)",
            sampling.denoise,
        )
    for side, conditioning in (("positive", sampling.positive), ("negative", sampling.negative)):
        why = _clip_mismatch(w, conditioning.clip, sampling.model) if conditioning is not None else None
        if why is not None:
            raise w.refuse(node, side, why)
        if conditioning is not None and conditioning.clip.loras != sampling.model.loras:
            raise w.refuse(
                node,
                side,
                "the engine applies each LoRA to the model and its text encoders alike: "
                "load the LoRAs on both (LoraLoader)",
            )
    return replace(latent, sampled=sampling)


def _ksampling(node: str, v: dict[str, Any], seed: str, denoise: float, strength_input: str) -> Sampling:
    """What a KSampler-shaped node asks: its inputs ``v`` under KSampler's names, the seed
    under ``seed``; ``denoise`` came from the input ``strength_input``.

    With an instruct-pix2pix image on both prompts (``InstructPixToPixConditioning``'s
    two outputs) the image guides at 1, as ComfyUI's single cfg between them does; with
    the image on the positive prompt alone, at ``cfg`` like the prompt."""
    origin = {
        "steps": (node, "steps"),
        "cfg_scale": (node, "cfg"),
        "seed": (node, seed),
        "sampling_method": (node, "sampler_name"),
        "scheduler": (node, "scheduler"),
        "strength": (node, strength_input),
    }
    conditioning = (v["model"], v["positive"], v["negative"], v["cfg"])
    img_cfg = 1.0 if v["positive"].edit is not None and v["negative"].edit is not None else None
    return Sampling(
        node, *conditioning, v["steps"], v[seed], v["sampler_name"], v["scheduler"], denoise, origin, img_cfg
    )


@runs("KSampler")
def _ksampler(w: Walk, node: str, v: dict[str, Any]) -> tuple[Any, ...]:
    sampling = _ksampling(node, v, "seed", v["denoise"], "denoise")
    return (_sampled(w, node, v["latent_image"], sampling),)


@runs("KSamplerAdvanced")
def _ksampler_advanced(w: Walk, node: str, v: dict[str, Any]) -> tuple[Any, ...]:
    steps, start = v["steps"], v["start_at_step"]
    if v["end_at_step"] < steps:
        raise w.refuse(
            node, "end_at_step", f"sfumato samples to the last step: make it at least steps ({steps})", v["end_at_step"]
        )
    if start >= steps:
        raise w.refuse(node, "start_at_step", f"must be below steps ({steps})", start)
    latent: Latent = v["latent_image"]
    if start and latent.init is None:
        raise w.refuse(node, "start_at_step", "an empty latent is sampled from its first step", start)
    sampling = _ksampling(node, v, "noise_seed", 1.0 - start / steps, "start_at_step")
    return (_sampled(w, node, latent, sampling),)


@runs("KSamplerSelect")
def _sampler_select(w: Walk, node: str, v: dict[str, Any]) -> tuple[Any, ...]:
    return (SamplerChoice(v["sampler_name"], node),)


@runs("BasicScheduler")
def _basic_scheduler(w: Walk, node: str, v: dict[str, Any]) -> tuple[Any, ...]:
    return (Sigmas(v["scheduler"], v["steps"], v["denoise"], node),)


@runs("RandomNoise")
def _noise(w: Walk, node: str, v: dict[str, Any]) -> tuple[Any, ...]:
    return (Noise(v["noise_seed"], node),)


@runs("BasicGuider")
def _basic_guider(w: Walk, node: str, v: dict[str, Any]) -> tuple[Any, ...]:
    return (Guider(v["model"], v["conditioning"], None, 1.0, node),)


@runs("CFGGuider")
def _cfg_guider(w: Walk, node: str, v: dict[str, Any]) -> tuple[Any, ...]:
    return (Guider(v["model"], v["positive"], v["negative"], v["cfg"], node),)


@runs("DualCFGGuider")
def _dual_cfg_guider(w: Walk, node: str, v: dict[str, Any]) -> tuple[Any, ...]:
    # ComfyUI's regular style: negative + cfg_cond2_negative (cond2 - negative) + cfg_conds (cond1 - cond2),
    # which is the engine's instruct-pix2pix guidance when cond2 is the negative prompt with the image.
    cond1, cond2, negative = v["cond1"], v["cond2"], v["negative"]
    if cond1.edit is None or cond2.edit is not cond1.edit:
        raise w.refuse(
            node,
            "cond1" if cond1.edit is None else "cond2",
            "sfumato runs DualCFGGuider for instruct-pix2pix: cond1 and cond2 are the positive and negative "
            "outputs of one InstructPixToPixConditioning",
        )
    if negative.edit is not None:
        raise w.refuse(node, "negative", "is the prompt without the image: InstructPixToPixConditioning's input")
    if negative.text != cond2.text:
        raise w.refuse(
            node,
            "cond2",
            "the engine guides by the image with the negative prompt: give cond2 the same text as negative",
        )
    return (Guider(v["model"], cond1, negative, v["cfg_conds"], node, v["cfg_cond2_negative"]),)


@runs("SamplerCustomAdvanced")
def _custom(w: Walk, node: str, v: dict[str, Any]) -> tuple[Any, ...]:
    guider: Guider = v["guider"]
    sigmas: Sigmas = v["sigmas"]
    sampler: SamplerChoice = v["sampler"]
    noise: Noise = v["noise"]
    origin = {
        "steps": (sigmas.node, "steps"),
        "scheduler": (sigmas.node, "scheduler"),
        "strength": (sigmas.node, "denoise"),
        "cfg_scale": (guider.node, "cfg"),
        "sampling_method": (sampler.node, "sampler_name"),
        "seed": (noise.node, "noise_seed"),
    }
    sampling = Sampling(
        node,
        guider.model,
        guider.positive,
        guider.negative,
        guider.cfg,
        sigmas.steps,
        noise.seed,
        sampler.name,
        sigmas.scheduler,
        sigmas.denoise,
        origin | ({"img_cfg_scale": (guider.node, "cfg_cond2_negative")} if guider.img_cfg is not None else {}),
        guider.img_cfg,
    )
    latent = _sampled(w, node, v["latent_image"], sampling)
    return latent, latent


@runs("VAEDecode")
def _decode(w: Walk, node: str, v: dict[str, Any]) -> tuple[Any, ...]:
    latent: Latent = v["samples"]
    if latent.sampled is None:
        raise w.refuse(node, "samples", "nothing samples this latent (a KSampler between)")
    vae: Vae = v["vae"]
    model = latent.sampled.model.checkpoint
    if vae.companion is not None:
        entry = w.state.catalog.model(model)
        own = entry.config.companions.get("vae") if entry is not None and entry.config is not None else None
        if own is None or own.name != vae.companion:
            takes = f"its VAE is {own.name}" if own is not None else "it has no VAE there"
            raise w.refuse(
                node,
                "vae",
                f"{vae.companion} is a VAE of the models config that {model!r} does not "
                f"name ({takes}); a VAE of the VAEs folder decodes any model",
            )
    elif vae.file is None and vae.checkpoint != model:
        raise w.refuse(node, "vae", "a checkpoint's VAE decodes only that checkpoint's latents (or use a VAELoader)")
    if latent.vae is not None and latent.vae.file != vae.file:
        raise w.refuse(node, "vae", "the engine encodes and decodes with one VAE: give VAEEncode the same one")
    return (Decoded(latent, vae, node),)


@runs("UpscaleModelLoader")
def _upscale_model(w: Walk, node: str, v: dict[str, Any]) -> tuple[Any, ...]:
    return (UpscaleModel(w.entry_name(node, "model_name", "upscale_models", v["model_name"]), node),)


@runs("ImageUpscaleWithModel")
def _upscale(w: Walk, node: str, v: dict[str, Any]) -> tuple[Any, ...]:
    image, model = v["image"], v["upscale_model"]
    if isinstance(image, Upscaled):  # again: one more pass, with the same model
        if image.upscaler.name != model.name:
            raise w.refuse(
                node,
                "upscale_model",
                f"the engine runs one upscaler per image; the image was upscaled "
                f"with {image.upscaler.name!r} (node {image.upscaler.node})",
            )
        return (replace(image, node=node, repeats=image.repeats + 1),)
    if not isinstance(image, (Picture, Decoded)):
        raise w.refuse(node, "image", "sfumato upscales a loaded image (LoadImage) or the prompt's generation")
    return (Upscaled(image, model, node),)


@runs("SaveImage", "PreviewImage")
def _output(w: Walk, node: str, v: dict[str, Any]) -> tuple[Any, ...]:
    return (v["images"],)

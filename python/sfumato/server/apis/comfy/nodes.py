"""The ComfyUI node types sfumato runs: each one's inputs (ComfyUI's types, defaults and
bounds) and outputs, and ``object_info``, which lists them with the server's choices."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sfumato.limits import MAX_SEED
from sfumato.params import ANY_FAMILY_SIDE_MULTIPLE, MAX_SIDE
from sfumato.server.models import names
from sfumato.server.models.catalog import Catalog, Entry
from sfumato.server.state import ServerState

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


# --- node specs (what object_info lists) -------------------------------------------------


@dataclass(frozen=True)
class Input:
    """One input of a node: a link type (``"MODEL"``, ``"LATENT"``...), a
    primitive (``"INT"``, ``"FLOAT"``, ``"STRING"``) with its bounds, or a
    ``"COMBO"`` whose values come from ``choices`` (a :data:`CHOICES` key)."""

    type: str
    default: Any = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    choices: str | None = None
    multiline: bool = False
    optional: bool = False
    upload: bool = False

    def info(self, values: list[str] | None) -> list[Any]:
        """The ``[type, options]`` pair of ``object_info``."""
        options: dict[str, Any] = {}
        for key in ("default", "min", "max", "step"):
            if getattr(self, key) is not None:
                options[key] = getattr(self, key)
        if self.multiline:
            options["multiline"] = True
        if self.upload:
            options["image_upload"] = True
        return [values if self.type == "COMBO" else self.type, options]


@dataclass(frozen=True)
class Node:
    inputs: dict[str, Input]
    outputs: tuple[str, ...]
    output_names: tuple[str, ...]
    category: str
    display_name: str
    description: str
    output_node: bool = False


_SEED = Input("INT", 0, 0, MAX_SEED)
_STEPS = Input("INT", 20, 1, 10000)
_CFG = Input("FLOAT", 8.0, 0.0, 100.0, 0.1)
_DENOISE = Input("FLOAT", 1.0, 0.0, 1.0, 0.01)


def _side(default: int) -> Input:
    return Input("INT", default, ANY_FAMILY_SIDE_MULTIPLE, MAX_SIDE, ANY_FAMILY_SIDE_MULTIPLE)


_SAMPLER, _SCHEDULER = Input("COMBO", choices="samplers"), Input("COMBO", choices="schedulers")
_LINK = Input  # a link input names only its type

NODES: dict[str, Node] = {
    "CheckpointLoaderSimple": Node(
        {"ckpt_name": Input("COMBO", choices="checkpoints")}, ("MODEL", "CLIP", "VAE"), ("MODEL", "CLIP", "VAE"),
        "loaders", "Load Checkpoint", "A model of the models folder, with its text encoders and VAE.",
    ),
    "UNETLoader": Node(
        {"unet_name": Input("COMBO", choices="diffusion_models"), "weight_dtype": Input("COMBO", choices="dtypes")},
        ("MODEL",), ("MODEL",), "advanced/loaders", "Load Diffusion Model",
        "A model of the models config made of several files (a UNet or transformer alone, and its companions).",
    ),
    "CLIPLoader": Node(
        {"clip_name": Input("COMBO", choices="text_encoders"), "type": Input("COMBO", choices="clip_types")},
        ("CLIP",), ("CLIP",), "advanced/loaders", "Load CLIP",
        "The text encoder the models config names for the model it prompts.",
    ),
    "DualCLIPLoader": Node(
        {"clip_name1": Input("COMBO", choices="text_encoders"), "clip_name2": Input("COMBO", choices="text_encoders"),
         "type": Input("COMBO", choices="dual_clip_types")},
        ("CLIP",), ("CLIP",), "advanced/loaders", "DualCLIPLoader",
        "The two text encoders the models config names for the model they prompt.",
    ),
    "TripleCLIPLoader": Node(
        {"clip_name1": Input("COMBO", choices="text_encoders"), "clip_name2": Input("COMBO", choices="text_encoders"),
         "clip_name3": Input("COMBO", choices="text_encoders")},
        ("CLIP",), ("CLIP",), "advanced/loaders", "TripleCLIPLoader",
        "SD3's three text encoders, as the models config names them.",
    ),
    "VAELoader": Node(
        {"vae_name": Input("COMBO", choices="vae")}, ("VAE",), ("VAE",), "loaders", "Load VAE",
        "A VAE of the VAEs folder, decoding (and encoding) in the checkpoint's own VAE's place; or the VAE the "
        "models config names for a model.",
    ),
    "LoraLoader": Node(
        {"model": _LINK("MODEL"), "clip": _LINK("CLIP"), "lora_name": Input("COMBO", choices="loras"),
         "strength_model": Input("FLOAT", 1.0, -100.0, 100.0, 0.01),
         "strength_clip": Input("FLOAT", 1.0, -100.0, 100.0, 0.01)},
        ("MODEL", "CLIP"), ("MODEL", "CLIP"), "loaders", "Load LoRA",
        "A LoRA of the LoRA folder, applied to the model and its text encoders at one strength.",
    ),
    "ModelSamplingSD3": Node(
        {"model": _LINK("MODEL"), "shift": Input("FLOAT", 3.0, 0.0, 100.0, 0.01)}, ("MODEL",), ("MODEL",),
        "advanced/model", "ModelSamplingSD3", "A flow-matching model's sigma shift (flow_shift).",
    ),
    "ModelSamplingAuraFlow": Node(
        {"model": _LINK("MODEL"), "shift": Input("FLOAT", 1.73, 0.0, 100.0, 0.01)}, ("MODEL",), ("MODEL",),
        "advanced/model", "ModelSamplingAuraFlow", "A flow-matching model's sigma shift (flow_shift).",
    ),
    "CLIPSetLastLayer": Node(
        {"clip": _LINK("CLIP"), "stop_at_clip_layer": Input("INT", -1, -24, -1, 1)},
        ("CLIP",), ("CLIP",), "conditioning", "CLIP Set Last Layer", "Clip skip: -2 skips CLIP's last layer.",
    ),
    "CLIPTextEncode": Node(
        {"text": Input("STRING", multiline=True), "clip": _LINK("CLIP")},
        ("CONDITIONING",), ("CONDITIONING",), "conditioning", "CLIP Text Encode (Prompt)", "A prompt.",
    ),
    "FluxGuidance": Node(
        {"conditioning": _LINK("CONDITIONING"), "guidance": Input("FLOAT", 3.5, 0.0, 100.0, 0.1)},
        ("CONDITIONING",), ("CONDITIONING",), "advanced/conditioning/flux", "FluxGuidance",
        "The distilled guidance of FLUX models.",
    ),
    "EmptyLatentImage": Node(
        {"width": _side(512), "height": _side(512),
         "batch_size": Input("INT", 1, 1, 4096)},
        ("LATENT",), ("LATENT",), "latent", "Empty Latent Image", "Text to image at this size.",
    ),
    "EmptySD3LatentImage": Node(
        {"width": _side(1024), "height": _side(1024),
         "batch_size": Input("INT", 1, 1, 4096)},
        ("LATENT",), ("LATENT",), "latent/sd3", "EmptySD3LatentImage", "Text to image at this size.",
    ),
    "LoadImage": Node(
        {"image": Input("COMBO", choices="input_images", upload=True)}, ("IMAGE", "MASK"), ("IMAGE", "MASK"),
        "image", "Load Image", "An uploaded image; its mask is where it is transparent.",
    ),
    "ReferenceLatent": Node(
        {"conditioning": _LINK("CONDITIONING"), "latent": _LINK("LATENT")},
        ("CONDITIONING",), ("CONDITIONING",), "advanced/conditioning/edit_models", "ReferenceLatent",
        "An encoded image (VAEEncode of a LoadImage) as a reference the model edits: FLUX.1 Kontext, "
        "Qwen-Image-Edit, and FLUX.2 loaded with prediction flux2_flow.",
    ),
    "TextEncodeQwenImageEdit": Node(
        {"clip": _LINK("CLIP"), "prompt": Input("STRING", multiline=True),
         "vae": Input("VAE", optional=True), "image": Input("IMAGE", optional=True)},
        ("CONDITIONING",), ("CONDITIONING",), "advanced/conditioning", "TextEncodeQwenImageEdit",
        "A prompt with the loaded image Qwen-Image-Edit edits (a reference).",
    ),
    "TextEncodeQwenImageEditPlus": Node(
        {"clip": _LINK("CLIP"), "prompt": Input("STRING", multiline=True), "vae": Input("VAE", optional=True),
         **{f"image{i}": Input("IMAGE", optional=True) for i in (1, 2, 3)}},
        ("CONDITIONING",), ("CONDITIONING",), "advanced/conditioning", "TextEncodeQwenImageEditPlus",
        "A prompt with up to three loaded images Qwen-Image-Edit edits (references).",
    ),
    "InstructPixToPixConditioning": Node(
        {"positive": _LINK("CONDITIONING"), "negative": _LINK("CONDITIONING"), "vae": _LINK("VAE"),
         "pixels": _LINK("IMAGE")},
        ("CONDITIONING", "CONDITIONING", "LATENT"), ("positive", "negative", "latent"),
        "conditioning/instructpix2pix", "InstructPixToPixConditioning",
        "The loaded image an instruct-pix2pix model edits, on both prompts; an empty latent of its size.",
    ),
    "VAEEncode": Node(
        {"pixels": _LINK("IMAGE"), "vae": _LINK("VAE")}, ("LATENT",), ("LATENT",), "latent", "VAE Encode",
        "Image to image: the loaded image, its sides cut to a multiple of 64.",
    ),
    "VAEEncodeForInpaint": Node(
        {"pixels": _LINK("IMAGE"), "vae": _LINK("VAE"), "mask": _LINK("MASK"),
         "grow_mask_by": Input("INT", 6, 0, 64, 1)},
        ("LATENT",), ("LATENT",), "latent/inpaint", "VAE Encode (for Inpainting)", "Inpainting inside the mask.",
    ),
    "SetLatentNoiseMask": Node(
        {"samples": _LINK("LATENT"), "mask": _LINK("MASK")}, ("LATENT",), ("LATENT",), "latent/inpaint",
        "Set Latent Noise Mask", "Inpainting inside the mask.",
    ),
    "KSampler": Node(
        {"model": _LINK("MODEL"), "seed": _SEED, "steps": _STEPS, "cfg": _CFG, "sampler_name": _SAMPLER,
         "scheduler": _SCHEDULER, "positive": _LINK("CONDITIONING"), "negative": _LINK("CONDITIONING"),
         "latent_image": _LINK("LATENT"), "denoise": _DENOISE},
        ("LATENT",), ("LATENT",), "sampling", "KSampler", "Samples the latent; denoise is img2img's strength.",
    ),
    "KSamplerAdvanced": Node(
        {"model": _LINK("MODEL"), "add_noise": Input("COMBO", choices="enable"), "noise_seed": _SEED,
         "steps": _STEPS, "cfg": _CFG, "sampler_name": _SAMPLER, "scheduler": _SCHEDULER,
         "positive": _LINK("CONDITIONING"), "negative": _LINK("CONDITIONING"), "latent_image": _LINK("LATENT"),
         "start_at_step": Input("INT", 0, 0, 10000), "end_at_step": Input("INT", 10000, 0, 10000),
         "return_with_leftover_noise": Input("COMBO", choices="enable_disable")},
        ("LATENT",), ("LATENT",), "sampling", "KSampler (Advanced)",
        "Samples to the last step; a later start_at_step is img2img's strength.",
    ),
    "KSamplerSelect": Node(
        {"sampler_name": _SAMPLER}, ("SAMPLER",), ("SAMPLER",), "sampling/custom_sampling/samplers",
        "KSamplerSelect", "A sampler.",
    ),
    "BasicScheduler": Node(
        {"model": _LINK("MODEL"), "scheduler": _SCHEDULER, "steps": _STEPS, "denoise": _DENOISE},
        ("SIGMAS",), ("SIGMAS",), "sampling/custom_sampling/schedulers", "BasicScheduler", "The steps' schedule.",
    ),
    "RandomNoise": Node(
        {"noise_seed": _SEED}, ("NOISE",), ("NOISE",), "sampling/custom_sampling/noise", "RandomNoise", "The seed.",
    ),
    "BasicGuider": Node(
        {"model": _LINK("MODEL"), "conditioning": _LINK("CONDITIONING")}, ("GUIDER",), ("GUIDER",),
        "sampling/custom_sampling/guiders", "BasicGuider", "One prompt, no classifier-free guidance (cfg 1).",
    ),
    "CFGGuider": Node(
        {"model": _LINK("MODEL"), "positive": _LINK("CONDITIONING"), "negative": _LINK("CONDITIONING"),
         "cfg": _CFG},
        ("GUIDER",), ("GUIDER",), "sampling/custom_sampling/guiders", "CFGGuider", "Classifier-free guidance.",
    ),
    "DualCFGGuider": Node(
        {"model": _LINK("MODEL"), "cond1": _LINK("CONDITIONING"), "cond2": _LINK("CONDITIONING"),
         "negative": _LINK("CONDITIONING"), "cfg_conds": _CFG, "cfg_cond2_negative": _CFG,
         "style": Input("COMBO", "regular", choices="dual_cfg_styles", optional=True)},
        ("GUIDER",), ("GUIDER",), "sampling/custom_sampling/guiders", "DualCFGGuider",
        "instruct-pix2pix's two guidances: cond1 and cond2 from InstructPixToPixConditioning, negative the "
        "prompt without the image; cfg_conds guides by the prompt (cfg_scale), cfg_cond2_negative by the "
        "image (img_cfg_scale).",
    ),
    "SamplerCustomAdvanced": Node(
        {"noise": _LINK("NOISE"), "guider": _LINK("GUIDER"), "sampler": _LINK("SAMPLER"),
         "sigmas": _LINK("SIGMAS"), "latent_image": _LINK("LATENT")},
        ("LATENT", "LATENT"), ("output", "denoised_output"), "sampling/custom_sampling",
        "SamplerCustomAdvanced", "Samples the latent with the noise, guider, sampler and schedule given.",
    ),
    "VAEDecode": Node(
        {"samples": _LINK("LATENT"), "vae": _LINK("VAE")}, ("IMAGE",), ("IMAGE",), "latent", "VAE Decode",
        "The sampled latent as an image.",
    ),
    "UpscaleModelLoader": Node(
        {"model_name": Input("COMBO", choices="upscale_models")}, ("UPSCALE_MODEL",), ("UPSCALE_MODEL",),
        "loaders", "Load Upscale Model", "An ESRGAN of the upscalers folder.",
    ),
    "ImageUpscaleWithModel": Node(
        {"upscale_model": _LINK("UPSCALE_MODEL"), "image": _LINK("IMAGE")}, ("IMAGE",), ("IMAGE",),
        "image/upscaling", "Upscale Image (using Model)", "Upscales a loaded image with an ESRGAN.",
    ),
    "SaveImage": Node(
        {"images": _LINK("IMAGE"), "filename_prefix": Input("STRING", "ComfyUI")}, (), (), "image", "Save Image",
        "Keeps the images in the server's outputs.", output_node=True,
    ),
    "PreviewImage": Node(
        {"images": _LINK("IMAGE")}, (), (), "image", "Preview Image", "Shows the images.", output_node=True,
    ),
}  # fmt: skip

PRIMITIVES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


MODEL_FOLDERS = ("checkpoints", "diffusion_models", "text_encoders", "vae", "loras", "upscale_models")
"""ComfyUI's model folders that name the server's (``GET /api/models``)."""

TEXT_ENCODERS = ("clip_l", "clip_g", "t5xxl", "llm")


def folder_entries(catalog: Catalog, folder: str) -> list[Entry]:
    """The catalog entries of a ComfyUI model folder; a COMBO lists them by
    :attr:`Entry.file_name`. ``checkpoints`` holds every model (a configured one
    loads with its companions), ``diffusion_models`` the configured models made of
    several files, ``text_encoders`` and ``vae`` (beside the VAEs folder's) the
    companion files the models config names."""
    if folder == "diffusion_models":
        return [e for e in catalog.models() if e.config is not None and e.config.info.split]
    if folder == "text_encoders":
        return catalog.companions(TEXT_ENCODERS)
    if folder == "vae":
        return [*catalog.vaes(), *catalog.companions(("vae",))]
    listing = {"checkpoints": catalog.models, "loras": catalog.loras, "upscale_models": catalog.upscalers}
    return listing[folder]()


def choices(state: ServerState, key: str) -> list[str]:
    """The values a ``COMBO`` input takes now (folders are read each time)."""
    if key in MODEL_FOLDERS:
        return list(dict.fromkeys(e.file_name for e in folder_entries(state.catalog, key)))
    if key == "input_images":
        return input_images(state)
    if key == "samplers":
        return list(names.COMFY_SAMPLERS)
    if key == "schedulers":
        return list(names.COMFY_SCHEDULERS)
    if key == "enable":
        return ["enable"]
    if key == "enable_disable":
        return ["disable", "enable"]
    if key == "dtypes":
        return ["default"]
    if key == "clip_types":
        return ["stable_diffusion", "sd3", "chroma", "ovis", "lumina2", "qwen_image", "flux2"]
    if key == "dual_cfg_styles":
        return ["regular"]
    if key == "dual_clip_types":
        return ["sdxl", "sd3", "flux"]
    return []


def input_images(state: ServerState) -> list[str]:
    """The uploaded images, as ``LoadImage`` names them (``sub/name.png`` in a subfolder):
    those in the job store (uploaded through any front end), and those an earlier
    sfumato kept in the inputs folder."""
    found = set(state.store.uploads())
    folder = state.settings.inputs_dir
    if folder.is_dir():
        kept = (p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        found.update(p.relative_to(folder).as_posix() for p in kept)
    return sorted(found)


def input_image(state: ServerState, name: str) -> bytes | None:
    """An uploaded image by its ``LoadImage`` name (``None``: there is none): from the job
    store, else from the inputs folder of an earlier sfumato (never outside it)."""
    data = state.store.upload(name)
    if data is not None:
        return data
    folder = state.settings.inputs_dir.resolve()
    path = (folder / name).resolve()
    return path.read_bytes() if folder in path.parents and path.is_file() else None


def object_info(state: ServerState, only: str | None = None) -> dict[str, Any]:
    """ComfyUI's ``object_info``: every node this server runs (or just ``only``)."""
    out: dict[str, Any] = {}
    cache: dict[str, list[str]] = {}
    for class_type, node in NODES.items():
        if only is not None and class_type != only:
            continue
        inputs: dict[str, dict[str, Any]] = {"required": {}, "optional": {}}
        for name, spec in node.inputs.items():
            values = None
            if spec.choices is not None:
                values = cache.setdefault(spec.choices, choices(state, spec.choices))
            inputs["optional" if spec.optional else "required"][name] = spec.info(values)
        out[class_type] = {
            "input": inputs,
            "input_order": {kind: list(listed) for kind, listed in inputs.items() if listed},
            "output": list(node.outputs),
            "output_is_list": [False] * len(node.outputs),
            "output_name": list(node.output_names),
            "name": class_type,
            "display_name": node.display_name,
            "description": node.description,
            "python_module": "nodes",
            "category": node.category,
            "output_node": node.output_node,
            "deprecated": False,
            "experimental": False,
        }
    return out

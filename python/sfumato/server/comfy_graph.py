"""ComfyUI's API-format prompts (``{node_id: {"class_type", "inputs"}}``) compiled
into one :class:`~sfumato.server.jobplan.JobPlan`.

The graph is walked back from its output nodes (``SaveImage``, ``PreviewImage``).
Every node type sfumato runs has a :class:`Node` spec: its inputs, with ComfyUI's
types, defaults and bounds, and its outputs; ``object_info`` lists the specs.
Evaluating a node gives symbolic values (a checkpoint, a prompt, a latent to
sample, a decoded image), and the images the outputs save become one generation
or one upscale, checked by the same :func:`~sfumato.server.plans.job_plan` as
every other API's requests. Whatever cannot run is refused with ComfyUI's
``node_errors``, naming the node and the input; nothing is replaced silently.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image, ImageFilter

from sfumato.errors import InvalidParameterError
from sfumato.params import ANY_FAMILY_SIDE_MULTIPLE, MAX_SEED, MAX_SIDE, DiffusionParams
from sfumato.server import names
from sfumato.server.catalog import Catalog, Entry
from sfumato.server.jobplan import JobPlan, Upscale
from sfumato.server.plans import check_image, job_plan
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
        return input_images(state.settings.inputs_dir)
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
        return ["stable_diffusion", "sd3", "flux2"]
    if key == "dual_clip_types":
        return ["sdxl", "sd3", "flux"]
    return []


def input_images(folder: Path) -> list[str]:
    """The uploaded images, as ``LoadImage`` names them (``sub/name.png`` in a subfolder)."""
    if not folder.is_dir():
        return []
    found = (p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return sorted(p.relative_to(folder).as_posix() for p in found)


def object_info(state: ServerState, only: str | None = None) -> dict[str, Any]:
    """ComfyUI's ``object_info``: every node this server runs (or just ``only``)."""
    out: dict[str, Any] = {}
    cache: dict[str, list[str]] = {}
    for class_type, node in NODES.items():
        if only is not None and class_type != only:
            continue
        required: dict[str, Any] = {}
        for name, spec in node.inputs.items():
            values = None
            if spec.choices is not None:
                values = cache.setdefault(spec.choices, choices(state, spec.choices))
            required[name] = spec.info(values)
        out[class_type] = {
            "input": {"required": required, "optional": {}}, "input_order": {"required": list(node.inputs)},
            "output": list(node.outputs), "output_is_list": [False] * len(node.outputs),
            "output_name": list(node.output_names), "name": class_type, "display_name": node.display_name,
            "description": node.description, "python_module": "nodes", "category": node.category,
            "output_node": node.output_node, "deprecated": False, "experimental": False,
        }  # fmt: skip
    return out


# --- what nodes evaluate to ------------------------------------------------------------------


@dataclass(frozen=True)
class LoraUse:
    name: str  # the catalog name
    scale: float
    node: str


@dataclass(frozen=True)
class Model:
    checkpoint: str  # the catalog name
    node: str
    loras: tuple[LoraUse, ...] = ()
    input: str = "ckpt_name"  # the loader's input naming it


@dataclass(frozen=True)
class Clip:
    checkpoint: str | None  # None: the separate text encoders of a CLIP loader
    node: str
    loras: tuple[LoraUse, ...] = ()
    clip_skip: int = DiffusionParams.clip_skip
    clip_skip_node: str | None = None
    encoders: frozenset[str] = frozenset()  # those encoders' file names


@dataclass(frozen=True)
class Vae:
    checkpoint: str | None  # the checkpoint's own VAE, or (None) a VAELoader's file
    node: str
    file: str | None = None  # a file of the VAEs folder: its catalog name
    companion: str | None = None  # or a VAE the models config names: its file name


@dataclass(frozen=True)
class Conditioning:
    text: str
    clip: Clip
    node: str
    guidance: float | None = None
    guidance_node: str | None = None


@dataclass(frozen=True)
class Picture:
    """A loaded image (its file's bytes)."""

    data: bytes
    width: int
    height: int
    node: str


@dataclass(frozen=True)
class Mask:
    png: bytes  # white: made anew
    node: str


@dataclass(frozen=True)
class Sampling:
    """What a sampler node asks: the fields of one generation, and where each came from."""

    node: str
    model: Model
    positive: Conditioning
    negative: Conditioning | None
    cfg: float
    steps: int
    seed: int
    sampler: str
    scheduler: str
    denoise: float
    origin: Mapping[str, tuple[str, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Latent:
    width: int
    height: int
    batch: int
    node: str  # where its size came from
    size_input: str  # that node's input naming the size ("width" or "image")
    init: Picture | None = None
    mask: Mask | None = None
    vae: Vae | None = None
    sampled: Sampling | None = None


@dataclass(frozen=True)
class Decoded:
    latent: Latent
    vae: Vae
    node: str


@dataclass(frozen=True)
class UpscaleModel:
    name: str  # the catalog name
    node: str


@dataclass(frozen=True)
class Upscaled:
    image: Picture | Decoded  # a loaded image, or the prompt's generation
    upscaler: UpscaleModel
    node: str
    repeats: int = 1


@dataclass(frozen=True)
class SamplerChoice:
    name: str
    node: str


@dataclass(frozen=True)
class Sigmas:
    scheduler: str
    steps: int
    denoise: float
    node: str


@dataclass(frozen=True)
class Noise:
    seed: int
    node: str


@dataclass(frozen=True)
class Guider:
    model: Model
    positive: Conditioning
    negative: Conditioning | None
    cfg: float
    node: str


# --- errors ------------------------------------------------------------------------------------


class GraphError(Exception):
    """A prompt sfumato cannot run: ComfyUI's 400 body (``error`` and ``node_errors``)."""

    def __init__(self, kind: str, message: str, node_errors: dict[str, Any] | None = None, details: str = "") -> None:
        super().__init__(message)
        self.body = {
            "error": {"type": kind, "message": message, "details": details, "extra_info": {}},
            "node_errors": node_errors or {},
        }


class _NodeFailedError(Exception):
    """A node failed; its error is recorded."""


def _error(kind: str, message: str, details: str, input_name: str | None, received: Any = None) -> dict[str, Any]:
    extra = {"input_name": input_name, "received_value": received} if input_name is not None else {}
    return {"type": kind, "message": message, "details": details, "extra_info": extra}


# --- the walk ------------------------------------------------------------------------------------

Run = Callable[["_Walk", str, dict[str, Any]], tuple[Any, ...]]
RUNS: dict[str, Run] = {}


def _runs(*class_types: str) -> Callable[[Run], Run]:
    def register(run: Run) -> Run:
        for class_type in class_types:
            RUNS[class_type] = run
        return run

    return register


class _Walk:
    def __init__(self, state: ServerState, graph: Mapping[str, Any]) -> None:
        self.state, self.graph = state, graph
        self.errors: dict[str, dict[str, Any]] = {}
        self.results: dict[str, tuple[Any, ...] | None] = {}  # None: failed, or being evaluated
        self.choices: dict[str, list[str]] = {}

    def class_of(self, node_id: str) -> str:
        entry = self.graph.get(node_id)
        return str(entry.get("class_type", "")) if isinstance(entry, Mapping) else ""

    def fail(self, node_id: str, error: dict[str, Any]) -> _NodeFailedError:
        entry = self.errors.setdefault(node_id, {"errors": [], "dependent_outputs": [],
                                                 "class_type": self.class_of(node_id)})  # fmt: skip
        entry["errors"].append(error)
        return _NodeFailedError()

    def refuse(self, node_id: str, input_name: str | None, message: str, received: Any = None) -> _NodeFailedError:
        """A value sfumato cannot run (ComfyUI would have): ``exception_during_validation``."""
        details = f"{input_name}: {message}" if input_name else message
        return self.fail(node_id, _error("exception_during_validation", message, details, input_name, received))

    def node(self, node_id: str) -> tuple[Any, ...]:
        if node_id in self.results:
            result = self.results[node_id]
            if result is None:
                if node_id not in self.errors:  # reached again while being evaluated
                    raise self.refuse(node_id, None, "the graph loops back to this node")
                raise _NodeFailedError
            return result
        self.results[node_id] = None
        entry = self.graph.get(node_id)
        if not isinstance(entry, Mapping) or not isinstance(entry.get("inputs", {}), Mapping):
            raise self.fail(node_id, _error("invalid_prompt", "Node is not an object with class_type and inputs",
                                            f"node {node_id!r}", None))  # fmt: skip
        class_type = self.class_of(node_id)
        spec = NODES.get(class_type)
        if spec is None:
            known = ", ".join(NODES)
            raise self.fail(node_id, _error("missing_node_type", f"Node type {class_type!r} is not one sfumato runs",
                                            f"sfumato runs: {known}", None))  # fmt: skip
        raw = entry.get("inputs", {})
        values: dict[str, Any] = {}
        failed = False
        for name, wanted in spec.inputs.items():
            try:
                values[name] = self.value(node_id, name, wanted, raw)
            except _NodeFailedError:
                failed = True
        if failed:
            raise _NodeFailedError
        result = RUNS[class_type](self, node_id, values)
        self.results[node_id] = result
        return result

    def value(self, node_id: str, name: str, wanted: Input, raw: Mapping[str, Any]) -> Any:
        if name not in raw:
            if wanted.optional:
                return wanted.default
            raise self.fail(node_id, _error("required_input_missing", "Required input is missing", name, name))
        given = raw[name]
        linked = isinstance(given, list)
        if linked:
            if len(given) != 2 or not isinstance(given[1], int) or isinstance(given[1], bool):
                raise self.fail(node_id, _error("bad_linked_input", "Bad linked input, must be a length-2 list of "
                                                "[node_id, slot_index]", name, name, given))  # fmt: skip
            source = str(given[0])
            if source not in self.graph:
                raise self.fail(node_id, _error("bad_linked_input", f"Linked node {source!r} is not in the prompt",
                                                name, name, given))  # fmt: skip
            source_spec = NODES.get(self.class_of(source))
            outputs = self.node(source)
            types = source_spec.outputs if source_spec else ()
            slot = given[1]
            if not 0 <= slot < len(types) or (types[slot] != wanted.type and wanted.type not in PRIMITIVES):
                got = types[slot] if 0 <= slot < len(types) else "nothing"
                raise self.fail(node_id, _error("return_type_mismatch", "Return type mismatch between linked nodes",
                                                f"{name}, received_type({got}) mismatch input_type({wanted.type})",
                                                name))  # fmt: skip
            if wanted.type in PRIMITIVES:
                raise self.refuse(node_id, name, f"takes a value, not the output of node {source!r}", given)
            return outputs[slot]
        if wanted.type not in PRIMITIVES:
            raise self.fail(node_id, _error("bad_linked_input", "Bad linked input, must be a length-2 list of "
                                            "[node_id, slot_index]", name, name, given))  # fmt: skip
        return self.primitive(node_id, name, wanted, given)

    def primitive(self, node_id: str, name: str, wanted: Input, given: Any) -> Any:
        if wanted.type == "COMBO":
            assert wanted.choices is not None
            allowed = self.choices.setdefault(wanted.choices, choices(self.state, wanted.choices))
            if given not in allowed:
                listed = str(allowed) if len(allowed) <= 20 else f"(list of length {len(allowed)})"
                raise self.fail(node_id, _error("value_not_in_list", "Value not in list",
                                                f"{name}: '{given}' not in {listed}", name, given))  # fmt: skip
            return given
        try:
            if wanted.type == "INT":
                if isinstance(given, bool) or (isinstance(given, float) and not given.is_integer()):
                    raise ValueError(f"{given!r} is not an integer")
                value: Any = int(given)
            elif wanted.type == "FLOAT":
                if isinstance(given, bool):
                    raise ValueError(f"{given!r} is not a number")
                value = float(given)
            elif wanted.type == "BOOLEAN":
                value = bool(given)
            else:
                if not isinstance(given, str):
                    raise ValueError(f"{given!r} is not a string")
                value = given
        except (TypeError, ValueError) as exc:
            message = f"Failed to convert an input value to a {wanted.type} value"
            error = _error("invalid_input_type", message, f"{name}, {given}, {exc}", name, given)
            raise self.fail(node_id, error) from None
        if wanted.min is not None and value < wanted.min:
            raise self.fail(node_id, _error("value_smaller_than_min", f"Value {value} smaller than min of "
                                            f"{wanted.min}", name, name, given))  # fmt: skip
        if wanted.max is not None and value > wanted.max:
            raise self.fail(node_id, _error("value_bigger_than_max", f"Value {value} bigger than max of "
                                            f"{wanted.max}", name, name, given))  # fmt: skip
        return value

    def entry_name(self, node_id: str, input_name: str, key: str, file_name: str) -> str:
        """The catalog name of a file a COMBO listed (refused if it left its folder since)."""
        name = next((e.name for e in folder_entries(self.state.catalog, key) if e.file_name == file_name), None)
        if name is None:
            raise self.refuse(node_id, input_name, f"{file_name!r} is no longer in its folder", file_name)
        return name


# --- node runs -------------------------------------------------------------------------------------


@_runs("CheckpointLoaderSimple")
def _checkpoint(w: _Walk, node: str, v: dict[str, Any]) -> tuple[Any, ...]:
    name = w.entry_name(node, "ckpt_name", "checkpoints", v["ckpt_name"])
    return Model(name, node), Clip(name, node), Vae(name, node)


@_runs("VAELoader")
def _vae_file(w: _Walk, node: str, v: dict[str, Any]) -> tuple[Any, ...]:
    name = v["vae_name"]
    found = w.state.catalog.vae(name)
    if found is not None:
        return (Vae(None, node, found.name),)
    if any(e.file_name == name for e in w.state.catalog.companions(("vae",))):
        return (Vae(None, node, companion=name),)
    raise w.refuse(node, "vae_name", f"{name!r} is no longer in its folder or the models config", name)


@_runs("UNETLoader")
def _unet(w: _Walk, node: str, v: dict[str, Any]) -> tuple[Any, ...]:
    return (Model(w.entry_name(node, "unet_name", "diffusion_models", v["unet_name"]), node, input="unet_name"),)


@_runs("CLIPLoader", "DualCLIPLoader", "TripleCLIPLoader")
def _clip_files(w: _Walk, node: str, v: dict[str, Any]) -> tuple[Any, ...]:
    files = frozenset(value for name, value in v.items() if name.startswith("clip_name"))
    return (Clip(None, node, encoders=files),)


def _clip_mismatch(w: _Walk, clip: Clip, model: Model) -> str | None:
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


@_runs("LoraLoader")
def _lora(w: _Walk, node: str, v: dict[str, Any]) -> tuple[Any, ...]:
    if v["strength_clip"] != v["strength_model"]:
        raise w.refuse(node, "strength_clip", "the engine applies a LoRA at one strength to the model and its text "
                       f"encoders: make it strength_model's ({v['strength_model']})", v["strength_clip"])  # fmt: skip
    model, clip = v["model"], v["clip"]
    if (why := _clip_mismatch(w, clip, model)) is not None:
        raise w.refuse(node, "clip", why)
    use = LoraUse(w.entry_name(node, "lora_name", "loras", v["lora_name"]), v["strength_model"], node)
    return replace(model, loras=(*model.loras, use)), replace(clip, loras=(*clip.loras, use))


@_runs("CLIPSetLastLayer")
def _clip_skip(w: _Walk, node: str, v: dict[str, Any]) -> tuple[Any, ...]:
    # -1 keeps every layer: the family's own setting; -2 skips the last one (clip_skip 2).
    stop = v["stop_at_clip_layer"]
    return (replace(v["clip"], clip_skip=DiffusionParams.clip_skip if stop == -1 else -stop, clip_skip_node=node),)


@_runs("CLIPTextEncode")
def _text(w: _Walk, node: str, v: dict[str, Any]) -> tuple[Any, ...]:
    return (Conditioning(v["text"], v["clip"], node),)


@_runs("FluxGuidance")
def _guidance(w: _Walk, node: str, v: dict[str, Any]) -> tuple[Any, ...]:
    return (replace(v["conditioning"], guidance=v["guidance"], guidance_node=node),)


@_runs("EmptyLatentImage", "EmptySD3LatentImage")
def _empty(w: _Walk, node: str, v: dict[str, Any]) -> tuple[Any, ...]:
    if v["batch_size"] > w.state.settings.max_images:
        raise w.refuse(node, "batch_size", f"is {v['batch_size']}; this server makes up to "
                       f"{w.state.settings.max_images} images per prompt", v["batch_size"])  # fmt: skip
    for side in ("width", "height"):
        if v[side] % ANY_FAMILY_SIDE_MULTIPLE:
            raise w.refuse(node, side, f"must be a multiple of {ANY_FAMILY_SIDE_MULTIPLE}, got {v[side]}", v[side])
    return (Latent(v["width"], v["height"], v["batch_size"], node, "width"),)


@_runs("LoadImage")
def _load(w: _Walk, node: str, v: dict[str, Any]) -> tuple[Any, ...]:
    path = w.state.settings.inputs_dir / v["image"]
    try:
        data = check_image(path.read_bytes(), "image")
        with Image.open(io.BytesIO(data)) as image:
            size = image.size
            alpha = image.getchannel("A") if "A" in image.getbands() else None
            mask = Image.eval(alpha, lambda a: 255 - a) if alpha is not None else Image.new("L", size, 0)
    except (OSError, InvalidParameterError) as exc:
        raise w.refuse(node, "image", f"cannot be read: {exc}", v["image"]) from None
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return Picture(data, size[0], size[1], node), Mask(buffer.getvalue(), node)


def _loaded(w: _Walk, node: str, name: str, pixels: object) -> Picture:
    if not isinstance(pixels, Picture):
        raise w.refuse(node, name, "sfumato encodes a loaded image (LoadImage); a decoded one would be a second "
                       "sampling, which one prompt does not run")  # fmt: skip
    return pixels


def _encoded(w: _Walk, node: str, picture: Picture, vae: Vae, mask: Mask | None) -> Latent:
    width, height = (side - side % ANY_FAMILY_SIDE_MULTIPLE for side in (picture.width, picture.height))
    if not width or not height:
        raise w.refuse(node, "pixels", f"the image is {picture.width}x{picture.height}; sfumato needs at least "
                       f"{ANY_FAMILY_SIDE_MULTIPLE} pixels a side")  # fmt: skip
    return Latent(width, height, 1, picture.node, "image", init=picture, mask=mask, vae=vae)


@_runs("VAEEncode")
def _encode(w: _Walk, node: str, v: dict[str, Any]) -> tuple[Any, ...]:
    return (_encoded(w, node, _loaded(w, node, "pixels", v["pixels"]), v["vae"], None),)


@_runs("VAEEncodeForInpaint")
def _encode_inpaint(w: _Walk, node: str, v: dict[str, Any]) -> tuple[Any, ...]:
    mask: Mask = v["mask"]
    grow = v["grow_mask_by"]
    if grow:
        with Image.open(io.BytesIO(mask.png)) as image:
            grown = image.filter(ImageFilter.MaxFilter(2 * grow + 1))
        buffer = io.BytesIO()
        grown.save(buffer, format="PNG")
        mask = Mask(buffer.getvalue(), mask.node)
    return (_encoded(w, node, _loaded(w, node, "pixels", v["pixels"]), v["vae"], mask),)


@_runs("SetLatentNoiseMask")
def _noise_mask(w: _Walk, node: str, v: dict[str, Any]) -> tuple[Any, ...]:
    latent: Latent = v["samples"]
    if latent.init is None or latent.sampled is not None:
        raise w.refuse(node, "samples", "sfumato inpaints an encoded image (VAEEncode of a LoadImage)")
    return (replace(latent, mask=v["mask"]),)


def _sampled(w: _Walk, node: str, latent: Latent, sampling: Sampling) -> Latent:
    if latent.sampled is not None:
        raise w.refuse(node, "latent_image", "sfumato samples once per prompt; this latent is sampled already")
    if latent.init is None and sampling.denoise != 1.0:
        raise w.refuse(node, "denoise", "an empty latent is sampled from pure noise: denoise must be 1 (for image "
                       "to image, VAEEncode a LoadImage)", sampling.denoise)  # fmt: skip
    for side, conditioning in (("positive", sampling.positive), ("negative", sampling.negative)):
        why = _clip_mismatch(w, conditioning.clip, sampling.model) if conditioning is not None else None
        if why is not None:
            raise w.refuse(node, side, why)
        if conditioning is not None and conditioning.clip.loras != sampling.model.loras:
            raise w.refuse(node, side, "the engine applies each LoRA to the model and its text encoders alike: "
                           "load the LoRAs on both (LoraLoader)")  # fmt: skip
    return replace(latent, sampled=sampling)


def _sampler_origin(node: str, seed: str) -> dict[str, tuple[str, str]]:
    return {"steps": (node, "steps"), "cfg_scale": (node, "cfg"), "seed": (node, seed),
            "sampling_method": (node, "sampler_name"), "scheduler": (node, "scheduler"),
            "strength": (node, "denoise")}  # fmt: skip


@_runs("KSampler")
def _ksampler(w: _Walk, node: str, v: dict[str, Any]) -> tuple[Any, ...]:
    sampling = Sampling(node, v["model"], v["positive"], v["negative"], v["cfg"], v["steps"], v["seed"],
                        v["sampler_name"], v["scheduler"], v["denoise"], _sampler_origin(node, "seed"))  # fmt: skip
    return (_sampled(w, node, v["latent_image"], sampling),)


@_runs("KSamplerAdvanced")
def _ksampler_advanced(w: _Walk, node: str, v: dict[str, Any]) -> tuple[Any, ...]:
    steps, start = v["steps"], v["start_at_step"]
    if v["end_at_step"] < steps:
        raise w.refuse(node, "end_at_step", f"sfumato samples to the last step: make it at least steps ({steps})",
                       v["end_at_step"])  # fmt: skip
    if start >= steps:
        raise w.refuse(node, "start_at_step", f"must be below steps ({steps})", start)
    latent: Latent = v["latent_image"]
    if start and latent.init is None:
        raise w.refuse(node, "start_at_step", "an empty latent is sampled from its first step", start)
    origin = {**_sampler_origin(node, "noise_seed"), "strength": (node, "start_at_step")}
    sampling = Sampling(node, v["model"], v["positive"], v["negative"], v["cfg"], steps, v["noise_seed"],
                        v["sampler_name"], v["scheduler"], 1.0 - start / steps, origin)  # fmt: skip
    return (_sampled(w, node, latent, sampling),)


@_runs("KSamplerSelect")
def _sampler_select(w: _Walk, node: str, v: dict[str, Any]) -> tuple[Any, ...]:
    return (SamplerChoice(v["sampler_name"], node),)


@_runs("BasicScheduler")
def _basic_scheduler(w: _Walk, node: str, v: dict[str, Any]) -> tuple[Any, ...]:
    return (Sigmas(v["scheduler"], v["steps"], v["denoise"], node),)


@_runs("RandomNoise")
def _noise(w: _Walk, node: str, v: dict[str, Any]) -> tuple[Any, ...]:
    return (Noise(v["noise_seed"], node),)


@_runs("BasicGuider")
def _basic_guider(w: _Walk, node: str, v: dict[str, Any]) -> tuple[Any, ...]:
    return (Guider(v["model"], v["conditioning"], None, 1.0, node),)


@_runs("CFGGuider")
def _cfg_guider(w: _Walk, node: str, v: dict[str, Any]) -> tuple[Any, ...]:
    return (Guider(v["model"], v["positive"], v["negative"], v["cfg"], node),)


@_runs("SamplerCustomAdvanced")
def _custom(w: _Walk, node: str, v: dict[str, Any]) -> tuple[Any, ...]:
    guider: Guider = v["guider"]
    sigmas: Sigmas = v["sigmas"]
    sampler: SamplerChoice = v["sampler"]
    noise: Noise = v["noise"]
    origin = {"steps": (sigmas.node, "steps"), "scheduler": (sigmas.node, "scheduler"),
              "strength": (sigmas.node, "denoise"), "cfg_scale": (guider.node, "cfg"),
              "sampling_method": (sampler.node, "sampler_name"), "seed": (noise.node, "noise_seed")}  # fmt: skip
    sampling = Sampling(node, guider.model, guider.positive, guider.negative, guider.cfg, sigmas.steps, noise.seed,
                        sampler.name, sigmas.scheduler, sigmas.denoise, origin)  # fmt: skip
    latent = _sampled(w, node, v["latent_image"], sampling)
    return latent, latent


@_runs("VAEDecode")
def _decode(w: _Walk, node: str, v: dict[str, Any]) -> tuple[Any, ...]:
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
            raise w.refuse(node, "vae", f"{vae.companion} is a VAE of the models config that {model!r} does not "
                           f"name ({takes}); a VAE of the VAEs folder decodes any model")  # fmt: skip
    elif vae.file is None and vae.checkpoint != model:
        raise w.refuse(node, "vae", "a checkpoint's VAE decodes only that checkpoint's latents (or use a VAELoader)")
    if latent.vae is not None and latent.vae.file != vae.file:
        raise w.refuse(node, "vae", "the engine encodes and decodes with one VAE: give VAEEncode the same one")
    return (Decoded(latent, vae, node),)


@_runs("UpscaleModelLoader")
def _upscale_model(w: _Walk, node: str, v: dict[str, Any]) -> tuple[Any, ...]:
    return (UpscaleModel(w.entry_name(node, "model_name", "upscale_models", v["model_name"]), node),)


@_runs("ImageUpscaleWithModel")
def _upscale(w: _Walk, node: str, v: dict[str, Any]) -> tuple[Any, ...]:
    image, model = v["image"], v["upscale_model"]
    if isinstance(image, Upscaled):  # again: one more pass, with the same model
        if image.upscaler.name != model.name:
            raise w.refuse(node, "upscale_model", f"the engine runs one upscaler per image; the image was upscaled "
                           f"with {image.upscaler.name!r} (node {image.upscaler.node})")  # fmt: skip
        return (replace(image, node=node, repeats=image.repeats + 1),)
    if not isinstance(image, (Picture, Decoded)):
        raise w.refuse(node, "image", "sfumato upscales a loaded image (LoadImage) or the prompt's generation")
    return (Upscaled(image, model, node),)


@_runs("SaveImage", "PreviewImage")
def _output(w: _Walk, node: str, v: dict[str, Any]) -> tuple[Any, ...]:
    return (v["images"],)


# --- the compiled prompt ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Compiled:
    """A prompt as the server runs it: the plan, and the nodes that progress messages name."""

    plan: JobPlan
    outputs: tuple[str, ...]  # the output nodes, in the prompt's order
    loader: str  # the node that loads the model
    sampler: str | None  # the node that samples (None for an upscale)
    decoder: str | None
    class_types: dict[str, str]
    upscaler: str | None = None  # the node upscaling the generation


def compile_prompt(state: ServerState, graph: object) -> Compiled:
    """The job of a ComfyUI prompt.

    Raises
    ------
    GraphError
        With ComfyUI's ``error`` and ``node_errors``.
    """
    if not isinstance(graph, Mapping) or not graph:
        raise GraphError("invalid_prompt", "The prompt must be a non-empty object of nodes")
    graph = {str(k): v for k, v in graph.items()}
    walk = _Walk(state, graph)
    class_types = {node_id: walk.class_of(node_id) for node_id in graph}
    unknown = {node_id: kind for node_id, kind in class_types.items() if kind not in NODES}
    if unknown:
        runs = f"sfumato runs: {', '.join(NODES)}"
        errors = {
            node_id: {"errors": [_error("missing_node_type", f"Node type {kind!r} is not one sfumato runs", runs,
                                        None)],
                      "dependent_outputs": [], "class_type": kind}
            for node_id, kind in unknown.items()
        }  # fmt: skip
        first = next(iter(unknown.items()))
        raise GraphError("missing_node_type", f"Node type {first[1]!r} (node {first[0]}) is not one sfumato runs",
                         errors)  # fmt: skip
    outputs = [node_id for node_id, kind in class_types.items() if NODES[kind].output_node]
    if not outputs:
        raise GraphError("prompt_no_outputs", "Prompt has no outputs", details="add a SaveImage or PreviewImage node")
    images: dict[str, Any] = {}
    for node_id in outputs:
        try:
            images[node_id] = walk.node(node_id)[0]
        except _NodeFailedError:
            pass
    first_image = next(iter(images.values()), None)
    for node_id, image in images.items():
        if image is not first_image:
            walk.refuse(node_id, "images", "sfumato runs one image chain per prompt; save the same images")
        elif not isinstance(image, (Decoded, Upscaled)):
            walk.refuse(node_id, "images", "nothing is generated: save a VAEDecode's or an upscale's images")
    _raise_for(walk, outputs)
    upscaled = first_image if isinstance(first_image, Upscaled) else None
    if upscaled is not None and isinstance(upscaled.image, Picture):
        work = Upscale(image=upscaled.image.data, repeats=upscaled.repeats)
        plan = JobPlan(model=upscaled.upscaler.name, work=work)
        return Compiled(plan, tuple(outputs), upscaled.upscaler.node, None, None, class_types)
    decoded = upscaled.image if upscaled is not None else first_image
    assert isinstance(decoded, Decoded) and decoded.latent.sampled is not None
    sampling = decoded.latent.sampled
    generation = _generation(state, decoded, walk, upscaled)
    _raise_for(walk, outputs)
    assert generation is not None
    return Compiled(generation, tuple(outputs), sampling.model.node, sampling.node, decoded.node, class_types,
                    upscaled.node if upscaled is not None else None)  # fmt: skip


def _raise_for(walk: _Walk, outputs: list[str]) -> None:
    """ComfyUI's 400 for the errors the walk recorded, if any."""
    if walk.errors:
        for entry in walk.errors.values():
            entry["dependent_outputs"] = outputs
        raise GraphError("prompt_outputs_failed_validation", "Prompt outputs failed validation", walk.errors)


def _preview(state: ServerState, checkpoint: str) -> str | None:
    """The SDK's ``preview`` for ``--preview-method``, as ComfyUI reads it: ``taesd``
    (and ``auto``) use the model's tiny autoencoder when it has one, else the projection."""
    method = state.settings.preview_method
    if method == "none":
        return None
    entry = next((e for e in state.catalog.models() if e.name == checkpoint), None)
    tiny = entry is not None and entry.taesd is not None
    return "tae" if tiny and method in ("taesd", "auto") else "proj"


def _generation(state: ServerState, decoded: Decoded, walk: _Walk, upscaled: Upscaled | None) -> JobPlan | None:
    """The checked plan of a decoded sampling (and its ESRGAN passes, when ``upscaled``);
    ``None`` with the error recorded on its node."""
    latent = decoded.latent
    s = latent.sampled
    assert s is not None
    clip = s.positive.clip
    origin: dict[str, tuple[str, str]] = {
        "prompt": (s.positive.node, "text"), "width": (latent.node, latent.size_input),
        "height": (latent.node, "height" if latent.size_input == "width" else latent.size_input),
        "batch_count": (latent.node, "batch_size"), "model": (s.model.node, s.model.input), **s.origin,
    }  # fmt: skip
    if s.negative is not None:
        origin["negative_prompt"] = (s.negative.node, "text")
    if clip.clip_skip_node is not None:
        origin["clip_skip"] = (clip.clip_skip_node, "stop_at_clip_layer")
    if s.positive.guidance_node is not None:
        origin["guidance"] = (s.positive.guidance_node, "guidance")
    for i, lora in enumerate(s.model.loras):
        origin[f"loras[{i}]"] = (lora.node, "lora_name")
    if latent.init is not None:
        origin["init_image"] = (latent.init.node, "image")
    if latent.mask is not None:
        origin["mask"] = (latent.mask.node, "image")
    params = DiffusionParams(
        prompt=s.positive.text, negative_prompt=s.negative.text if s.negative else "", width=latent.width,
        height=latent.height, steps=s.steps, cfg_scale=s.cfg,
        guidance=s.positive.guidance if s.positive.guidance is not None else DiffusionParams.guidance,
        sampling_method=names.COMFY_SAMPLERS[s.sampler], scheduler=names.COMFY_SCHEDULERS[s.scheduler],
        seed=s.seed, batch_count=latent.batch,
        init_image=latent.init.data if latent.init else None, mask=latent.mask.png if latent.mask else None,
        strength=s.denoise if latent.init is not None else DiffusionParams.strength,
        loras=[{"name": lora.name, "scale": lora.scale} for lora in s.model.loras], clip_skip=clip.clip_skip,
        preview=_preview(state, s.model.checkpoint),
        upscale={"repeats": upscaled.repeats} if upscaled is not None else None,
    )  # fmt: skip
    if decoded.vae.file is not None:
        origin["vae"] = (decoded.vae.node, "vae_name")
    if upscaled is not None:
        origin["upscale"] = (upscaled.upscaler.node, "model_name")
    esrgan = upscaled.upscaler.name if upscaled is not None else None
    try:
        return job_plan(state, params, model=s.model.checkpoint, vae=decoded.vae.file, esrgan=esrgan)
    except InvalidParameterError as exc:
        node, input_name = origin.get(exc.field, (s.node, exc.field))
        walk.refuse(node, input_name, exc.message)
        return None

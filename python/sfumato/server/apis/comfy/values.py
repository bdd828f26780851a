"""What ComfyUI nodes evaluate to: symbolic values (a checkpoint, a prompt, a latent to
sample, a decoded image) that the walk passes from node to node."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from sfumato.params import DiffusionParams

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
    flow_shift: float | None = None
    flow_shift_node: str | None = None


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
    text_input: str = "text"
    """The input of ``node`` that gave ``text``."""
    references: tuple[Picture, ...] = ()
    """The images ``ReferenceLatent`` nodes gave it, for in-context editing."""
    reference_node: str | None = None
    reference_input: str = "latent"
    """The input of ``reference_node`` that gave the first reference."""
    edit: Picture | None = None
    """The image an instruct-pix2pix model edits (``InstructPixToPixConditioning``), if any."""
    edit_node: str | None = None


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
    img_cfg: float | None = None
    """instruct-pix2pix's image guidance (``None``: ``cfg``)."""


@dataclass(frozen=True)
class Latent:
    """A latent image as the graph passes it: its size, and what it was made from."""

    width: int
    height: int
    batch: int
    size_from: tuple[str, str]
    """The node its size came from, and that node's input naming it (``width`` or ``image``)."""
    init: Picture | None = None
    """The image it encodes (img2img), if any."""
    mask: Mask | None = None
    """The inpainting mask (``VAEEncodeForInpaint``, ``SetLatentNoiseMask``), if any."""
    vae: Vae | None = None
    """The VAE that encoded ``init``."""
    sampled: Sampling | None = None
    """The sampling that made it, once a sampler has run."""


@dataclass(frozen=True)
class Upscaled:
    image: Picture | Decoded  # a loaded image, or the prompt's generation
    upscaler: UpscaleModel
    node: str
    repeats: int = 1


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
    img_cfg: float | None = None
    """A ``DualCFGGuider``'s image guidance (``cfg_cond2_negative``)."""

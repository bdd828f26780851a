"""Model-family detection from file headers.

Only headers are read: the GGUF tensor table (via ``gguf``), the safetensors
JSON header, the pickle of a PyTorch zip checkpoint (scanned for strings, never
unpickled), or the files of a diffusers folder. Anything that is not a model,
is truncated, or is of a family sfumato does not run yet is refused here, so no
engine call is ever made with it.
"""

from __future__ import annotations

import json
import pickletools
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sfumato.errors import (
    InvalidModelError,
    InvalidParameterError,
    ModelNotFoundError,
    SfumatoError,
    UnsupportedModelError,
)

Family = Literal[
    "sd1",
    "sd2",
    "sdxl",
    "sd3",
    "flux1",
    "chroma",
    "ovis",
    "z_image",
    "ernie_image",
    "qwen_image",
    "anima",
    "flux2",
    "esrgan",
]
"""The model families sfumato detects; :data:`FAMILY_NAMES` gives their display names."""
FAMILY_SD1: Family = "sd1"
FAMILY_SD2: Family = "sd2"
FAMILY_SDXL: Family = "sdxl"
FAMILY_SD3: Family = "sd3"
FAMILY_FLUX1: Family = "flux1"
FAMILY_CHROMA: Family = "chroma"
FAMILY_OVIS: Family = "ovis"
FAMILY_Z_IMAGE: Family = "z_image"
FAMILY_ERNIE_IMAGE: Family = "ernie_image"
FAMILY_QWEN_IMAGE: Family = "qwen_image"
FAMILY_ANIMA: Family = "anima"
FAMILY_FLUX2: Family = "flux2"
FAMILY_ESRGAN: Family = "esrgan"
DIFFUSION_FAMILIES = (
    FAMILY_SD1, FAMILY_SD2, FAMILY_SDXL, FAMILY_SD3, FAMILY_FLUX1, FAMILY_CHROMA, FAMILY_OVIS, FAMILY_Z_IMAGE,
    FAMILY_ERNIE_IMAGE, FAMILY_QWEN_IMAGE, FAMILY_ANIMA, FAMILY_FLUX2,
)  # fmt: skip
SUPPORTED_FAMILIES = (*DIFFUSION_FAMILIES, FAMILY_ESRGAN)
FAMILY_NAMES: dict[Family, str] = {
    FAMILY_SD1: "SD 1.x", FAMILY_SD2: "SD 2.x", FAMILY_SDXL: "SDXL", FAMILY_SD3: "SD3",
    FAMILY_FLUX1: "FLUX.1", FAMILY_CHROMA: "Chroma", FAMILY_OVIS: "Ovis-Image", FAMILY_Z_IMAGE: "Z-Image",
    FAMILY_ERNIE_IMAGE: "ERNIE-Image", FAMILY_QWEN_IMAGE: "Qwen-Image", FAMILY_ANIMA: "Anima",
    FAMILY_FLUX2: "FLUX.2 [klein]",
    FAMILY_ESRGAN: "ESRGAN",
}  # fmt: skip

TEXT_ENCODER_PREFIXES = {
    "clip_l": ("text_encoders.clip_l.", "cond_stage_model.transformer.", "conditioner.embedders.0.transformer."),
    "clip_g": ("text_encoders.clip_g.", "cond_stage_model.1.", "conditioner.embedders.1."),
    "t5xxl": ("text_encoders.t5xxl.",),
}
"""Where an all-in-one checkpoint keeps each text encoder."""

SDXL_ADM_CHANNELS = 2816
"""Width of the SDXL base UNet's ``label_emb`` input (the refiner's is 2560)."""

GGUF_MAGIC = b"GGUF"
ZIP_MAGIC = b"PK\x03\x04"


@dataclass
class TensorTable:
    """Tensor names and shapes (numpy order) read from a file's header."""

    format: str
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def has_prefix(self, prefix: str) -> bool:
        """Whether any tensor name starts with ``prefix``."""
        return any(name.startswith(prefix) for name in self.shapes)

    def find(self, *names: str) -> tuple[int, ...] | None:
        """The shape of the first of ``names`` present, or ``None``."""
        for name in names:
            if name in self.shapes:
                return self.shapes[name]
        return None

    def input_width(self, name: str) -> int | None:
        """The input width of the matrix ``name`` (its second numpy axis), or
        ``None`` when there is no such 2-D tensor."""
        shape = self.shapes.get(name)
        return shape[1] if shape is not None and len(shape) == 2 else None


@dataclass(frozen=True)
class ModelInfo:
    """What detection found out about a model source.

    Attributes
    ----------
    path:
        The file or folder.
    family:
        One of :data:`SUPPORTED_FAMILIES`.
    format:
        ``"gguf"``, ``"safetensors"``, ``"torch"`` or ``"diffusers"``.
    variant:
        ``"inpaint"`` for 9-channel UNets, ``"pix2pix"`` for instruct-pix2pix's 8-channel
        ones (they edit the SDK's ``init_images[0]``, guided by ``img_cfg_scale``); for
        FLUX.1 one of :data:`FLUX1_VARIANTS`' values, ``"dev"`` or ``"schnell"``;
        ``"radiance"`` for Chroma1-Radiance (pixel space); else ``None``.
    has_vae:
        Whether the file carries its own VAE.
    split:
        Whether the file is the diffusion model alone, whose text encoders
        (and VAE) come from companion files.
    text_width:
        The width of the text features the diffusion model takes, where its
        header says (FLUX.1: T5-XXL's; FLUX.2: three stacked LLM layers).
    carries:
        The text encoders the file holds beside its diffusion model.
    """

    path: Path
    family: Family
    format: str
    variant: str | None = None
    has_vae: bool = True
    split: bool = False
    text_width: int | None = None
    carries: frozenset[str] = frozenset()


def _invalid(path: Path, why: str) -> InvalidModelError:
    return InvalidModelError(f"{path}: {why}")


def read_gguf(path: Path) -> TensorTable:
    """Read the tensor table of a GGUF file and check that its data is all there."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError, struct.error) as exc:
        raise _invalid(path, f"not a readable GGUF file ({exc})") from None
    table = TensorTable("gguf")
    size = path.stat().st_size
    for tensor in reader.tensors:
        if int(tensor.data_offset) + int(tensor.n_bytes) > size:
            raise _invalid(path, f"truncated: tensor {tensor.name!r} extends past the end of the file")
        table.shapes[tensor.name] = tuple(int(n) for n in reversed(tensor.shape.tolist()))
    return table


def read_safetensors(path: Path) -> TensorTable:
    """Read the JSON header of a safetensors file and check that its data is all there."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _invalid(path, "too short to be a safetensors file")
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, 256 * 1024 * 1024):
            raise _invalid(path, "not a safetensors file (header length out of range)")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _invalid(path, f"not a safetensors file ({exc})") from None
    if not isinstance(header, dict):
        raise _invalid(path, "not a safetensors file (header is not an object)")
    table = TensorTable("safetensors")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            table.shapes[name] = tuple(int(n) for n in entry["shape"])
            end = max(end, int(entry["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError):
            raise _invalid(path, f"not a safetensors file (bad entry for {name!r})") from None
    if 8 + length + end > size:
        raise _invalid(path, "truncated: tensor data extends past the end of the file")
    return table


def read_torch_zip(path: Path) -> TensorTable:
    """List the tensor names of a PyTorch zip checkpoint by scanning its pickle's
    strings (nothing is unpickled, so no code in the file runs)."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
            if not pickles:
                raise _invalid(path, "a zip file without data.pkl is not a PyTorch checkpoint")
            data = archive.read(pickles[0])
            bad = archive.testzip()
    except zipfile.BadZipFile as exc:
        raise _invalid(path, f"not a readable PyTorch checkpoint, or truncated ({exc})") from None
    if bad is not None:
        raise _invalid(path, f"truncated or corrupt: archive member {bad!r} fails its CRC check")
    table = TensorTable("torch")
    try:
        for opcode, arg, _pos in pickletools.genops(data):
            if "UNICODE" in opcode.name and isinstance(arg, str) and "." in arg:
                table.shapes.setdefault(arg, ())
    except (ValueError, EOFError) as exc:
        raise _invalid(path, f"corrupt checkpoint pickle ({exc})") from None
    return table


def read_tensor_table(path: Path) -> TensorTable:
    """Read the tensor table of a single model file, by its magic bytes."""
    if not path.exists():
        raise ModelNotFoundError(f"no model file at {path}")
    if path.is_dir():
        raise _invalid(path, "is a folder, not a model file")
    with path.open("rb") as f:
        magic = f.read(9)
    if magic[:4] == GGUF_MAGIC:
        return read_gguf(path)
    if magic[:4] == ZIP_MAGIC:
        return read_torch_zip(path)
    # safetensors: the header's length (u64, little-endian; any of its bytes may be zero),
    # then the header, a JSON object.
    if magic[8:9] == b"{" and struct.unpack("<Q", magic[:8])[0] < path.stat().st_size:
        return read_safetensors(path)
    raise _invalid(path, "not a model file (expected GGUF, safetensors or a PyTorch checkpoint)")


DIFFUSION_ROOTS = ("model.diffusion_model.", "")
"""Where a diffusion model's tensors are: under the checkpoint prefix, or alone."""

LLM_TRANSFORMERS: tuple[tuple[str, Family, str, tuple[str, ...]], ...] = (
    ("cap_embedder.0.", FAMILY_Z_IMAGE, "cap_embedder.1.weight", DIFFUSION_ROOTS),
    ("layers.0.adaLN_sa_ln.", FAMILY_ERNIE_IMAGE, "text_proj.weight", DIFFUSION_ROOTS),
    ("transformer_blocks.0.img_mod.1.", FAMILY_QWEN_IMAGE, "txt_in.weight", DIFFUSION_ROOTS),
    ("llm_adapter.", FAMILY_ANIMA, "llm_adapter.blocks.0.cross_attn.k_proj.weight",
     tuple(f"{root}net." for root in DIFFUSION_ROOTS)),
)  # fmt: skip
"""The transformers a language model prompts: Z-Image (its caption embedder takes a Qwen3's
features), ERNIE-Image (its layers share one adaptive norm), Qwen-Image and its Edit (the
same layout: the header does not tell them apart) and Anima (Cosmos-Predict2's DiT under
``net.``, with an LLM adapter). Each by a tensor only it has, its family, the matrix that
takes its text features, and the prefixes the model is found under."""

VIDEO_VERSIONS: tuple[tuple[str, str], ...] = (
    ("blocks.0.cross_attn.norm_k.weight", "Wan 2.x"),
    ("input_blocks.8.0.time_mixer.mix_factor", "Stable Video Diffusion"),
)
"""The engine's video versions, by a tensor only each has (under the diffusion model's
prefix, where it has one), and what each is: each is named when refused, before any
engine call."""


def _refuse_video(path: Path, table: TensorTable) -> None:
    """Refuse, by name, a model of a version the engine runs for video."""
    for marker, name in VIDEO_VERSIONS:
        if _diffusion_prefix(table, marker) is not None:
            raise UnsupportedModelError(f"{path}: a {name} video model; sfumato makes images, not video")


def _classify(path: Path, table: TensorTable) -> ModelInfo:
    has = table.has_prefix
    if (has("conv_first.") and has("body.0.rdb1.")) or (has("model.0.") and has("model.1.sub.")):
        return ModelInfo(path, FAMILY_ESRGAN, table.format)
    _refuse_video(path, table)
    for classify in (_classify_sd3, _classify_flux2, _classify_flux1, _classify_llm_transformer):
        found = classify(path, table)
        if found is not None:
            return found
    sdxl = _classify_sdxl(path, table)
    if sdxl is not None:
        return sdxl
    if has("model.diffusion_model.input_blocks."):
        token = table.find(
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
            "cond_stage_model.model.token_embedding.weight",
        )
        if token is None:
            raise _invalid(path, "an SD UNet without its text encoder (cond_stage_model.*); use an all-in-one file")
        width = token[-1] if table.format != "torch" else 0
        family = {768: FAMILY_SD1, 1024: FAMILY_SD2}.get(width)
        if family is None:
            raise UnsupportedModelError(f"{path}: an SD UNet with a {width}-wide text encoder is not SD 1.x or 2.x")
        variant = _unet_variant(table, "model.diffusion_model.")
        if family == FAMILY_SD2 and variant == "pix2pix":
            raise UnsupportedModelError(f"{path}: an SD 2.x instruct-pix2pix UNet; the engine runs SD 1.x's and SDXL's")
        return ModelInfo(path, family, table.format, variant, has_vae=has("first_stage_model."))
    if has("input_blocks.") and has("middle_block."):
        raise _invalid(path, "an SD 1.x / 2.x UNet without its text encoder; use an all-in-one file")
    raise UnsupportedModelError(f"{path}: no model family sfumato supports matches this tensor layout")


def _carried(table: TensorTable) -> frozenset[str]:
    return frozenset(role for role, prefixes in TEXT_ENCODER_PREFIXES.items() if any(map(table.has_prefix, prefixes)))


def _diffusion_prefix(table: TensorTable, marker: str, roots: tuple[str, ...] = DIFFUSION_ROOTS) -> str | None:
    """The one of ``roots`` that ``marker`` is found under; ``None``: none."""
    return next((p for p in roots if table.has_prefix(f"{p}{marker}")), None)


def _other_parts(table: TensorTable, prefix: str) -> bool:
    """Whether the file holds more than the diffusion model (a VAE, text encoders)."""
    return prefix != "" and any(not name.startswith(prefix) for name in table.shapes)


def _classify_sd3(path: Path, table: TensorTable) -> ModelInfo | None:
    """An SD3 / SD3.5 MMDiT: alone, with its VAE (``sd3_medium.safetensors``) or with its text encoders too."""
    prefix = _diffusion_prefix(table, "joint_blocks.")
    if prefix is None:
        return None
    return ModelInfo(
        path,
        FAMILY_SD3,
        table.format,
        has_vae=table.has_prefix("first_stage_model."),
        split=not _other_parts(table, prefix),
        carries=_carried(table),
    )


def _classify_llm_transformer(path: Path, table: TensorTable) -> ModelInfo | None:
    """A transformer of :data:`LLM_TRANSFORMERS`; ``None`` when it is none."""
    for marker, family, text_input, roots in LLM_TRANSFORMERS:
        prefix = _diffusion_prefix(table, marker, roots)
        if prefix is not None:
            return ModelInfo(
                path,
                family,
                table.format,
                has_vae=table.has_prefix("first_stage_model.") or table.has_prefix("vae."),
                split=not _other_parts(table, prefix),
                text_width=table.input_width(f"{prefix}{text_input}"),
                carries=_carried(table),
            )
    return None


FLUX1_VARIANTS = {384: "fill", 128: "controls"}
"""FLUX.1 transformers by the channels ``img_in`` takes besides the 64 of the 2x2-patchified
latent: Fill also takes the masked image's latent and the 8x8 mask (64 + 64 + 256),
Depth/Canny the control image's latent (64 + 64)."""

FLEX2_CHANNELS = 196
"""Flex.2's ``img_in``: the latent, the masked latent, the mask and the control latent,
patchified (4 x (16 + 16 + 1 + 16)). The pinned engine cannot run it: its control path
(which covers Flex.2) replaces that 33-channel conditioning with the 16-channel control
latent, and the graph build then reads past it and aborts the process."""

PIXEL_SPACE_VARIANTS = ("radiance",)
"""The variants that denoise pixels, not latents (Chroma1-Radiance): they take no VAE."""

CONTROLLED_VARIANTS = ("controls",)
"""The variants that take a control image themselves (no ControlNet): it is VAE-encoded into
the transformer's input."""


def _classify_flux1(path: Path, table: TensorTable) -> ModelInfo | None:
    """A FLUX.1 transformer: [dev] (with its guidance embedder) or [schnell], a variant of
    :data:`FLUX1_VARIANTS`, Chroma (FLUX.1 with a distilled modulation network and
    T5-XXL alone; Chroma1-Radiance, variant ``"radiance"``, in pixel space) or Ovis-Image
    (gated MLPs, a Qwen3 text encoder); ``None`` when it is none."""
    prefix = _diffusion_prefix(table, "double_blocks.")
    if prefix is None:
        return None
    has_vae = table.has_prefix("first_stage_model.") or table.has_prefix("vae.")
    split = not _other_parts(table, prefix)
    text_width = table.input_width(f"{prefix}txt_in.weight")
    if table.has_prefix(f"{prefix}nerf_final_layer_conv."):  # pixels in and out: no VAE
        return ModelInfo(path, FAMILY_CHROMA, table.format, "radiance", True, split, text_width, _carried(table))
    if table.has_prefix(f"{prefix}distilled_guidance_layer."):
        return ModelInfo(path, FAMILY_CHROMA, table.format, None, has_vae, split, text_width, _carried(table))
    if table.has_prefix(f"{prefix}double_blocks.0.img_mlp.gate_proj."):
        return ModelInfo(path, FAMILY_OVIS, table.format, None, has_vae, split, text_width, _carried(table))
    img_in = table.input_width(f"{prefix}img_in.weight")
    if img_in == FLEX2_CHANNELS:
        raise UnsupportedModelError(
            f"{path}: a Flex.2 transformer ({img_in} input channels), which the pinned engine cannot run: it "
            "replaces Flex.2's inpainting and control conditioning with the control latent alone, then aborts "
            "building the graph"
        )
    if img_in is not None and img_in != 64 and img_in not in FLUX1_VARIANTS:
        raise UnsupportedModelError(
            f"{path}: a FLUX.1 transformer taking {img_in} input channels; the engine's FLUX.1 takes 64 "
            f"([dev], [schnell], Kontext) or {', '.join(f'{n} ({v})' for n, v in FLUX1_VARIANTS.items())}"
        )
    variant = FLUX1_VARIANTS.get(img_in or 64) or ("dev" if table.has_prefix(f"{prefix}guidance_in.") else "schnell")
    return ModelInfo(path, FAMILY_FLUX1, table.format, variant, has_vae, split, text_width, _carried(table))


def _classify_flux2(path: Path, table: TensorTable) -> ModelInfo | None:
    """A FLUX.2 transformer (with or without the checkpoint prefix); ``None`` when it is none."""
    prefix = _diffusion_prefix(table, "double_stream_modulation_img.")
    if prefix is None:
        return None
    if table.has_prefix(f"{prefix}single_blocks.47."):
        raise UnsupportedModelError(
            f"{path}: a FLUX.2 [dev] transformer (48 single blocks, Mistral-Small text encoder); "
            "this version of sfumato runs FLUX.2 [klein]"
        )
    width = table.input_width(f"{prefix}txt_in.weight")
    return ModelInfo(path, FAMILY_FLUX2, table.format, has_vae=False, split=True, text_width=width)


UNET_VARIANTS = {9: "inpaint", 8: "pix2pix"}
"""UNets by the channels their first convolution takes: an inpainting UNet also takes the
masked image's latent and the mask (4 + 4 + 1), an instruct-pix2pix UNet the latent of
the image it edits (4 + 4)."""


def _unet_variant(table: TensorTable, prefix: str) -> str | None:
    conv_in = table.find(f"{prefix}input_blocks.0.0.weight")
    return UNET_VARIANTS.get(conv_in[1]) if conv_in is not None and len(conv_in) > 1 else None


def _classify_sdxl(path: Path, table: TensorTable) -> ModelInfo | None:
    """SDXL, all-in-one or a UNet alone (with or without the checkpoint prefix);
    ``None`` when ``table`` is no SDXL UNet."""
    has = table.has_prefix
    prefix = _diffusion_prefix(table, "label_emb.0.0.")
    if prefix is None:
        return None
    adm = table.input_width(f"{prefix}label_emb.0.0.weight")
    if adm is not None and adm != SDXL_ADM_CHANNELS:
        if adm == 2560:
            raise UnsupportedModelError(
                f"{path}: the SDXL refiner architecture (one OpenCLIP-G text encoder, 2560-wide label_emb), "
                "which the engine does not run; as a refiner, use an SDXL base-architecture checkpoint"
            )
        raise UnsupportedModelError(f"{path}: a UNet with a {adm}-wide label_emb is neither SDXL nor SD 1.x / 2.x")
    variant = _unet_variant(table, prefix)
    if has("conditioner.embedders.1.") or has("cond_stage_model.1."):
        return ModelInfo(
            path, FAMILY_SDXL, table.format, variant, has_vae=has("first_stage_model."), carries=_carried(table)
        )
    if has("conditioner.") or has("cond_stage_model."):
        raise _invalid(path, "an SDXL checkpoint with one of its two text encoders (CLIP-L and CLIP-G) missing")
    return ModelInfo(path, FAMILY_SDXL, table.format, variant, has_vae=False, split=True)


def _detect_diffusers(path: Path) -> ModelInfo:
    needed = {
        "unet": path / "unet" / "diffusion_pytorch_model.safetensors",
        "vae": path / "vae" / "diffusion_pytorch_model.safetensors",
        "text_encoder": path / "text_encoder" / "model.safetensors",
    }
    missing = [role for role, file in needed.items() if not file.is_file()]
    if missing:
        raise _invalid(path, f"a diffusers folder needs {', '.join(str(needed[m]) for m in missing)}")
    if (path / "text_encoder_2").exists():
        raise UnsupportedModelError(
            f"{path}: an SDXL diffusers folder, which sfumato does not load; use the single-file checkpoint, "
            "or a UNet file with model_config.clip_l_model_src, clip_g_model_src and vae_model_src"
        )
    unet = read_safetensors(needed["unet"])
    read_safetensors(needed["vae"])
    text = read_safetensors(needed["text_encoder"])
    token = text.find("text_model.embeddings.token_embedding.weight")
    if token is None:
        if text.find("embeddings.token_embedding.weight") is not None:
            raise _invalid(
                path,
                "text_encoder/model.safetensors names its tensors without the 'text_model.' prefix "
                "(as transformers 5 saves CLIPTextModel); the engine needs the prefix: re-save the "
                "text encoder with 'text_model.' prepended to every tensor name",
            )
        raise _invalid(path, "text_encoder/model.safetensors is not a CLIP text encoder")
    family = {768: FAMILY_SD1, 1024: FAMILY_SD2}.get(token[-1])
    if family is None:
        raise UnsupportedModelError(f"{path}: a {token[-1]}-wide text encoder is not SD 1.x or 2.x")
    conv_in = unet.find("conv_in.weight")
    variant = UNET_VARIANTS.get(conv_in[1]) if conv_in is not None and len(conv_in) > 1 else None
    return ModelInfo(path, family, "diffusers", variant)


def detect(path: Path) -> ModelInfo:
    """Detect the family of a model file or diffusers folder from its headers.

    Raises
    ------
    ModelNotFoundError
        When nothing exists at ``path``.
    InvalidModelError
        When it is not a model or is truncated.
    UnsupportedModelError
        When it is a model of a family this version does not run.
    """
    path = Path(path)
    if not path.exists():
        raise ModelNotFoundError(f"no model file or folder at {path}")
    if path.is_dir():
        return _detect_diffusers(path)
    return _classify(path, read_tensor_table(path))


def check_lora_file(path: Path, field: str) -> None:
    """Refuse ``path`` unless it is a model file holding LoRA tensors.

    Raises
    ------
    InvalidParameterError
        Naming ``field``.
    """
    if not path.is_file():
        raise InvalidParameterError(field, f"no LoRA file at {str(path)!r}")
    try:
        names = read_tensor_table(path).shapes
    except SfumatoError as exc:
        raise InvalidParameterError(field, f"{path} is not a readable model file ({exc})") from None
    if not any(key in name for name in names for key in ("lora", "hada_", "lokr_")):
        raise InvalidParameterError(field, f"{path} holds no LoRA tensors (lora_down/lora_up, lora_A/lora_B, ...)")

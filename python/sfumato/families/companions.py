"""Companion files: the text encoders and VAE a model family loads beside its
diffusion model, which of them each family needs, and a header check of each
one, so that a missing or mismatched file is refused before any engine call.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sfumato.errors import InvalidParameterError, SfumatoError
from sfumato.families.detect import (
    FAMILY_ANIMA,
    FAMILY_CHROMA,
    FAMILY_ERNIE_IMAGE,
    FAMILY_FLUX1,
    FAMILY_FLUX2,
    FAMILY_NAMES,
    FAMILY_OVIS,
    FAMILY_QWEN_IMAGE,
    FAMILY_SD1,
    FAMILY_SD2,
    FAMILY_SD3,
    FAMILY_SDXL,
    FAMILY_Z_IMAGE,
    PIXEL_SPACE_VARIANTS,
    ModelInfo,
    TensorTable,
    read_tensor_table,
)

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class Role:
    """One kind of companion file."""

    name: str
    key: str
    """The ``model_config`` key that supplies it."""
    label: str
    """How messages name it."""


ROLES = {
    role.name: role
    for role in (
        Role("clip_l", "clip_l_model_src", "CLIP-L text encoder"),
        Role("clip_g", "clip_g_model_src", "CLIP-G text encoder"),
        Role("t5xxl", "t5xxl_model_src", "T5-XXL text encoder"),
        Role("llm", "llm_model_src", "Qwen3 text encoder"),
        Role("vae", "vae_model_src", "VAE"),
        Role("taesd", "taesd_src", "tiny autoencoder (TAESD)"),
        Role("control_net", "control_net_src", "ControlNet"),
    )
}

CLIP_WIDTHS = {"clip_l": 768, "clip_g": 1280}
"""Hidden width of each CLIP text encoder."""

VAE_LATENT_CHANNELS = {
    FAMILY_SD1: 4, FAMILY_SD2: 4, FAMILY_SDXL: 4, FAMILY_SD3: 16, FAMILY_FLUX1: 16, FAMILY_CHROMA: 16, FAMILY_OVIS: 16,
    FAMILY_Z_IMAGE: 16, FAMILY_ERNIE_IMAGE: 32, FAMILY_QWEN_IMAGE: 16, FAMILY_ANIMA: 16,
    FAMILY_FLUX2: 32,
}  # fmt: skip
"""Latent channels of the VAE each family decodes with."""

WAN_VAE_FAMILIES = (FAMILY_QWEN_IMAGE, FAMILY_ANIMA)
"""The families that decode with the Wan 2.1 VAE (a causal 3-D autoencoder, ``decoder.conv1``);
the others with a 2-D KL autoencoder (``decoder.conv_in``)."""

CONTROL_NET_WIDTHS = {FAMILY_SD1: 768, FAMILY_SD2: 1024, FAMILY_SDXL: 2048}
"""The families the engine runs ControlNets for (UNets), by the text width their cross-attention takes."""

FLUX2_TEXT_LAYERS = (9, 18, 27)
"""The LLM layers whose outputs FLUX.2 [klein] stacks into its text features."""
LLM_DEPTHS = {
    FAMILY_OVIS: (28, True, "Ovis 2.5's Qwen3 (2B)"), FAMILY_Z_IMAGE: (36, False, "Qwen3-4B"),
    FAMILY_ERNIE_IMAGE: (26, False, "Ministral 3B"), FAMILY_QWEN_IMAGE: (1, False, "Qwen2.5-VL 7B"),
    FAMILY_ANIMA: (28, True, "Qwen3-0.6B"),
}  # fmt: skip
"""The language model each family reads besides FLUX.2 [klein], as ``(layers, exactly, what)``:
Ovis-Image its last layer of Ovis 2.5's Qwen3 (the engine gives a Qwen3 its 16 heads only
at 28 layers), Z-Image the outputs of layer 35 (Qwen3-4B's next to last), ERNIE-Image those
of layer 25 (Ministral 3B's next to last), Qwen-Image the last layer of Qwen2.5-VL 7B's
language model, however deep (the engine reads the depth from the file), Anima the last layer
of Qwen3-0.6B (28 layers: as for Ovis-Image, the depth at which the engine gives a Qwen3 16
heads)."""


LLM_LABELS = {FAMILY_ERNIE_IMAGE: "Ministral 3B text encoder", FAMILY_QWEN_IMAGE: "Qwen2.5-VL text encoder"}
"""How messages name the language model of a family that reads another than Qwen3."""


def label(role: str, info: ModelInfo) -> str:
    """How messages name the companion ``role`` of the model ``info`` describes."""
    return LLM_LABELS.get(info.family, ROLES[role].label) if role == "llm" else ROLES[role].label


@dataclass(frozen=True)
class FamilyFiles:
    """Which companion roles a model needs and which it accepts."""

    required: tuple[str, ...]
    accepted: tuple[str, ...]


FAMILY_TEXT_ENCODERS = {
    FAMILY_SDXL: ("clip_l", "clip_g"),
    FAMILY_SD3: ("clip_l", "clip_g", "t5xxl"),
    FAMILY_FLUX1: ("clip_l", "t5xxl"),
    FAMILY_CHROMA: ("t5xxl",),
    FAMILY_OVIS: ("llm",),
    FAMILY_Z_IMAGE: ("llm",),
    FAMILY_ERNIE_IMAGE: ("llm",),
    FAMILY_QWEN_IMAGE: ("llm",),
    FAMILY_ANIMA: ("llm",),
    FAMILY_FLUX2: ("llm",),
}
"""The text encoders each family conditions on (SD 1.x / 2.x files always carry theirs)."""

T5XXL_WIDTH = 4096


def family_files(info: ModelInfo) -> FamilyFiles:
    """The companion roles of the model ``info`` describes: each text encoder
    of its family that the file does not carry, and a VAE unless it carries
    one; a VAE may always replace the file's own, and a tiny autoencoder may
    decode (and encode) in its place."""
    missing = tuple(role for role in FAMILY_TEXT_ENCODERS.get(info.family, ()) if role not in info.carries)
    if info.variant in PIXEL_SPACE_VARIANTS:  # no latents: nothing for a VAE to decode
        return FamilyFiles(required=missing, accepted=missing)
    required = missing if info.has_vae else (*missing, "vae")
    control = ("control_net",) if info.family in CONTROL_NET_WIDTHS else ()
    return FamilyFiles(required=required, accepted=(*missing, "vae", "taesd", *control))


def _suffix_shape(table: TensorTable, suffix: str) -> tuple[int, ...] | None:
    """The shape of the first tensor whose name ends with ``suffix`` (any prefix)."""
    for name, shape in table.shapes.items():
        if name == suffix or name.endswith(f".{suffix}"):
            return shape
    return None


def check_companion(path: Path, role: str, info: ModelInfo) -> None:
    """Refuse ``path`` unless its header fits ``role`` for the family of ``info``.

    Raises
    ------
    InvalidParameterError
        Naming the role's ``model_config`` key.
    """
    spec = ROLES[role]
    field = f"model_config.{spec.key}"
    family = FAMILY_NAMES[info.family]
    try:
        table = read_tensor_table(path)
    except SfumatoError as exc:
        raise InvalidParameterError(field, f"{path} is not a readable model file ({exc})") from None
    if role in CLIP_WIDTHS:
        token = _suffix_shape(table, "token_embedding.weight")
        if token is None:
            raise InvalidParameterError(field, f"{path} is not a CLIP text encoder; {family} needs its {spec.label}")
        if len(token) == 2 and token[1] != CLIP_WIDTHS[role]:  # (PyTorch zips list names only)
            other = next((ROLES[r].label for r, w in CLIP_WIDTHS.items() if w == token[1]), "another text encoder")
            raise InvalidParameterError(
                field,
                f"{path} is a {token[1]}-wide CLIP text encoder ({other}); {family} needs its "
                f"{spec.label} here, {CLIP_WIDTHS[role]} wide",
            )
    elif role == "llm":
        _check_llm(path, table, field, info)
    elif role == "t5xxl":
        shared = _suffix_shape(table, "shared.weight") or _suffix_shape(table, "token_embd.weight")
        blocks = any("encoder.block." in name or "enc.blk." in name for name in table.shapes)
        if shared is None or not blocks:
            raise InvalidParameterError(field, f"{path} is not a T5 encoder; {family} needs its {spec.label}")
        width = info.text_width or T5XXL_WIDTH
        if len(shared) == 2 and shared[1] != width:
            raise InvalidParameterError(field, f"{path} is a {shared[1]}-wide T5; {family} needs T5-XXL, {width} wide")
    elif role == "control_net":
        if _suffix_shape(table, "input_hint_block.0.weight") is None:
            raise InvalidParameterError(field, f"{path} is not a ControlNet (no input_hint_block)")
        if info.family not in CONTROL_NET_WIDTHS:
            runs = ", ".join(FAMILY_NAMES[f] for f in CONTROL_NET_WIDTHS)
            raise InvalidParameterError(field, f"the engine runs ControlNets with {runs}; this model is {family}")
        keys = _suffix_shape(table, "attn2.to_k.weight")
        cross = keys[1] if keys is not None and len(keys) == 2 else None
        if cross is not None and cross != CONTROL_NET_WIDTHS[info.family]:
            other = next((FAMILY_NAMES[f] for f, w in CONTROL_NET_WIDTHS.items() if w == cross), f"{cross}-wide text")
            raise InvalidParameterError(field, f"{path} is a ControlNet for {other}; this model is {family}")
    elif role in ("vae", "taesd"):
        _check_decoder(path, table, field, role, info)


DECODER_INPUTS = {"kl": "decoder.conv_in.weight", "wan": "decoder.conv1.weight", "taesd": "decoder.layers.0.weight"}
"""The first decoder layer of each kind of autoencoder: a 2-D KL VAE, the Wan 2.1 VAE, TAESD."""


def _check_decoder(path: Path, table: TensorTable, field: str, role: str, info: ModelInfo) -> None:
    """A VAE (or TAESD) of the kind the family of ``info`` decodes with, for latents of its channels."""
    label, family = ROLES[role].label, FAMILY_NAMES[info.family]
    kind = "taesd" if role == "taesd" else "wan" if info.family in WAN_VAE_FAMILIES else "kl"
    conv_in = _suffix_shape(table, DECODER_INPUTS[kind])
    if conv_in is None:
        other = "kl" if kind == "wan" else "wan"
        if kind != "taesd" and _suffix_shape(table, DECODER_INPUTS[other]) is not None:
            names = {"kl": "a 2-D VAE", "wan": "the Wan 2.1 VAE (3-D)"}
            raise InvalidParameterError(field, f"{path} is {names[other]}; {family} decodes with {names[kind]}")
        raise InvalidParameterError(field, f"{path} holds no {label} decoder ({DECODER_INPUTS[kind]})")
    wanted = VAE_LATENT_CHANNELS.get(info.family)
    if wanted is not None and len(conv_in) >= 4 and conv_in[1] != wanted:
        raise InvalidParameterError(
            field, f"{path} is a {label} of {conv_in[1]} latent channels; {family} decodes {wanted}-channel latents"
        )


HINT_TENSOR = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"


def split_unet_hint(folder: Path) -> Path:
    """A one-tensor GGUF that lets the engine load a UNet-only SDXL file.

    The engine picks the names it loads ``clip_l`` / ``clip_g`` under from the
    family of the files read before them (``model_path`` and the diffusion
    model), and a UNet alone has no family until a 768-wide token embedding is
    among them: without one, the text encoders land under names no UNet family
    reads and the load fails ("get sd version from file failed"). Given as
    ``model_path``, this file supplies a 1-row embedding under CLIP-L's own
    name; the CLIP-L file loaded next replaces it, since the engine keeps the
    last tensor of each name. Written once into ``folder``.
    """
    path = folder / "sdxl-split-hint.gguf"
    if not path.is_file():
        import gguf
        import numpy as np

        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f".{path.name}.{os.getpid()}.partial"
        writer = gguf.GGUFWriter(str(partial), arch="sdxl")
        writer.add_tensor(HINT_TENSOR, np.zeros((1, CLIP_WIDTHS["clip_l"]), np.float16))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        partial.replace(path)
    return path


def _check_llm(path: Path, table: TensorTable, field: str, info: ModelInfo) -> None:
    """A Qwen3-style LLM (llama.cpp's GGUF names or Hugging Face's) deep enough
    for the layers the family reads, and as wide as its text features need."""
    embed = _suffix_shape(table, "token_embd.weight") or _suffix_shape(table, "embed_tokens.weight")
    if embed is None:
        raise InvalidParameterError(field, f"{path} is not a language model (no token embedding)")
    indexes = (re.search(r"(?:^|\.)(?:blk|layers)\.(\d+)\.", name) for name in table.shapes)
    layers = 1 + max((int(m.group(1)) for m in indexes if m), default=-1)
    if info.family in LLM_DEPTHS:
        depth, exactly, what = LLM_DEPTHS[info.family]
        width = embed[1] if len(embed) == 2 else None
        if (layers != depth if exactly else layers < depth) or (width and info.text_width not in (None, width)):
            needs = f"{depth} layers, " if depth > 1 else ""
            raise InvalidParameterError(
                field,
                f"{path} is a {layers}-layer language model{f', {width} wide' if width else ''}; "
                f"{FAMILY_NAMES[info.family]} reads {what} ({needs}{info.text_width} wide)",
            )
        return
    deepest = FLUX2_TEXT_LAYERS[-1]
    if layers < deepest:
        raise InvalidParameterError(
            field, f"{path} has {layers} layers; FLUX.2 [klein] reads the outputs of layers {FLUX2_TEXT_LAYERS}"
        )
    if len(embed) == 2 and info.text_width is not None:
        stacked = embed[1] * len(FLUX2_TEXT_LAYERS)
        if stacked != info.text_width:
            raise InvalidParameterError(
                field,
                f"{path} is {embed[1]} wide ({len(FLUX2_TEXT_LAYERS)} layers give {stacked} features); "
                f"{info.path.name} takes {info.text_width} (a Qwen3 {info.text_width // len(FLUX2_TEXT_LAYERS)} wide: "
                "Qwen3-4B for klein 4B, Qwen3-8B for klein 9B)",
            )


OPEN_CLIP_PROJECTIONS = ("conditioner.embedders.1.model.text_projection", "cond_stage_model.1.model.text_projection")
"""Where an all-in-one SDXL checkpoint keeps CLIP-G's pooled-text projection in OpenCLIP's layout."""


def _tensor_values(path: Path, table: TensorTable, name: str) -> np.ndarray:
    """The values of tensor ``name`` of the safetensors or GGUF file ``path`` (whose table
    is ``table``), as float32 in PyTorch's axis order (a quantized GGUF tensor dequantized)."""
    import numpy as np

    if table.format == "gguf":
        import gguf

        reader = gguf.GGUFReader(str(path))
        [tensor] = [t for t in reader.tensors if t.name == name]
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        return np.asarray(values, np.float32).reshape(tuple(int(n) for n in reversed(tensor.shape.tolist())))
    from safetensors import safe_open

    with safe_open(str(path), "numpy") as opened:
        return np.asarray(opened.get_tensor(name), np.float32)


def sdxl_projection_hint(checkpoint: Path, folder: Path) -> Path | None:
    """A one-tensor file that corrects how the engine reads CLIP-G's pooled projection from
    an all-in-one SDXL checkpoint, or ``None`` for a checkpoint that needs none.

    OpenCLIP multiplies the pooled text by ``text_projection`` from the right, so the
    original checkpoints store the transpose of the matrix a ``Linear`` layer stores. The
    engine loads both layouts into one tensor that it uses as a ``Linear`` weight, so from
    an all-in-one checkpoint it projects with the transpose, and the size-and-text vector
    every step is conditioned on differs from the reference implementation's (found by the
    SDXL parity test). Given as ``clip_g_path``, this file holds the checkpoint's projection
    transposed, under CLIP-G's Hugging Face name: the engine keeps the last tensor of each
    name, so it replaces the checkpoint's. Named by its content, written once into ``folder``.
    A pickled checkpoint (``.ckpt``) keeps the engine's reading: sfumato reads no pickled
    tensor data.
    """
    table = read_tensor_table(checkpoint)
    name = next((n for n in OPEN_CLIP_PROJECTIONS if n in table.shapes), None)
    if name is None or table.format == "torch":
        return None
    import hashlib

    import numpy as np
    from safetensors.numpy import save_file

    weight = np.ascontiguousarray(_tensor_values(checkpoint, table, name).T)
    path = folder / f"sdxl-projection-{hashlib.blake2b(weight.tobytes(), digest_size=12).hexdigest()}.safetensors"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f".{path.name}.{os.getpid()}.partial"
        save_file({"text_projection.weight": weight}, str(partial))
        partial.replace(path)
    return path

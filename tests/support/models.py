"""Model files with random weights in the real layouts.

No weights can be downloaded where sfumato's tests run, so the tests and the
benchmarks make their own: every tensor has its published name and shape, and
its values are seeded random numbers scaled so that activations stay finite.
The engine loads and runs these files exactly as it would the real ones; the
pictures are noise, but every code path runs.

Writing a .pth (the format of ESRGAN releases) needs PyTorch; everything else
needs only numpy, ``gguf`` and ``safetensors``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt

from tests.support.layouts import (
    CHROMA,
    CHROMA_RADIANCE,
    FLUX1_DEPTH,
    FLUX1_DEV,
    FLUX1_FILL,
    FLUX2_KLEIN_4B,
    MINISTRAL_3B,
    OVIS_IMAGE,
    QWEN3_0_6B,
    QWEN25_VL_7B,
    SD1_TINY_UNET,
    SD1_UNET,
    SD2_UNET,
    SDXL_UNET,
    SSD_1B_UNET,
    VEGA_UNET,
    Qwen3Config,
    TensorSpec,
    anima_layout,
    clip_text_layout,
    controlnet_layout,
    ernie_image_layout,
    esrgan_layout,
    flux_layout,
    mmdit_layout,
    open_clip_text_layout,
    qwen3_layout,
    qwen_image_layout,
    t5xxl_layout,
    taesd_layout,
    unet_layout,
    vae_layout,
    wan_vae_layout,
    z_image_layout,
)

SD_VERSIONS = ("sd1", "sd1-tiny", "sd1-inpaint", "sd1-pix2pix", "sd2", "sdxl")

FLUX2_KLEIN_TEST = dataclasses.replace(FLUX2_KLEIN_4B, double_blocks=1, single_blocks=1)
"""FLUX.2 [klein] 4B at its real widths with one block of each kind."""
QWEN3_4B_TEST = Qwen3Config(layers=27)
"""Qwen3-4B at its real widths, as deep as FLUX.2 [klein] reads it: the engine
stacks the outputs of layers 9, 18 and 27 (of 36) into the text context."""


def sd_layout(version: str) -> list[TensorSpec]:
    """The whole single-file checkpoint of ``version`` (one of :data:`SD_VERSIONS`)."""
    if version == "sd1":
        return unet_layout(SD1_UNET) + vae_layout() + clip_text_layout()
    if version == "sd1-tiny":  # BK-SDM-Tiny: a third of SD 1.x's UNet, the same VAE and CLIP
        return unet_layout(SD1_TINY_UNET) + vae_layout() + clip_text_layout()
    if version == "sd1-inpaint":  # the UNet also takes the masked image's latent and the mask: 4 + 4 + 1 channels
        return unet_layout(dataclasses.replace(SD1_UNET, in_channels=9)) + vae_layout() + clip_text_layout()
    if version == "sd1-pix2pix":  # instruct-pix2pix: the UNet also takes the edited image's latent: 4 + 4 channels
        return unet_layout(dataclasses.replace(SD1_UNET, in_channels=8)) + vae_layout() + clip_text_layout()
    if version == "sd2":
        return unet_layout(SD2_UNET) + vae_layout() + open_clip_text_layout()
    if version == "sdxl":
        return (
            unet_layout(SDXL_UNET)
            + vae_layout()
            + clip_text_layout(prefix="conditioner.embedders.0.transformer.")
            + open_clip_text_layout(prefix="conditioner.embedders.1.model.", hidden=1280, layers=32)
        )
    raise ValueError(f"version must be one of {SD_VERSIONS}, got {version!r}")


SDXL_PARTS = ("unet", "clip_l", "clip_g", "vae")


SDXL_UNETS = {"unet": SDXL_UNET, "ssd-1b-unet": SSD_1B_UNET, "vega-unet": VEGA_UNET}
"""SDXL's UNet and its distilled versions the engine runs (SSD-1B, Segmind Vega), each alone."""


def sdxl_part_layout(part: str) -> list[TensorSpec]:
    """One file of SDXL's split layout, each under its own names without a
    checkpoint prefix: the UNet (as UNet-only GGUF releases store it), CLIP-L
    and CLIP-G (``CLIPTextModel`` / ``CLIPTextModelWithProjection``, as the
    ``clip_l`` / ``clip_g`` files of ComfyUI-style releases) and the VAE."""
    if part in SDXL_UNETS:
        return unet_layout(SDXL_UNETS[part], prefix="")
    if part == "clip_l":
        return clip_text_layout(prefix="")
    if part == "clip_g":
        return clip_text_layout(prefix="", hidden=1280, layers=32, projection=True)
    if part == "vae":
        return vae_layout(prefix="")
    raise ValueError(f"part must be one of {SDXL_PARTS}, got {part!r}")


def write_sdxl_part(path: Path, part: str, seed: int = 0, dtype: str = "f16", quant: str | None = None) -> Path:
    """Write one file of the SDXL split layout; the suffix picks the format
    (``quant`` as in :func:`write_gguf`, for ``.gguf`` only)."""
    return _write_by_suffix(Path(path), sdxl_part_layout(part), seed, dtype, "sdxl", quant)


OFFSET_STD = 0.1
"""The spread of drawn biases and norm scales (about 1) where :func:`random_tensors` draws them."""


def _values(spec: TensorSpec, seed: int, shape: tuple[int, ...], offsets: bool = False) -> npt.NDArray[np.float32]:
    digest = hashlib.blake2b(f"{seed}:{spec.name}".encode(), digest_size=8).digest()
    rng = np.random.default_rng(int.from_bytes(digest, "little"))
    if spec.is_norm_weight or spec.name.endswith(".gamma"):  # (the Wan VAE's RMS norms: gamma)
        if offsets:
            return 1 + rng.standard_normal(shape, dtype=np.float32) * np.float32(OFFSET_STD)
        return np.ones(shape, dtype=np.float32)
    if len(shape) == 1 or spec.name.endswith("bias"):
        if offsets:
            return rng.standard_normal(shape, dtype=np.float32) * np.float32(OFFSET_STD)
        return np.zeros(shape, dtype=np.float32)
    if "embedding" in spec.name:
        scale = 0.02
    else:
        fan_in = math.prod(shape[1:])
        scale = 1.0 / math.sqrt(fan_in)
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(scale * spec.gain)


@dataclasses.dataclass(frozen=True)
class Q4_0Blocks:  # noqa: N801 - ggml's type name
    """A matrix already in ggml's Q4_0 layout: per 32 values, an f16 scale ``d``
    and 16 bytes of 4-bit ``q`` (the value is ``d * (q - 8)``)."""

    raw: npt.NDArray[np.uint8]
    """``(rows, cols // 32 * 18)`` bytes, as gguf stores a Q4_0 tensor."""


Q4_0_STD = 4.61  # the standard deviation of q - 8 for q uniform in 0..15


def quantizable(shape: tuple[int, ...]) -> bool:
    """Whether a quantized release stores this tensor quantized: matrices of at least
    256 x 256 whose rows split into 32-value blocks (small tensors stay as they are)."""
    return len(shape) == 2 and min(shape) >= 256 and shape[-1] % 32 == 0


def _random_q4_0(spec: TensorSpec, seed: int) -> Q4_0Blocks:
    """Random Q4_0 blocks drawn directly (about 30 times faster than drawing floats and
    quantizing them), with the standard deviation :func:`_values` gives the matrix;
    each block's scale takes a random sign, so the values average zero."""
    rows, cols = spec.shape
    blocks = rows * cols // 32
    rng = np.random.default_rng(
        int.from_bytes(hashlib.blake2b(f"{seed}:{spec.name}:q4_0".encode(), digest_size=8).digest(), "little")
    )
    std = (0.02 if "embedding" in spec.name else 1.0 / math.sqrt(cols)) * spec.gain
    signs = rng.integers(0, 2, blocks, dtype=np.int8) * 2 - 1
    raw = np.empty((blocks, 18), np.uint8)
    raw[:, :2] = (signs * np.float32(std / Q4_0_STD)).astype(np.float16).view(np.uint8).reshape(blocks, 2)
    raw[:, 2:] = rng.integers(0, 256, (blocks, 16), dtype=np.uint8)
    return Q4_0Blocks(raw.reshape(rows, cols // 32 * 18))


def random_tensors(
    specs: Iterable[TensorSpec], seed: int = 0, dtype: str = "f16", diffusers: bool = False, offsets: bool = False
) -> Iterator[tuple[str, npt.NDArray[np.generic]]]:
    """Yield ``(name, array)`` for each spec, in the chosen naming and dtype. Biases are
    zero and norm scales one, unless ``offsets`` draws them too (as the parity tests'
    weights have them: a bias or norm mapped to the wrong place then shows)."""
    np_dtype = {"f16": np.float16, "f32": np.float32}[dtype]
    for spec in specs:
        if diffusers:
            if spec.diffusers is None:
                continue
            name, shape = spec.diffusers, spec.diffusers_shape or spec.shape
        else:
            name, shape = spec.name, spec.shape
        yield name, _values(spec, seed, shape, offsets).astype(np_dtype)


def random_q4_0_tensors(
    specs: Iterable[TensorSpec], seed: int = 0, dtype: str = "f16", offsets: bool = False
) -> Iterator[tuple[str, npt.NDArray[np.generic] | Q4_0Blocks]]:
    """As :func:`random_tensors` (``offsets`` too), with every :func:`quantizable` matrix as
    :class:`Q4_0Blocks`, as a Q4_0 release stores it."""
    for spec in specs:
        if quantizable(spec.shape):
            yield spec.name, _random_q4_0(spec, seed)
        else:
            yield from random_tensors([spec], seed, dtype, offsets=offsets)


def write_gguf(
    path: Path, tensors: Iterable[tuple[str, npt.NDArray[np.generic] | Q4_0Blocks]], arch: str, quant: str | None = None
) -> Path:
    """Write tensors to a GGUF file (names as given, shapes in numpy order).
    :class:`Q4_0Blocks` are stored as Q4_0; ``quant`` ("q8_0" or "q4_0") also
    quantizes every :func:`quantizable` float matrix, as quantized releases do."""
    import gguf
    from gguf import quants

    qtype = {None: None, "q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[quant]
    writer = gguf.GGUFWriter(str(path), arch=arch)
    for name, array in tensors:
        if isinstance(array, Q4_0Blocks):
            writer.add_tensor(name, array.raw, raw_dtype=gguf.GGMLQuantizationType.Q4_0)
        elif qtype is not None and quantizable(array.shape):
            writer.add_tensor(name, quants.quantize(array.astype(np.float32), qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_safetensors(path: Path, tensors: Iterable[tuple[str, npt.NDArray[np.generic]]]) -> Path:
    """Write tensors to a ``.safetensors`` file."""
    from safetensors.numpy import save_file

    save_file(dict(tensors), str(path))
    return path


def write_sd_checkpoint(
    path: Path, version: str = "sd1", seed: int = 0, dtype: str = "f16", quant: str | None = None
) -> Path:
    """Write an all-in-one SD 1.x / 2.x / XL checkpoint; the suffix picks the format
    (``.gguf`` or ``.safetensors``; ``quant`` as in :func:`write_gguf`, for ``.gguf`` only)."""
    return _write_by_suffix(Path(path), sd_layout(version), seed, dtype, version, quant)


def _write_by_suffix(
    path: Path, specs: list[TensorSpec], seed: int, dtype: str, arch: str, quant: str | None = None
) -> Path:
    if quant not in (None, "q4_0"):
        raise ValueError(f"quant must be None or 'q4_0', got {quant!r}")
    if path.suffix == ".gguf":
        tensors = random_q4_0_tensors(specs, seed, dtype) if quant else random_tensors(specs, seed, dtype)
        return write_gguf(path, tensors, arch=arch)
    if path.suffix == ".safetensors":
        if quant is not None:
            raise ValueError(f"quant={quant!r} needs a .gguf file; safetensors stores f16 or f32")
        return write_safetensors(path, random_tensors(specs, seed, dtype))
    raise ValueError(f"unsupported suffix {path.suffix!r}: use .gguf or .safetensors")


T5XXL_FILE = "t5xxl-q4_0-t5-init.gguf"
"""The cache's name of :func:`write_t5xxl`'s file (new when its query projection took T5's
own initialisation scale: the earlier file is :data:`RETIRED`)."""


def write_t5xxl(path: Path, seed: int = 0) -> Path:
    """T5-XXL's encoder (all 24 layers: the engine builds no fewer) as a q4_0 GGUF
    in ``T5EncoderModel``'s names, the text encoder of SD3 and FLUX.1."""
    return write_gguf(Path(path), random_q4_0_tensors(t5xxl_layout(), seed), arch="t5")


def write_sd3_checkpoint(path: Path, seed: int = 0) -> Path:
    """SD3 Medium as ``sd3_medium.safetensors`` holds it, the MMDiT (24 joint
    blocks, q4_0 here) and its 16-channel VAE, without the text encoders."""
    specs = mmdit_layout() + vae_layout(z_channels=16, quant_convs=False)
    return write_gguf(Path(path), random_q4_0_tensors(specs, seed), arch="sd3")


FLUX1_TRANSFORMERS = {
    "diffusion": FLUX1_DEV, "fill": FLUX1_FILL, "depth": FLUX1_DEPTH, "chroma": CHROMA,
    "chroma-radiance": CHROMA_RADIANCE, "ovis": OVIS_IMAGE,
}  # fmt: skip
"""The FLUX.1-architecture transformers the suite writes: [dev] (also Kontext's layout), Fill,
Depth/Canny, Chroma, Chroma1-Radiance and Ovis-Image, each at its real widths with one block
of each kind."""
OVIS_QWEN3 = Qwen3Config(layers=28, hidden=2048, heads=16, kv_heads=8, ffn=6144)
"""Ovis 2.5's Qwen3 (2B): Ovis-Image's text encoder, whole."""


def write_z_image(path: Path, seed: int = 0) -> Path:
    """Z-Image's whole transformer (6.6B parameters, the engine builds no fewer) as a q4_0
    GGUF, 3.7 GB."""
    return write_gguf(Path(path), random_q4_0_tensors(z_image_layout(), seed), arch="lumina2")


def write_qwen3_4b(path: Path, seed: int = 0) -> Path:
    """Qwen3-4B whole (36 layers: Z-Image reads the 35th) as a q4_0 GGUF in llama.cpp's names."""
    return write_gguf(Path(path), random_q4_0_tensors(qwen3_layout(Qwen3Config()), seed), arch="qwen3")


def write_ernie_image(path: Path, seed: int = 0) -> Path:
    """ERNIE-Image's transformer at its real widths with one layer, q4_0."""
    return write_gguf(Path(path), random_q4_0_tensors(ernie_image_layout(layers=1), seed), arch="ernie")


def write_ministral_3b(path: Path, seed: int = 0) -> Path:
    """Ministral 3B whole (26 layers: ERNIE-Image reads the 25th) as a q4_0 GGUF in llama.cpp's names."""
    return write_gguf(Path(path), random_q4_0_tensors(qwen3_layout(MINISTRAL_3B), seed), arch="llama")


def write_ovis_llm(path: Path, seed: int = 0) -> Path:
    """Ovis-Image's text encoder (:data:`OVIS_QWEN3`) as a q4_0 GGUF in llama.cpp's names."""
    return write_gguf(Path(path), random_q4_0_tensors(qwen3_layout(OVIS_QWEN3), seed), arch="qwen3")


def write_qwen_image(path: Path, seed: int = 0) -> Path:
    """Qwen-Image's transformer at its real widths with one block, q4_0."""
    return write_gguf(Path(path), random_q4_0_tensors(qwen_image_layout(blocks=1), seed), arch="qwen_image")


def write_qwen25_vl(path: Path, seed: int = 0) -> Path:
    """Qwen2.5-VL 7B's language model at its real widths with one layer (Qwen-Image reads the
    last, and the engine the depth from the file), q4_0, in llama.cpp's names."""
    config = dataclasses.replace(QWEN25_VL_7B, layers=1)
    return write_gguf(Path(path), random_q4_0_tensors(qwen3_layout(config), seed), arch="qwen2vl")


def write_wan_vae(path: Path, seed: int = 0) -> Path:
    """The Wan 2.1 VAE whole (Qwen-Image's), f16 safetensors."""
    return write_safetensors(Path(path), random_tensors(wan_vae_layout(), seed))


def write_anima(path: Path, seed: int = 0) -> Path:
    """Anima's DiT at its real widths with one block (its LLM adapter whole), q4_0."""
    return write_gguf(Path(path), random_q4_0_tensors(anima_layout(blocks=1), seed), arch="anima")


def write_qwen3_0_6b(path: Path, seed: int = 0) -> Path:
    """Qwen3-0.6B whole (28 layers), q4_0, in llama.cpp's names: Anima's text encoder."""
    return write_gguf(Path(path), random_q4_0_tensors(qwen3_layout(QWEN3_0_6B), seed), arch="qwen3")


FLUX1_PARTS = (*FLUX1_TRANSFORMERS, "vae")


def write_flux1_part(path: Path, part: str, seed: int = 0) -> Path:
    """One file of the FLUX.1 family: a transformer of :data:`FLUX1_TRANSFORMERS` (GGUF,
    q4_0, original names without a prefix) or the 16-channel VAE (``ae.safetensors``)."""
    if part in FLUX1_TRANSFORMERS:
        config = dataclasses.replace(FLUX1_TRANSFORMERS[part], double_blocks=1, single_blocks=1)
        return write_gguf(Path(path), random_q4_0_tensors(flux_layout(config), seed), arch="flux")
    if part == "vae":
        return write_safetensors(
            Path(path), random_tensors(vae_layout(prefix="", z_channels=16, quant_convs=False), seed)
        )
    raise ValueError(f"part must be one of {FLUX1_PARTS}, got {part!r}")


FLUX2_PARTS = ("diffusion", "llm", "vae")


def write_flux2_part(path: Path, part: str, seed: int = 0) -> Path:
    """One file of FLUX.2 [klein]'s split layout: the transformer (GGUF, q4_0),
    the Qwen3 text encoder (GGUF, q4_0) or the 32-channel VAE (safetensors in
    diffusers names, as ``vae/diffusion_pytorch_model.safetensors``)."""
    path = Path(path)
    if part == "diffusion":
        return write_gguf(path, random_q4_0_tensors(flux_layout(FLUX2_KLEIN_TEST), seed), arch="flux")
    if part == "llm":
        return write_gguf(path, random_q4_0_tensors(qwen3_layout(QWEN3_4B_TEST), seed), arch="qwen3")
    if part == "vae":
        return write_safetensors(path, random_tensors(vae_layout(prefix="", z_channels=32), seed, diffusers=True))
    raise ValueError(f"part must be one of {FLUX2_PARTS}, got {part!r}")


# SD 1.x UNet attention blocks (diffusers names) and their channel width.
_SD1_ATTENTIONS = (
    *((f"down_blocks_{b}_attentions_{a}", w) for b, w in ((0, 320), (1, 640), (2, 1280)) for a in (0, 1)),
    ("mid_block_attentions_0", 1280),
    *((f"up_blocks_{b}_attentions_{a}", w) for b, w in ((1, 1280), (2, 640), (3, 320)) for a in (0, 1, 2)),
)
_SD1_CONTEXT = 768
SD1_TINY_ATTENTIONS = (("down_blocks_0_attentions_0", 320),)
"""An attention block the tiny SD 1.x UNet has at the place SD 1.x's LoRA names say."""


def write_sd1_lora(
    path: Path,
    rank: int = 4,
    seed: int = 0,
    std: float = 0.05,
    attentions: tuple[tuple[str, int], ...] = _SD1_ATTENTIONS,
) -> Path:
    """Write a LoRA for the SD 1.x UNet in the kohya layout (``lora_unet_*``
    ``.lora_down`` / ``.lora_up`` / ``.alpha``) on every attention projection of
    ``attentions`` (block, width), with random weights, as a ``.safetensors`` file."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, npt.NDArray[np.generic]] = {}
    for block, width in attentions:
        for attn in ("attn1", "attn2"):
            for proj in ("to_q", "to_k", "to_v", "to_out_0"):
                fan_in = _SD1_CONTEXT if attn == "attn2" and proj in ("to_k", "to_v") else width
                name = f"lora_unet_{block}_transformer_blocks_0_{attn}_{proj}"
                tensors[f"{name}.lora_down.weight"] = (rng.standard_normal((rank, fan_in)) * std).astype(np.float16)
                tensors[f"{name}.lora_up.weight"] = (rng.standard_normal((width, rank)) * std).astype(np.float16)
                tensors[f"{name}.alpha"] = np.array(float(rank), dtype=np.float16)
    return write_safetensors(Path(path), tensors.items())


def write_diffusers_folder(path: Path, version: str = "sd1", seed: int = 0, dtype: str = "f16") -> Path:
    """Write a diffusers-layout folder (``unet/``, ``vae/``, ``text_encoder/``,
    ``model_index.json``) for SD 1.x or 2.x."""
    path = Path(path)
    if version == "sd1":
        unet, text = unet_layout(SD1_UNET, prefix=""), clip_text_layout(prefix="")
    elif version == "sd2":
        # Diffusers' SD 2.x text encoder keeps 23 of the 24 OpenCLIP layers.
        unet, text = unet_layout(SD2_UNET, prefix=""), clip_text_layout(prefix="", hidden=1024, layers=23)
    else:
        raise ValueError(f"version must be one of {SD_VERSIONS}, got {version!r}")
    for folder, specs, file_name in (
        ("unet", unet, "diffusion_pytorch_model.safetensors"),
        ("vae", vae_layout(prefix=""), "diffusion_pytorch_model.safetensors"),
        ("text_encoder", text, "model.safetensors"),
    ):
        (path / folder).mkdir(parents=True, exist_ok=True)
        write_safetensors(path / folder / file_name, random_tensors(specs, seed, dtype, diffusers=True))
    (path / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0"})
    )
    return path


def write_taesd(path: Path, seed: int = 0) -> Path:
    """TAESD, the tiny autoencoder of SD 1.x / 2.x latents, as ``taesd`` releases
    (diffusers' ``AutoencoderTiny``) store it: safetensors, f16."""
    return write_safetensors(Path(path), random_tensors(taesd_layout(), seed))


def write_controlnet(path: Path, version: str = "sd1", seed: int = 0) -> Path:
    """A ControlNet for the SD 1.x (or ``"sd2"``) UNet, as the v1.1 releases store it
    (``control_model.*``, safetensors, f16): 361M parameters for SD 1.x."""
    cfg = {"sd1": SD1_UNET, "sd2": SD2_UNET}[version]
    return write_safetensors(Path(path), random_tensors(controlnet_layout(cfg), seed))


def write_esrgan(path: Path, num_block: int = 23, scale: int = 4, seed: int = 0) -> Path:
    """Write an RRDBNet ESRGAN; ``.pth`` (needs PyTorch, stored under
    ``params_ema`` as the Real-ESRGAN releases do) or ``.safetensors``."""
    path = Path(path)
    tensors = dict(random_tensors(esrgan_layout(num_block=num_block, scale=scale), seed, "f32"))
    if path.suffix == ".safetensors":
        return write_safetensors(path, tensors.items())
    import torch

    state = {name: torch.from_numpy(np.ascontiguousarray(array)) for name, array in tensors.items()}
    torch.save({"params_ema": state}, str(path))
    return path


LAYOUT_VERSION = "v2"
"""Part of every cached file's name: a change of generator bumps it, and the files are written again."""


RETIRED = ("v2-t5xxl-q4_0.gguf",)
"""Cached files no generator writes any more: :func:`models_dir` removes them (2.5 GB)."""


def models_dir(default: Path) -> Path:
    """Where the test and benchmark models are kept: ``SFUMATO_TEST_MODELS``, else ``default``
    (without the :data:`RETIRED` files)."""
    path = Path(os.environ.get("SFUMATO_TEST_MODELS", default))
    path.mkdir(parents=True, exist_ok=True)
    for name in RETIRED:
        (path / name).unlink(missing_ok=True)
    return path


def cached(folder: Path, name: str, make: Callable[[Path], object]) -> Path:
    """``folder/<version>-name``, written by ``make`` the first time (through a
    partial name, so that an interrupted write is never taken for a model)."""
    target = folder / f"{LAYOUT_VERSION}-{name}"
    if not target.exists():
        partial = folder / f"partial-{LAYOUT_VERSION}-{name}"
        make(partial)
        partial.rename(target)
    return target

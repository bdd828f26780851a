"""Tensor names and shapes of the model layouts sfumato loads.

Each layout is a list of :class:`TensorSpec`, carrying the name in the original
checkpoint layout (the one single-file ``.safetensors`` and GGUF releases use)
and, where one exists, the name in the diffusers layout. Shapes are in PyTorch
order (out, in, kh, kw). These are facts about the published architectures;
the weights themselves are made up by :mod:`tests.support.models`.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a layout."""

    name: str
    diffusers: str | None
    shape: tuple[int, ...]
    diffusers_shape: tuple[int, ...] | None = None
    gain: float = 1.0
    """A factor on the standard deviation its random values are drawn with."""

    @property
    def is_norm_weight(self) -> bool:
        """Whether this is the scale of a normalisation layer (initialised to 1)."""
        # Matched on ".name" so that a key at the start of an unprefixed name
        # (the UNet's "out.0" in a diffusers folder) counts as well.
        dotted = f".{self.name}"
        return (
            len(self.shape) == 1
            and any(
                key in dotted
                for key in (
                    "norm",
                    "ln_",
                    "in_layers.0",
                    "out_layers.0",
                    "layer_norm",
                    ".out.0.",
                    ".cap_embedder.0.",
                    "_ln.",
                )
            )
            and self.name.endswith(("weight", "scale"))
        )


@dataclass(frozen=True)
class UNetConfig:
    """The hyper-parameters of an SD 1.x / 2.x / XL UNet."""

    context_dim: int
    linear_proj: bool  # SD2 and SDXL use Linear proj_in/proj_out, SD1 uses 1x1 convs
    in_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    attention_levels: tuple[int, ...] = (0, 1, 2)
    transformer_depth: tuple[int, ...] = (1, 1, 1, 1)
    """Transformer blocks per attention, by level; the middle block takes the last."""
    adm_in_channels: int | None = None
    """Width of SDXL's size-and-pooled-text conditioning (``label_emb``)."""
    num_res_blocks: int = 2
    tiny: bool = False
    """BK-SDM-Tiny's distilled UNet: one res block per level, no middle block, and the
    original checkpoint's block numbering with the removed blocks' indices left empty."""
    distilled: str | None = None
    """``"ssd-1b"`` or ``"vega"``: SDXL with the middle block's attention and second res
    block removed and fewer transformer blocks (:func:`_transformer_depth`)."""


def _transformer_depth(cfg: UNetConfig, side: str, level: int, j: int) -> int:
    """Transformer blocks of the attention at ``level``, res block ``j``, on the ``input`` or
    ``output`` side: the config's, but for SSD-1B's, which keeps 4 of 10 in the input
    blocks and the first two output blocks of the deepest level, and 1 of 2 in the last
    two output blocks of the middle level."""
    if cfg.distilled == "ssd-1b":
        if level == 2 and (side == "input" or j in (0, 1)):
            return 4
        if side == "output" and level == 1 and j in (1, 2):
            return 1
    return cfg.transformer_depth[level]


SD1_UNET = UNetConfig(context_dim=768, linear_proj=False)
SD1_TINY_UNET = UNetConfig(context_dim=768, linear_proj=False, channel_mult=(1, 2, 4), num_res_blocks=1, tiny=True)
SD2_UNET = UNetConfig(context_dim=1024, linear_proj=True)
SDXL_UNET = UNetConfig(
    context_dim=2048, linear_proj=True, channel_mult=(1, 2, 4), attention_levels=(1, 2),
    transformer_depth=(1, 2, 10), adm_in_channels=2816,
)  # fmt: skip
SSD_1B_UNET = dataclasses.replace(SDXL_UNET, distilled="ssd-1b")
VEGA_UNET = dataclasses.replace(SDXL_UNET, transformer_depth=(1, 1, 2), distilled="vega")


class _Layout:
    def __init__(self) -> None:
        self.specs: list[TensorSpec] = []

    def add(self, name: str, diffusers: str | None, *shape: int, gain: float = 1.0) -> None:
        self.specs.append(TensorSpec(name, diffusers, tuple(shape), gain=gain))

    def linear(
        self, name: str, diffusers: str | None, out: int, inp: int, bias: bool = True, gain: float = 1.0
    ) -> None:
        self.add(f"{name}.weight", diffusers and f"{diffusers}.weight", out, inp, gain=gain)
        if bias:
            self.add(f"{name}.bias", diffusers and f"{diffusers}.bias", out)

    def conv(self, name: str, diffusers: str | None, out: int, inp: int, k: int = 3) -> None:
        self.add(f"{name}.weight", diffusers and f"{diffusers}.weight", out, inp, k, k)
        self.add(f"{name}.bias", diffusers and f"{diffusers}.bias", out)

    def norm(self, name: str, diffusers: str | None, ch: int) -> None:
        self.add(f"{name}.weight", diffusers and f"{diffusers}.weight", ch)
        self.add(f"{name}.bias", diffusers and f"{diffusers}.bias", ch)


def _unet_resblock(lay: _Layout, name: str, diff: str, inp: int, out: int, emb: int) -> None:
    lay.norm(f"{name}.in_layers.0", f"{diff}.norm1", inp)
    lay.conv(f"{name}.in_layers.2", f"{diff}.conv1", out, inp)
    lay.linear(f"{name}.emb_layers.1", f"{diff}.time_emb_proj", out, emb)
    lay.norm(f"{name}.out_layers.0", f"{diff}.norm2", out)
    lay.conv(f"{name}.out_layers.3", f"{diff}.conv2", out, out)
    if inp != out:
        lay.conv(f"{name}.skip_connection", f"{diff}.conv_shortcut", out, inp, k=1)


def _unet_transformer(lay: _Layout, name: str, diff: str, ch: int, cfg: UNetConfig, depth: int) -> None:
    lay.norm(f"{name}.norm", f"{diff}.norm", ch)
    if cfg.linear_proj:
        lay.linear(f"{name}.proj_in", f"{diff}.proj_in", ch, ch)
    else:
        lay.conv(f"{name}.proj_in", f"{diff}.proj_in", ch, ch, k=1)
    for d in range(depth):
        block, dblock = f"{name}.transformer_blocks.{d}", f"{diff}.transformer_blocks.{d}"
        for attn, kv_dim in (("attn1", ch), ("attn2", cfg.context_dim)):
            lay.linear(f"{block}.{attn}.to_q", f"{dblock}.{attn}.to_q", ch, ch, bias=False)
            lay.linear(f"{block}.{attn}.to_k", f"{dblock}.{attn}.to_k", ch, kv_dim, bias=False)
            lay.linear(f"{block}.{attn}.to_v", f"{dblock}.{attn}.to_v", ch, kv_dim, bias=False)
            lay.linear(f"{block}.{attn}.to_out.0", f"{dblock}.{attn}.to_out.0", ch, ch)
        lay.linear(f"{block}.ff.net.0.proj", f"{dblock}.ff.net.0.proj", ch * 8, ch)
        lay.linear(f"{block}.ff.net.2", f"{dblock}.ff.net.2", ch, ch * 4)
        for i in (1, 2, 3):
            lay.norm(f"{block}.norm{i}", f"{dblock}.norm{i}", ch)
    if cfg.linear_proj:
        lay.linear(f"{name}.proj_out", f"{diff}.proj_out", ch, ch)
    else:
        lay.conv(f"{name}.proj_out", f"{diff}.proj_out", ch, ch, k=1)


def unet_layout(cfg: UNetConfig, prefix: str = "model.diffusion_model.") -> list[TensorSpec]:
    """The SD 1.x / 2.x / XL UNet (``model.diffusion_model.*``; diffusers ``unet/``)."""
    lay = _Layout()
    mc = cfg.model_channels
    emb = mc * 4
    p = prefix
    lay.linear(f"{p}time_embed.0", "time_embedding.linear_1", emb, mc)
    lay.linear(f"{p}time_embed.2", "time_embedding.linear_2", emb, emb)
    if cfg.adm_in_channels is not None:
        lay.linear(f"{p}label_emb.0.0", "add_embedding.linear_1", emb, cfg.adm_in_channels)
        lay.linear(f"{p}label_emb.0.2", "add_embedding.linear_2", emb, emb)
    lay.conv(f"{p}input_blocks.0.0", "conv_in", mc, cfg.in_channels)
    depth = cfg.transformer_depth
    skips = [mc]
    ch = mc
    block = 1
    for level, mult in enumerate(cfg.channel_mult):
        out = mc * mult
        for j in range(cfg.num_res_blocks):
            _unet_resblock(lay, f"{p}input_blocks.{block}.0", f"down_blocks.{level}.resnets.{j}", ch, out, emb)
            ch = out
            if level in cfg.attention_levels:
                _unet_transformer(
                    lay,
                    f"{p}input_blocks.{block}.1",
                    f"down_blocks.{level}.attentions.{j}",
                    ch,
                    cfg,
                    _transformer_depth(cfg, "input", level, j),
                )
            skips.append(ch)
            block += 2 if cfg.tiny else 1
        if level != len(cfg.channel_mult) - 1:
            lay.conv(f"{p}input_blocks.{block}.0.op", f"down_blocks.{level}.downsamplers.0.conv", ch, ch)
            skips.append(ch)
            block += 1
    if not cfg.tiny:
        _unet_resblock(lay, f"{p}middle_block.0", "mid_block.resnets.0", ch, ch, emb)
    if not cfg.tiny and cfg.distilled is None:
        last = depth[len(cfg.channel_mult) - 1]
        _unet_transformer(lay, f"{p}middle_block.1", "mid_block.attentions.0", ch, cfg, last)
        _unet_resblock(lay, f"{p}middle_block.2", "mid_block.resnets.1", ch, ch, emb)
    block = 0
    levels = len(cfg.channel_mult)
    for up, level in enumerate(reversed(range(levels))):
        out = mc * cfg.channel_mult[level]
        for j in range(cfg.num_res_blocks + 1):
            skip = skips.pop()
            name = f"{p}output_blocks.{block}"
            _unet_resblock(lay, f"{name}.0", f"up_blocks.{up}.resnets.{j}", ch + skip, out, emb)
            ch = out
            index = 1
            if level in cfg.attention_levels:
                td = _transformer_depth(cfg, "output", level, j)
                _unet_transformer(lay, f"{name}.1", f"up_blocks.{up}.attentions.{j}", ch, cfg, td)
                index = 2
            if level != 0 and j == cfg.num_res_blocks:
                if cfg.tiny:  # the upsampler sits in a block of its own, at index 1 in the first one
                    block += 1
                    name, index = f"{p}output_blocks.{block}", 1 if block == 2 else index
                lay.conv(f"{name}.{index}.conv", f"up_blocks.{up}.upsamplers.0.conv", ch, ch)
            block += 1
    lay.norm(f"{p}out.0", "conv_norm_out", ch)
    lay.conv(f"{p}out.2", "conv_out", 4, ch)
    return lay.specs


def controlnet_layout(cfg: UNetConfig = SD1_UNET, prefix: str = "control_model.") -> list[TensorSpec]:
    """A ControlNet for the UNet of ``cfg`` (``control_model.*``, as the ``.pth`` and
    safetensors releases store it): the UNet's encoder and middle block, the hint
    encoder ``input_hint_block`` (3 -> 16 -> 32 -> 96 -> 256 -> model channels, three
    stride-2 convolutions), a 1x1 ``zero_convs`` after every input block and
    ``middle_block_out``."""
    encoder = (f"{prefix}time_embed", f"{prefix}label_emb", f"{prefix}input_blocks", f"{prefix}middle_block")
    lay = _Layout()
    lay.specs = [TensorSpec(s.name, None, s.shape) for s in unet_layout(cfg, prefix) if s.name.startswith(encoder)]
    shapes = {s.name: s.shape for s in lay.specs}
    hint = ((16, 3), (16, 16), (32, 16), (32, 32), (96, 32), (96, 96), (256, 96), (cfg.model_channels, 256))
    for i, (out, inp) in enumerate(hint):
        lay.conv(f"{prefix}input_hint_block.{2 * i}", None, out, inp)
    block = 0
    while any(name.startswith(f"{prefix}input_blocks.{block}.") for name in shapes):
        # An input block's output: its res block's last convolution, its downsampler, or the first convolution.
        parts = (f"{prefix}input_blocks.{block}.0.{p}" for p in ("out_layers.3.weight", "op.weight", "weight"))
        out = next(shapes[name][0] for name in parts if name in shapes)
        lay.conv(f"{prefix}zero_convs.{block}.0", None, out, out, k=1)
        block += 1
    middle = shapes[f"{prefix}middle_block.2.out_layers.3.weight"][0]
    lay.conv(f"{prefix}middle_block_out.0", None, middle, middle, k=1)
    return lay.specs


def _vae_resblock(lay: _Layout, name: str, diff: str, inp: int, out: int) -> None:
    lay.norm(f"{name}.norm1", f"{diff}.norm1", inp)
    lay.conv(f"{name}.conv1", f"{diff}.conv1", out, inp)
    lay.norm(f"{name}.norm2", f"{diff}.norm2", out)
    lay.conv(f"{name}.conv2", f"{diff}.conv2", out, out)
    if inp != out:
        lay.conv(f"{name}.nin_shortcut", f"{diff}.conv_shortcut", out, inp, k=1)


def _vae_mid(lay: _Layout, name: str, diff: str, ch: int) -> None:
    _vae_resblock(lay, f"{name}.block_1", f"{diff}.resnets.0", ch, ch)
    lay.norm(f"{name}.attn_1.norm", f"{diff}.attentions.0.group_norm", ch)
    for ldm, dname in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
        # The original layout stores these as 1x1 convolutions, diffusers as Linear.
        lay.specs.append(
            TensorSpec(f"{name}.attn_1.{ldm}.weight", f"{diff}.attentions.0.{dname}.weight", (ch, ch, 1, 1), (ch, ch))
        )
        lay.add(f"{name}.attn_1.{ldm}.bias", f"{diff}.attentions.0.{dname}.bias", ch)
    _vae_resblock(lay, f"{name}.block_2", f"{diff}.resnets.1", ch, ch)


def vae_layout(prefix: str = "first_stage_model.", z_channels: int = 4, quant_convs: bool = True) -> list[TensorSpec]:
    """The KL autoencoder of SD 1.x / 2.x / XL (``first_stage_model.*``; diffusers
    ``vae/``); SD3 and FLUX.1 use it with 16 latent channels and no quant convs,
    FLUX.2 with 32 and both."""
    lay = _Layout()
    p = prefix
    base, mults, blocks = 128, (1, 2, 4, 4), 2
    lay.conv(f"{p}encoder.conv_in", "encoder.conv_in", base, 3)
    ch = base
    for i, mult in enumerate(mults):
        out = base * mult
        for j in range(blocks):
            _vae_resblock(lay, f"{p}encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", ch, out)
            ch = out
        if i != len(mults) - 1:
            lay.conv(f"{p}encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv", ch, ch)
    _vae_mid(lay, f"{p}encoder.mid", "encoder.mid_block", ch)
    lay.norm(f"{p}encoder.norm_out", "encoder.conv_norm_out", ch)
    lay.conv(f"{p}encoder.conv_out", "encoder.conv_out", 2 * z_channels, ch)
    if quant_convs:
        lay.conv(f"{p}quant_conv", "quant_conv", 2 * z_channels, 2 * z_channels, k=1)
        lay.conv(f"{p}post_quant_conv", "post_quant_conv", z_channels, z_channels, k=1)
    ch = base * mults[-1]
    lay.conv(f"{p}decoder.conv_in", "decoder.conv_in", ch, z_channels)
    _vae_mid(lay, f"{p}decoder.mid", "decoder.mid_block", ch)
    for i in reversed(range(len(mults))):
        up = len(mults) - 1 - i
        out = base * mults[i]
        for j in range(blocks + 1):
            _vae_resblock(lay, f"{p}decoder.up.{i}.block.{j}", f"decoder.up_blocks.{up}.resnets.{j}", ch, out)
            ch = out
        if i != 0:
            lay.conv(f"{p}decoder.up.{i}.upsample.conv", f"decoder.up_blocks.{up}.upsamplers.0.conv", ch, ch)
    lay.norm(f"{p}decoder.norm_out", "decoder.conv_norm_out", ch)
    lay.conv(f"{p}decoder.conv_out", "decoder.conv_out", 3, ch)
    return lay.specs


def clip_text_layout(
    prefix: str = "cond_stage_model.transformer.",
    hidden: int = 768,
    layers: int = 12,
    vocab: int = 49408,
    projection: bool = False,
) -> list[TensorSpec]:
    """A CLIP text encoder in the Hugging Face layout (SD 1.x; diffusers ``text_encoder/``;
    with ``projection``, ``CLIPTextModelWithProjection`` as SDXL's CLIP-G file stores it)."""
    lay = _Layout()
    t = f"{prefix}text_model"
    lay.add(f"{t}.embeddings.token_embedding.weight", "text_model.embeddings.token_embedding.weight", vocab, hidden)
    lay.add(f"{t}.embeddings.position_embedding.weight", "text_model.embeddings.position_embedding.weight", 77, hidden)
    for i in range(layers):
        name, diff = f"{t}.encoder.layers.{i}", f"text_model.encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            lay.linear(f"{name}.self_attn.{proj}", f"{diff}.self_attn.{proj}", hidden, hidden)
        lay.norm(f"{name}.layer_norm1", f"{diff}.layer_norm1", hidden)
        lay.linear(f"{name}.mlp.fc1", f"{diff}.mlp.fc1", hidden * 4, hidden)
        lay.linear(f"{name}.mlp.fc2", f"{diff}.mlp.fc2", hidden, hidden * 4)
        lay.norm(f"{name}.layer_norm2", f"{diff}.layer_norm2", hidden)
    lay.norm(f"{t}.final_layer_norm", "text_model.final_layer_norm", hidden)
    if projection:
        lay.add(f"{prefix}text_projection.weight", "text_projection.weight", hidden, hidden)
    return lay.specs


def open_clip_text_layout(
    prefix: str = "cond_stage_model.model.", hidden: int = 1024, layers: int = 24, vocab: int = 49408
) -> list[TensorSpec]:
    """The OpenCLIP text tower as checkpoints store it: ViT-H/14 in SD 2.x (the
    defaults), ViT-bigG/14 in SDXL (``conditioner.embedders.1.model.``, 1280 wide, 32 layers)."""
    lay = _Layout()
    lay.add(f"{prefix}token_embedding.weight", None, vocab, hidden)
    lay.add(f"{prefix}positional_embedding", None, 77, hidden)
    for i in range(layers):
        name = f"{prefix}transformer.resblocks.{i}"
        lay.add(f"{name}.attn.in_proj_weight", None, 3 * hidden, hidden)
        lay.add(f"{name}.attn.in_proj_bias", None, 3 * hidden)
        lay.linear(f"{name}.attn.out_proj", None, hidden, hidden)
        lay.norm(f"{name}.ln_1", None, hidden)
        lay.linear(f"{name}.mlp.c_fc", None, hidden * 4, hidden)
        lay.linear(f"{name}.mlp.c_proj", None, hidden, hidden * 4)
        lay.norm(f"{name}.ln_2", None, hidden)
    lay.norm(f"{prefix}ln_final", None, hidden)
    lay.add(f"{prefix}text_projection", None, hidden, hidden)
    return lay.specs


def taesd_layout(z_channels: int = 4, encoder: bool = True, width: int = 64) -> list[TensorSpec]:
    """The tiny autoencoder TAESD (``AutoencoderTiny``'s ``decoder.layers.*`` and
    ``encoder.layers.*``): 3x3 convolutions ``width`` channels wide, three blocks
    per scale, numbered as ``nn.Sequential`` numbers them (activations and
    upsamplers hold no weights but keep their indices)."""
    lay = _Layout()

    def block(name: str) -> None:
        for conv in (0, 2, 4):
            lay.conv(f"{name}.conv.{conv}", f"{name}.conv.{conv}", width, width)

    def plain(name: str, out: int, inp: int) -> None:  # a convolution without bias
        lay.add(f"{name}.weight", f"{name}.weight", out, inp, 3, 3)

    d = "decoder.layers"
    lay.conv(f"{d}.0", f"{d}.0", width, z_channels)
    index = 2  # 1 is a ReLU
    for _ in range(3):
        for _ in range(3):
            block(f"{d}.{index}")
            index += 1
        plain(f"{d}.{index + 1}", width, width)  # after an Upsample
        index += 2
    block(f"{d}.{index}")
    lay.conv(f"{d}.{index + 1}", f"{d}.{index + 1}", 3, width)
    if encoder:
        e = "encoder.layers"
        lay.conv(f"{e}.0", f"{e}.0", width, 3)
        block(f"{e}.1")
        index = 2
        for _ in range(3):
            plain(f"{e}.{index}", width, width)  # stride 2
            for i in range(1, 4):
                block(f"{e}.{index + i}")
            index += 4
        lay.conv(f"{e}.{index}", f"{e}.{index}", z_channels, width)
    return lay.specs


def esrgan_layout(num_block: int = 23, num_feat: int = 64, num_grow: int = 32, scale: int = 4) -> list[TensorSpec]:
    """RRDBNet as the Real-ESRGAN releases store it (``RealESRGAN_x4plus.pth``: 23
    blocks; ``RealESRGAN_x4plus_anime_6B.pth``: 6 blocks)."""
    lay = _Layout()
    lay.conv("conv_first", None, num_feat, 3)
    for b in range(num_block):
        for r in (1, 2, 3):
            for c in range(1, 6):
                inp = num_feat + (c - 1) * num_grow
                out = num_feat if c == 5 else num_grow
                lay.conv(f"body.{b}.rdb{r}.conv{c}", None, out, inp)
    lay.conv("conv_body", None, num_feat, num_feat)
    lay.conv("conv_up1", None, num_feat, num_feat)
    if scale == 4:
        lay.conv("conv_up2", None, num_feat, num_feat)
    lay.conv("conv_hr", None, num_feat, num_feat)
    lay.conv("conv_last", None, 3, num_feat)
    return lay.specs


@dataclass(frozen=True)
class FluxConfig:
    """The hyper-parameters of a FLUX transformer that its file carries (the
    engine reads widths and block counts from the tensors). The defaults are
    FLUX.1 [dev]: 3072 wide, 128-wide heads, 19 double and 38 single blocks,
    T5-XXL text (4096) and a pooled CLIP-L vector (768), distilled guidance."""

    hidden: int = 3072
    head_dim: int = 128
    double_blocks: int = 19
    single_blocks: int = 38
    context_dim: int = 4096
    in_channels: int = 64  # 16 latent channels, patchified 2x2
    vec_in_dim: int = 768  # 0: no pooled vector (FLUX.2)
    mlp_ratio: int = 4
    guidance: bool = True
    flux2: bool = False
    """FLUX.2: no biases, modulations shared by all blocks, SiLU-gated MLPs."""
    out_channels: int = 0
    """0: as many as ``in_channels`` (FLUX.1 Fill and Depth/Canny take more than they give)."""
    chroma: bool = False
    """Chroma: no per-block modulations and no time, vector or guidance embedders; one
    distilled network computes every modulation."""
    ovis: bool = False
    """Ovis-Image: gated (gate, up, down) MLPs in the double blocks, an RMS norm over the text."""
    radiance: bool = False
    """Chroma1-Radiance (with ``chroma``): pixels in 16x16 patches by a convolution, and out
    through a small per-pixel network (:data:`RADIANCE_NERF`) instead of the final layer."""


FLUX1_DEV = FluxConfig()
FLUX1_SCHNELL = FluxConfig(guidance=False)
FLUX1_FILL = FluxConfig(in_channels=384, out_channels=64)
FLUX1_DEPTH = FluxConfig(in_channels=128, out_channels=64)
CHROMA = FluxConfig(guidance=False, vec_in_dim=0, chroma=True)
"""Chroma1-HD: FLUX.1 [schnell]'s transformer (19 double, 38 single blocks), pruned."""
OVIS_IMAGE = FluxConfig(context_dim=2048, vec_in_dim=0, guidance=False, ovis=True)
"""Ovis-Image's MMDiT as the engine builds it: FLUX.1's widths, text from Ovis 2.5's Qwen3 (2048)."""
CHROMA_RADIANCE = dataclasses.replace(CHROMA, in_channels=3, radiance=True)
RADIANCE_NERF = {"hidden": 64, "mlp_ratio": 4, "depth": 4, "max_freqs": 8, "patch": 16}
"""Chroma1-Radiance's per-pixel network and patch as the engine builds them."""
CHROMA_APPROXIMATOR = (5120, 5)
"""The width and depth of Chroma's modulation network (the engine fixes both)."""
FLUX2_KLEIN_4B = FluxConfig(
    double_blocks=5, single_blocks=20, context_dim=3 * 2560, in_channels=128, vec_in_dim=0, mlp_ratio=3,
    guidance=False, flux2=True,
)  # fmt: skip
"""FLUX.2 [klein] 4B: text from three stacked Qwen3-4B layers (3 x 2560)."""


def flux_layout(cfg: FluxConfig, prefix: str = "") -> list[TensorSpec]:
    """A FLUX.1 or FLUX.2 transformer in the original (BFL) names, which GGUF
    releases keep."""
    lay = _Layout()
    p, h, bias = prefix, cfg.hidden, not cfg.flux2
    mlp = h * cfg.mlp_ratio
    gate = 2 if cfg.flux2 or cfg.ovis else 1  # the single blocks' gated MLPs take two halves
    if cfg.radiance:
        patch = RADIANCE_NERF["patch"]
        lay.add(f"{p}img_in_patch.weight", None, h, cfg.in_channels, patch, patch)
        lay.add(f"{p}img_in_patch.bias", None, h)
    else:
        lay.linear(f"{p}img_in", None, h, cfg.in_channels, bias=bias)
    lay.linear(f"{p}txt_in", None, h, cfg.context_dim, bias=bias)
    if cfg.ovis:
        lay.add(f"{p}txt_norm.scale", None, cfg.context_dim)
    embedders = {"time_in": 256, "vector_in": cfg.vec_in_dim, "guidance_in": 256 if cfg.guidance else 0}
    for embedder, width in embedders.items():
        if width and not cfg.chroma:
            lay.linear(f"{p}{embedder}.in_layer", None, h, width, bias=bias)
            lay.linear(f"{p}{embedder}.out_layer", None, h, h, bias=bias)
    if cfg.chroma:
        inner, depth = CHROMA_APPROXIMATOR
        lay.linear(f"{p}distilled_guidance_layer.in_proj", None, inner, 64)
        for i in range(depth):
            lay.add(f"{p}distilled_guidance_layer.norms.{i}.scale", None, inner)
            lay.linear(f"{p}distilled_guidance_layer.layers.{i}.in_layer", None, inner, inner)
            lay.linear(f"{p}distilled_guidance_layer.layers.{i}.out_layer", None, inner, inner)
        lay.linear(f"{p}distilled_guidance_layer.out_proj", None, h, inner)
    modulated = not cfg.flux2 and not cfg.chroma
    for i in range(cfg.double_blocks):
        for stream in ("img", "txt"):
            block = f"{p}double_blocks.{i}.{stream}"
            if modulated:
                lay.linear(f"{block}_mod.lin", None, 6 * h, h)
            lay.linear(f"{block}_attn.qkv", None, 3 * h, h, bias=bias)
            lay.add(f"{block}_attn.norm.query_norm.scale", None, cfg.head_dim)
            lay.add(f"{block}_attn.norm.key_norm.scale", None, cfg.head_dim)
            lay.linear(f"{block}_attn.proj", None, h, h, bias=bias)
            if cfg.ovis:
                lay.linear(f"{block}_mlp.gate_proj", None, mlp, h, bias=bias)
                lay.linear(f"{block}_mlp.up_proj", None, mlp, h, bias=bias)
                lay.linear(f"{block}_mlp.down_proj", None, h, mlp, bias=bias)
            else:
                lay.linear(f"{block}_mlp.0", None, gate * mlp, h, bias=bias)
                lay.linear(f"{block}_mlp.2", None, h, mlp, bias=bias)
    for i in range(cfg.single_blocks):
        block = f"{p}single_blocks.{i}"
        lay.linear(f"{block}.linear1", None, 3 * h + gate * mlp, h, bias=bias)
        lay.linear(f"{block}.linear2", None, h, h + mlp, bias=bias)
        lay.add(f"{block}.norm.query_norm.scale", None, cfg.head_dim)
        lay.add(f"{block}.norm.key_norm.scale", None, cfg.head_dim)
        if modulated:
            lay.linear(f"{block}.modulation.lin", None, 3 * h, h)
    if cfg.flux2:
        lay.linear(f"{p}double_stream_modulation_img.lin", None, 6 * h, h, bias=False)
        lay.linear(f"{p}double_stream_modulation_txt.lin", None, 6 * h, h, bias=False)
        lay.linear(f"{p}single_stream_modulation.lin", None, 3 * h, h, bias=False)
    if cfg.radiance:
        nerf = RADIANCE_NERF
        x = nerf["hidden"]
        lay.linear(f"{p}nerf_image_embedder.embedder.0", None, x, cfg.in_channels + nerf["max_freqs"] ** 2)
        for i in range(nerf["depth"]):
            lay.linear(f"{p}nerf_blocks.{i}.param_generator", None, 3 * x * x * nerf["mlp_ratio"], h)
            lay.add(f"{p}nerf_blocks.{i}.norm.scale", None, x)
        lay.add(f"{p}nerf_final_layer_conv.norm.scale", None, x)
        lay.conv(f"{p}nerf_final_layer_conv.conv", None, cfg.in_channels, x)
        return lay.specs
    lay.linear(f"{p}final_layer.linear", None, cfg.out_channels or cfg.in_channels, h, bias=bias)
    if not cfg.chroma:
        lay.linear(f"{p}final_layer.adaLN_modulation.1", None, 2 * h, h, bias=bias)
    return lay.specs


SD3_MEDIUM_DEPTH = 24
"""The engine builds an MMDiT of at least 24 joint blocks, 64 x depth wide: SD3 Medium."""


def mmdit_layout(depth: int = SD3_MEDIUM_DEPTH, prefix: str = "model.diffusion_model.") -> list[TensorSpec]:
    """The SD3 MMDiT (joint blocks, no MMDiT-X self-attention, no q/k norms:
    SD3 Medium) in the original names."""
    lay = _Layout()
    p, h = prefix, 64 * depth
    lay.add(f"{p}pos_embed", None, 1, 192 * 192, h)
    lay.conv(f"{p}x_embedder.proj", None, h, 16, k=2)
    lay.linear(f"{p}t_embedder.mlp.0", None, h, 256)
    lay.linear(f"{p}t_embedder.mlp.2", None, h, h)
    lay.linear(f"{p}y_embedder.mlp.0", None, h, 2048)  # pooled CLIP-L (768) + CLIP-G (1280)
    lay.linear(f"{p}y_embedder.mlp.2", None, h, h)
    lay.linear(f"{p}context_embedder", None, h, 4096)
    for i in range(depth):
        for part in ("context_block", "x_block"):
            block = f"{p}joint_blocks.{i}.{part}"
            pre_only = part == "context_block" and i == depth - 1
            lay.linear(f"{block}.attn.qkv", None, 3 * h, h)
            if not pre_only:
                lay.linear(f"{block}.attn.proj", None, h, h)
                lay.linear(f"{block}.mlp.fc1", None, 4 * h, h)
                lay.linear(f"{block}.mlp.fc2", None, h, 4 * h)
            lay.linear(f"{block}.adaLN_modulation.1", None, (2 if pre_only else 6) * h, h)
    lay.linear(f"{p}final_layer.linear", None, 2 * 2 * 16, h)
    lay.linear(f"{p}final_layer.adaLN_modulation.1", None, 2 * h, h)
    return lay.specs


def t5xxl_layout(layers: int = 24, width: int = 4096, ff: int = 10240, heads: int = 64) -> list[TensorSpec]:
    """The T5 v1.1 XXL encoder as ``t5xxl_fp16.safetensors`` stores it
    (``T5EncoderModel``; the relative position bias lives in block 0 only).
    The engine builds it at 24 layers whatever the file holds.

    T5 scales no attention logits by the heads' width: its query projection carries that
    factor, and is drawn that much smaller, as T5's own initialisation draws it. (Drawn
    like the other matrices, the logits spread 8 times wider, each softmax is nearly an
    argmax, and 24 blocks of them turn rounding noise into a different encoding.)"""
    lay = _Layout()
    lay.add("shared.weight", None, 32128, width)
    for i in range(layers):
        b = f"encoder.block.{i}.layer"
        for proj in ("q", "k", "v", "o"):
            gain = (heads / width) ** 0.5 if proj == "q" else 1.0
            lay.linear(f"{b}.0.SelfAttention.{proj}", None, width, width, bias=False, gain=gain)
        if i == 0:
            lay.add(f"{b}.0.SelfAttention.relative_attention_bias.weight", None, 32, heads)
        lay.add(f"{b}.0.layer_norm.weight", None, width)
        lay.linear(f"{b}.1.DenseReluDense.wi_0", None, ff, width, bias=False)
        lay.linear(f"{b}.1.DenseReluDense.wi_1", None, ff, width, bias=False)
        lay.linear(f"{b}.1.DenseReluDense.wo", None, width, ff, bias=False)
        lay.add(f"{b}.1.layer_norm.weight", None, width)
    lay.add("encoder.final_layer_norm.weight", None, width)
    return lay.specs


@dataclass(frozen=True)
class Qwen3Config:
    """Qwen3-4B, as its GGUF releases store it (36 layers in the real model;
    the engine reads the depth from the file)."""

    layers: int = 36
    hidden: int = 2560
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    ffn: int = 9728
    vocab: int = 151936
    qk_norm: bool = True
    """Qwen3 normalises each head's queries and keys; Mistral's models (Ministral) do not."""
    qkv_bias: bool = False
    """Qwen2.5's query, key and value projections have biases; Qwen3's do not."""


def qwen3_layout(cfg: Qwen3Config) -> list[TensorSpec]:
    """A Qwen3 language model in llama.cpp's GGUF names (``blk.N.attn_q`` ...);
    the embedding is tied, so there is no ``output.weight``."""
    lay = _Layout()
    h, q, kv = cfg.hidden, cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    lay.add("token_embd.weight", None, cfg.vocab, h)
    for i in range(cfg.layers):
        b = f"blk.{i}"
        lay.add(f"{b}.attn_norm.weight", None, h)
        lay.linear(f"{b}.attn_q", None, q, h, bias=cfg.qkv_bias)
        lay.linear(f"{b}.attn_k", None, kv, h, bias=cfg.qkv_bias)
        lay.linear(f"{b}.attn_v", None, kv, h, bias=cfg.qkv_bias)
        if cfg.qk_norm:
            lay.add(f"{b}.attn_q_norm.weight", None, cfg.head_dim)
            lay.add(f"{b}.attn_k_norm.weight", None, cfg.head_dim)
        lay.linear(f"{b}.attn_output", None, h, q, bias=False)
        lay.add(f"{b}.ffn_norm.weight", None, h)
        lay.linear(f"{b}.ffn_gate", None, cfg.ffn, h, bias=False)
        lay.linear(f"{b}.ffn_up", None, cfg.ffn, h, bias=False)
        lay.linear(f"{b}.ffn_down", None, h, cfg.ffn, bias=False)
    lay.add("output_norm.weight", None, h)
    return lay.specs


Z_IMAGE_WIDTHS = {"hidden": 3840, "heads": 30, "head_dim": 128, "ffn": 10240, "caption": 2560, "t_embed": 1024}
"""Z-Image's transformer (6B), as the engine builds it whatever the file holds: 30 layers and
2 + 2 refiner layers, 3840 wide; the caption embedder takes Qwen3-4B's features."""


def z_image_layout(prefix: str = "") -> list[TensorSpec]:
    """The Z-Image transformer in its released names (no biases in the blocks)."""
    w = Z_IMAGE_WIDTHS
    lay = _Layout()
    p, h = prefix, w["hidden"]
    lay.add(f"{p}cap_pad_token", None, h)
    lay.add(f"{p}x_pad_token", None, h)
    lay.linear(f"{p}x_embedder", None, h, 64)  # 2x2 patches of 16 latent channels
    lay.linear(f"{p}t_embedder.mlp.0", None, w["t_embed"], 256)
    lay.linear(f"{p}t_embedder.mlp.2", None, 256, w["t_embed"])
    lay.add(f"{p}cap_embedder.0.weight", None, w["caption"])
    lay.linear(f"{p}cap_embedder.1", None, h, w["caption"])
    blocks = [(f"noise_refiner.{i}", True) for i in range(2)] + [(f"context_refiner.{i}", False) for i in range(2)]
    blocks += [(f"layers.{i}", True) for i in range(30)]
    for name, modulated in blocks:
        b = f"{p}{name}"
        lay.linear(f"{b}.attention.qkv", None, 3 * w["heads"] * w["head_dim"], h, bias=False)
        lay.linear(f"{b}.attention.out", None, h, w["heads"] * w["head_dim"], bias=False)
        lay.add(f"{b}.attention.q_norm.weight", None, w["head_dim"])
        lay.add(f"{b}.attention.k_norm.weight", None, w["head_dim"])
        lay.linear(f"{b}.feed_forward.w1", None, w["ffn"], h, bias=False)
        lay.linear(f"{b}.feed_forward.w2", None, h, w["ffn"], bias=False)
        lay.linear(f"{b}.feed_forward.w3", None, w["ffn"], h, bias=False)
        for norm in ("attention_norm1", "ffn_norm1", "attention_norm2", "ffn_norm2"):
            lay.add(f"{b}.{norm}.weight", None, h)
        if modulated:
            lay.linear(f"{b}.adaLN_modulation.0", None, 4 * h, 256)
    lay.linear(f"{p}final_layer.linear", None, 64, h)
    lay.linear(f"{p}final_layer.adaLN_modulation.1", None, h, 256)
    return lay.specs


MINISTRAL_3B = Qwen3Config(layers=26, hidden=3072, heads=32, kv_heads=8, ffn=9216, vocab=131072, qk_norm=False)
"""Ministral 3B in llama.cpp's names: ERNIE-Image's text encoder (it reads layer 25 of 26)."""

ERNIE_IMAGE_WIDTHS = {"hidden": 4096, "head_dim": 128, "ffn": 12288, "latent": 128, "text": 3072}
"""ERNIE-Image's transformer: 4096 wide (the engine reads widths and depth from the file),
on FLUX.2's 32-channel latents patchified 2x2 (128)."""


def ernie_image_layout(layers: int = 36, prefix: str = "") -> list[TensorSpec]:
    """The ERNIE-Image transformer in its released names."""
    w = ERNIE_IMAGE_WIDTHS
    lay = _Layout()
    p, h = prefix, w["hidden"]
    lay.add(f"{p}x_embedder.proj.weight", None, h, w["latent"], 1, 1)
    lay.add(f"{p}x_embedder.proj.bias", None, h)
    lay.linear(f"{p}text_proj", None, h, w["text"], bias=False)
    lay.linear(f"{p}time_embedding.linear_1", None, h, h)
    lay.linear(f"{p}time_embedding.linear_2", None, h, h)
    lay.linear(f"{p}adaLN_modulation.1", None, 6 * h, h)
    for i in range(layers):
        b = f"{p}layers.{i}"
        lay.add(f"{b}.adaLN_sa_ln.weight", None, h)
        for proj in ("to_q", "to_k", "to_v"):
            lay.linear(f"{b}.self_attention.{proj}", None, h, h, bias=False)
        lay.add(f"{b}.self_attention.norm_q.weight", None, w["head_dim"])
        lay.add(f"{b}.self_attention.norm_k.weight", None, w["head_dim"])
        lay.linear(f"{b}.self_attention.to_out.0", None, h, h, bias=False)
        lay.add(f"{b}.adaLN_mlp_ln.weight", None, h)
        lay.linear(f"{b}.mlp.gate_proj", None, w["ffn"], h, bias=False)
        lay.linear(f"{b}.mlp.up_proj", None, w["ffn"], h, bias=False)
        lay.linear(f"{b}.mlp.linear_fc2", None, h, w["ffn"], bias=False)
    lay.linear(f"{p}final_norm.linear", None, 2 * h, h)
    lay.linear(f"{p}final_linear", None, w["latent"], h)
    return lay.specs


QWEN_IMAGE_WIDTHS = {"hidden": 3072, "head_dim": 128, "ffn": 12288, "text": 3584, "latent": 64}
"""Qwen-Image's MMDiT (20B at its 60 blocks; the engine reads the depth from the file): 3072
wide, 24 heads of 128, on 16-channel latents patchified 2x2, prompted by Qwen2.5-VL 7B (3584)."""


def qwen_image_layout(blocks: int = 60, prefix: str = "") -> list[TensorSpec]:
    """The Qwen-Image transformer in its released (diffusers) names."""
    w = QWEN_IMAGE_WIDTHS
    lay = _Layout()
    p, h = prefix, w["hidden"]
    lay.linear(f"{p}time_text_embed.timestep_embedder.linear_1", None, h, 256)
    lay.linear(f"{p}time_text_embed.timestep_embedder.linear_2", None, h, h)
    lay.add(f"{p}txt_norm.weight", None, w["text"])
    lay.linear(f"{p}img_in", None, h, w["latent"])
    lay.linear(f"{p}txt_in", None, h, w["text"])
    for i in range(blocks):
        b = f"{p}transformer_blocks.{i}"
        for stream in ("img", "txt"):
            lay.linear(f"{b}.{stream}_mod.1", None, 6 * h, h)
            lay.linear(f"{b}.{stream}_mlp.net.0.proj", None, w["ffn"], h)
            lay.linear(f"{b}.{stream}_mlp.net.2", None, h, w["ffn"])
        for proj in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"):
            lay.linear(f"{b}.attn.{proj}", None, h, h)
        for norm in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            lay.add(f"{b}.attn.{norm}.weight", None, w["head_dim"])
    lay.linear(f"{p}norm_out.linear", None, 2 * h, h)
    lay.linear(f"{p}proj_out", None, w["latent"], h)
    return lay.specs


QWEN25_VL_7B = Qwen3Config(
    layers=28, hidden=3584, heads=28, kv_heads=4, ffn=18944, vocab=152064, qk_norm=False, qkv_bias=True
)
"""Qwen2.5-VL 7B's language model in llama.cpp's names: Qwen-Image's text encoder (it reads the
last layer; the engine reads the depth from the file)."""


@dataclass(frozen=True)
class WanVAEConfig:
    """The Wan 2.1 VAE (Qwen-Image's): a causal 3-D autoencoder of 16 latent channels."""

    dim: int = 96
    z: int = 16
    mult: tuple[int, ...] = (1, 2, 4, 4)
    res_blocks: int = 2
    down_in_time: tuple[bool, ...] = (False, True, True)


def _wan_conv3d(lay: _Layout, name: str, out: int, inp: int, k: tuple[int, int, int] = (3, 3, 3)) -> None:
    lay.add(f"{name}.weight", None, out, inp, *k)
    lay.add(f"{name}.bias", None, out)


def _wan_resblock(lay: _Layout, name: str, inp: int, out: int) -> None:
    lay.add(f"{name}.residual.0.gamma", None, inp, 1, 1, 1)
    _wan_conv3d(lay, f"{name}.residual.2", out, inp)
    lay.add(f"{name}.residual.3.gamma", None, out, 1, 1, 1)
    _wan_conv3d(lay, f"{name}.residual.6", out, out)
    if inp != out:
        _wan_conv3d(lay, f"{name}.shortcut", out, inp, (1, 1, 1))


def _wan_middle(lay: _Layout, name: str, ch: int) -> None:
    _wan_resblock(lay, f"{name}.middle.0", ch, ch)
    lay.add(f"{name}.middle.1.norm.gamma", None, ch, 1, 1)
    lay.conv(f"{name}.middle.1.to_qkv", None, 3 * ch, ch, 1)
    lay.conv(f"{name}.middle.1.proj", None, ch, ch, 1)
    _wan_resblock(lay, f"{name}.middle.2", ch, ch)


def wan_vae_layout() -> list[TensorSpec]:
    """The Wan 2.1 VAE in its released names (``encoder.downsamples.N``, ``decoder.upsamples.N``:
    residual blocks and resamplers numbered in one sequence)."""
    v = WanVAEConfig()
    lay = _Layout()
    dim, z, mult = v.dim, v.z, v.mult
    dims = [dim] + [dim * m for m in mult]
    _wan_conv3d(lay, "encoder.conv1", dims[0], 3)
    index = 0
    for i, (inp, out) in enumerate(itertools.pairwise(dims)):
        for _ in range(v.res_blocks):
            _wan_resblock(lay, f"encoder.downsamples.{index}", inp, out)
            inp, index = out, index + 1
        if i != len(mult) - 1:
            lay.conv(f"encoder.downsamples.{index}.resample.1", None, out, out)
            if v.down_in_time[i]:
                _wan_conv3d(lay, f"encoder.downsamples.{index}.time_conv", out, out, (3, 1, 1))
            index += 1
    _wan_middle(lay, "encoder", dims[-1])
    lay.add("encoder.head.0.gamma", None, dims[-1], 1, 1, 1)
    _wan_conv3d(lay, "encoder.head.2", 2 * z, dims[-1])
    _wan_conv3d(lay, "conv1", 2 * z, 2 * z, (1, 1, 1))
    _wan_conv3d(lay, "conv2", z, z, (1, 1, 1))
    dims = [dim * mult[-1]] + [dim * m for m in reversed(mult)]
    _wan_conv3d(lay, "decoder.conv1", dims[0], z)
    _wan_middle(lay, "decoder", dims[0])
    up_in_time = tuple(reversed(v.down_in_time))
    index = 0
    for i, (inp, out) in enumerate(itertools.pairwise(dims)):
        if i in (1, 2, 3):
            inp //= 2  # the resampler before halved the channels
        for _ in range(v.res_blocks + 1):
            _wan_resblock(lay, f"decoder.upsamples.{index}", inp, out)
            inp, index = out, index + 1
        if i != len(mult) - 1:
            lay.conv(f"decoder.upsamples.{index}.resample.1", None, out // 2, out)
            if up_in_time[i]:
                _wan_conv3d(lay, f"decoder.upsamples.{index}.time_conv", 2 * out, out, (3, 1, 1))
            index += 1
    lay.add("decoder.head.0.gamma", None, dims[-1], 1, 1, 1)
    _wan_conv3d(lay, "decoder.head.2", 3, dims[-1])
    return lay.specs


ANIMA_WIDTHS = {"hidden": 2048, "heads": 16, "head_dim": 128, "text": 1024, "adaln": 256, "latent": 16}
"""Anima's DiT (Cosmos-Predict2's, 28 blocks in the release; the engine reads the depth from the
file), 2048 wide, on the Wan VAE's 16 latent channels (plus a padding mask) patchified 2x2,
with its LLM adapter: 6 blocks of 1024 over Qwen3-0.6B's features and T5's token ids."""

QWEN3_0_6B = Qwen3Config(layers=28, hidden=1024, heads=16, kv_heads=8, ffn=3072)
"""Qwen3-0.6B in llama.cpp's names: Anima's text encoder (the engine gives a Qwen3 16 heads
only at 28 layers)."""


def _anima_attention(lay: _Layout, name: str, dim: int, context: int, head_dim: int, out: str) -> None:
    lay.linear(f"{name}.q_proj", None, dim, dim, bias=False)
    lay.linear(f"{name}.k_proj", None, dim, context, bias=False)
    lay.linear(f"{name}.v_proj", None, dim, context, bias=False)
    lay.add(f"{name}.q_norm.weight", None, head_dim)
    lay.add(f"{name}.k_norm.weight", None, head_dim)
    lay.linear(f"{name}.{out}", None, dim, dim, bias=False)


def anima_layout(blocks: int = 28, prefix: str = "net.") -> list[TensorSpec]:
    """Anima's DiT in its released names (under ``net.``)."""
    w = ANIMA_WIDTHS
    lay = _Layout()
    p, h, a = prefix, w["hidden"], w["adaln"]
    lay.linear(f"{p}x_embedder.proj.1", None, h, (w["latent"] + 1) * 4, bias=False)
    lay.linear(f"{p}t_embedder.1.linear_1", None, h, h, bias=False)
    lay.linear(f"{p}t_embedder.1.linear_2", None, 3 * h, h, bias=False)
    lay.add(f"{p}t_embedding_norm.weight", None, h)
    for i in range(blocks):
        b = f"{p}blocks.{i}"
        for part in ("self_attn", "cross_attn", "mlp"):
            lay.linear(f"{b}.adaln_modulation_{part}.1", None, a, h, bias=False)
            lay.linear(f"{b}.adaln_modulation_{part}.2", None, 3 * h, a, bias=False)
        _anima_attention(lay, f"{b}.self_attn", h, h, w["head_dim"], "output_proj")
        _anima_attention(lay, f"{b}.cross_attn", h, w["text"], w["head_dim"], "output_proj")
        lay.linear(f"{b}.mlp.layer1", None, 4 * h, h, bias=False)
        lay.linear(f"{b}.mlp.layer2", None, h, 4 * h, bias=False)
    lay.linear(f"{p}final_layer.adaln_modulation.1", None, a, h, bias=False)
    lay.linear(f"{p}final_layer.adaln_modulation.2", None, 2 * h, a, bias=False)
    lay.linear(f"{p}final_layer.linear", None, 4 * w["latent"], h, bias=False)
    t = w["text"]  # the adapter: T5's vocabulary, 6 blocks of 16 heads of 64
    lay.add(f"{p}llm_adapter.embed.weight", None, 32128, t)
    for i in range(6):
        b = f"{p}llm_adapter.blocks.{i}"
        for norm in ("norm_self_attn", "norm_cross_attn", "norm_mlp"):
            lay.add(f"{b}.{norm}.weight", None, t)
        _anima_attention(lay, f"{b}.self_attn", t, t, 64, "o_proj")
        _anima_attention(lay, f"{b}.cross_attn", t, t, 64, "o_proj")
        lay.linear(f"{b}.mlp.0", None, 4 * t, t)
        lay.linear(f"{b}.mlp.2", None, t, 4 * t)
    lay.linear(f"{p}llm_adapter.out_proj", None, t, t)
    lay.add(f"{p}llm_adapter.norm.weight", None, t)
    return lay.specs

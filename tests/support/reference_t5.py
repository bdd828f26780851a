"""The reference implementation for the families on T5-XXL (diffusers and transformers,
PyTorch, CPU, fp32): SD3 Medium and FLUX.1 [dev] and [schnell], on the very weights the
engine loads.

T5-XXL in fp32 is 19 GB, more than the reference may hold beside everything else in 24
GiB. :class:`StreamedT5` therefore runs transformers' own ``T5EncoderModel`` with each of
its 24 blocks given its weights just before it runs and dropping them just after (0.8 GB
at a time), dequantized from the suite's q4_0 T5 file with ``gguf`` (exact: every q4_0
value is ``d * (q - 8)`` with an f16 ``d``).

T5 token ids come from Hugging Face's ``tokenizers`` on the T5 vocabulary the engine
carries (the ``tokenizer.json`` compiled into its library): the vocabulary is the engine's
own, the tokenizer that applies it is the reference's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from tests.support.layouts import FLUX1_DEV, FLUX1_SCHNELL, flux_layout, mmdit_layout, vae_layout
from tests.support.models import (
    cached,
    random_q4_0_tensors,
    random_tensors,
    write_gguf,
    write_safetensors,
)
from tests.support.reference import (
    EOS,
    SD1_VAE_CONFIG,
    built_module,
    clip_pair_encoding,
    clip_text_model,
    diffusers_named,
    diffusers_state,
    sd_token_ids,
    to_uint8,
    torch_noise,
)

# T5 v1.1 XXL's encoder (facts of the architecture): 24 blocks of 64 heads, a gated-GELU
# feed-forward network, relative position buckets shared from the first block.
T5_XXL_CONFIG: dict[str, Any] = {
    "vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
    "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu", "layer_norm_epsilon": 1e-6, "dropout_rate": 0.0,
    "is_encoder_decoder": False, "use_cache": False,
}  # fmt: skip
T5_VOCABULARY = 32100  # T5's sentencepiece pieces (its embedding has 28 more rows, unused)
T5_PAD = 0
FLUX1_T5_LENGTH = 256  # FLUX.1's T5 sequence, padded with T5_PAD, no attention mask
SD3_T5_LENGTH = 77  # SD3's, as long as CLIP's

# FLUX.1's 16-channel VAE (the SD VAE without its quant convolutions) with its latent scale
# and shift; [dev]'s and [schnell]'s transformers at their widths with one block of each kind.
FLUX1_VAE_SPECS = vae_layout(prefix="", z_channels=16, quant_convs=False)
FLUX1_VAE_CONFIG: dict[str, Any] = {
    **SD1_VAE_CONFIG, "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False,
    "scaling_factor": 0.3611, "shift_factor": 0.1159,
}  # fmt: skip
FLUX1_PARITY = {
    variant: dataclasses.replace(config, double_blocks=1, single_blocks=1)
    for variant, config in (("dev", FLUX1_DEV), ("schnell", FLUX1_SCHNELL))
}
FLUX1_TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 1, "in_channels": 64, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}  # fmt: skip
FLUX1_SHIFT = {"dev": 1.15, "schnell": 1.0}
"""The ``mu`` of each variant's time shift of its sigmas (``e^mu / (e^mu + 1 / s - 1)``): the
engine's at every size (it tells [dev] by its guidance embedder), as ComfyUI's. diffusers
shifts [dev]'s by the picture's size (1.15 at 4096 tokens) and not [schnell]'s at all."""

# SD3 Medium (facts of the architecture): 24 joint blocks 1536 wide in 64-wide heads over
# 2x2 patches, a 192 x 192 grid of position embeddings cropped to the picture, CLIP-L and
# CLIP-G side by side (padded to T5's 4096) before T5's tokens, both pooled vectors (2048).
SD3_TRANSFORMER_CONFIG: dict[str, Any] = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24, "attention_head_dim": 64,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 192,
}  # fmt: skip
SD3_VAE_CONFIG: dict[str, Any] = {**FLUX1_VAE_CONFIG, "scaling_factor": 1.5305, "shift_factor": 0.0609}
SD3_SHIFT = 3.0
"""SD3's time shift of flow sigmas (``shift * s / (1 + (shift - 1) * s)``)."""
SD3_VAE_SPECS = vae_layout(z_channels=16, quant_convs=False)


def cached_sd3_parity_file(folder: Path) -> Path:
    """SD3 Medium as ``sd3_medium.safetensors`` holds it without text encoders: the MMDiT
    (:func:`tests.support.layouts.mmdit_layout`, 24 joint blocks) and its VAE, q4_0 as the
    suite's other SD3 file, with drawn biases and norm scales, in the model cache ``folder``
    (written the first time)."""

    def write(path: Path) -> object:
        tensors = random_q4_0_tensors(mmdit_layout() + SD3_VAE_SPECS, offsets=True)
        return write_gguf(path, tensors, arch="sd3")

    return cached(folder, "parity-sd3-medium-q4_0.gguf", write)


def cached_flux1_parity_files(folder: Path) -> dict[str, Path]:
    """FLUX.1's transformers (``dev`` and ``schnell``: :data:`FLUX1_PARITY`, original names,
    as ``flux1-dev.safetensors`` and ``flux1-schnell.safetensors``; they share every tensor
    they both have) and its VAE (``vae``: ``ae.safetensors``), fp16 with drawn biases and norm
    scales, in the model cache ``folder`` (written the first time)."""
    specs = {variant: flux_layout(config) for variant, config in FLUX1_PARITY.items()}
    specs["vae"] = FLUX1_VAE_SPECS

    def writer(role: str) -> Callable[[Path], object]:
        return lambda path: write_safetensors(path, random_tensors(specs[role], dtype="f16", offsets=True))

    return {role: cached(folder, f"parity-flux1-{role}.safetensors", writer(role)) for role in specs}


@functools.cache
def _t5_tokenizer() -> Any:
    """``tokenizers`` on the T5 ``tokenizer.json`` inside the engine library."""
    from tokenizers import Tokenizer

    from sfumato.engine.library import locate_library

    data = locate_library().read_bytes()
    for start in (m.start() for m in re.finditer(rb'\{\s*"version"\s*:', data)):
        try:
            spec, _ = json.JSONDecoder().raw_decode(data[start : start + 64_000_000].decode("utf-8", "replace"))
        except json.JSONDecodeError:
            continue
        model = spec.get("model", {})
        if model.get("type") == "Unigram" and len(model.get("vocab", ())) == T5_VOCABULARY:
            return Tokenizer.from_str(json.dumps(spec))
    raise LookupError("the engine library carries no T5 tokenizer.json")


def t5_token_ids(prompt: str, length: int = FLUX1_T5_LENGTH) -> list[int]:
    """T5 ids of ``prompt``: its pieces and the end token, padded to ``length`` with
    :data:`T5_PAD` (a longer prompt is refused: the tests keep theirs short)."""
    ids: list[int] = _t5_tokenizer().encode(prompt).ids
    if len(ids) > length:
        raise ValueError(f"{prompt!r} takes {len(ids)} T5 tokens, more than {length}")
    return ids + [T5_PAD] * (length - len(ids))


def gguf_value(tensor: Any) -> Any:
    """A ``gguf.ReaderTensor`` as an fp32 torch tensor in PyTorch's axis order (dequantized
    by ``gguf``: exact for q4_0, whose values are ``d * (q - 8)`` with an f16 ``d``)."""
    import gguf
    import torch

    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return torch.from_numpy(np.asarray(values, np.float32).reshape(shape))


def gguf_state(path: Path, prefix: str = "") -> dict[str, Any]:
    """The tensors of the GGUF file ``path`` whose names start with ``prefix``, by name
    (:func:`gguf_value`)."""
    import gguf

    return {t.name: gguf_value(t) for t in gguf.GGUFReader(str(path)).tensors if t.name.startswith(prefix)}


class BlockStream:
    """The blocks of a model built on the meta device, each given its weights just before it
    runs and dropping them just after: ``load(i)`` returns block ``i``'s state (its own
    names, fp32). Each block's last output is kept in :attr:`outputs`."""

    def __init__(self, blocks: Any, load: Callable[[int], dict[str, Any]]) -> None:
        self.load = load
        self.count = len(blocks)
        self.sources = list(range(self.count))
        """Which block's weights each block runs with (the identity, but for a negative control)."""
        self.outputs: dict[int, Any] = {}
        for i, block in enumerate(blocks):
            block.register_forward_pre_hook(functools.partial(self._enter, i))
            block.register_forward_hook(functools.partial(self._leave, i))

    def _enter(self, i: int, block: Any, args: Any) -> None:
        block.load_state_dict(self.load(self.sources[i]), strict=True, assign=True)

    def _leave(self, i: int, block: Any, args: Any, out: Any) -> None:
        self.outputs[i] = out[0] if isinstance(out, tuple) else out
        block.to_empty(device="meta")

    @contextlib.contextmanager
    def swapped(self, pair: tuple[int, int] | None) -> Iterator[None]:
        """Run the two blocks of ``pair`` (if given) with each other's weights."""
        if pair is not None:
            a, b = pair
            self.sources[a], self.sources[b] = b, a
        try:
            yield
        finally:
            self.sources = list(range(self.count))


class StreamedT5:
    """transformers' ``T5EncoderModel`` (:data:`T5_XXL_CONFIG`) on the T5 GGUF ``path``
    (``T5EncoderModel``'s names), each block's weights read and dequantized to fp32 as the
    block is entered and released as it is left (:class:`BlockStream`)."""

    def __init__(self, path: Path) -> None:
        import gguf
        import torch
        from transformers import T5Config, T5EncoderModel

        self.tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
        with torch.device("meta"):
            model = T5EncoderModel(T5Config(**T5_XXL_CONFIG))
        model.shared.weight = torch.nn.Parameter(self.value("shared.weight"), requires_grad=False)
        model.encoder.embed_tokens = model.shared
        norm = model.encoder.final_layer_norm
        norm.weight = torch.nn.Parameter(self.value("encoder.final_layer_norm.weight"), requires_grad=False)
        self.model = model.eval()
        self.stream = BlockStream(model.encoder.block, self._block)

    def value(self, name: str) -> Any:
        """Tensor ``name`` of the file, dequantized to fp32, in PyTorch's axis order."""
        return gguf_value(self.tensors[name])

    def _block(self, i: int) -> dict[str, Any]:
        prefix = f"encoder.block.{i}."
        return {name.removeprefix(prefix): self.value(name) for name in self.tensors if name.startswith(prefix)}

    def encode(self, ids: list[int], swapped: tuple[int, int] | None = None) -> Any:
        """The last hidden state of ``ids`` (``1 x len(ids) x 4096``); ``swapped`` runs two
        blocks after the first (which alone holds the relative position bias) with each
        other's weights."""
        import torch

        if swapped is not None and 0 in swapped:
            raise ValueError(f"swapped names blocks after the first, got {swapped}")
        with self.stream.swapped(swapped), torch.no_grad():
            return self.model(input_ids=torch.tensor([ids], dtype=torch.long)).last_hidden_state


@contextlib.contextmanager
def _latent_scale(vae: Any, kept: bool) -> Iterator[None]:
    """``vae`` as it is, or (``kept`` false: a negative control) decoding latents without
    its scale and shift."""
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor
    if not kept:
        vae.register_to_config(scaling_factor=1.0, shift_factor=0.0)
    try:
        yield
    finally:
        vae.register_to_config(scaling_factor=scale, shift_factor=shift)


def flow_sigmas(steps: int) -> list[float]:
    """The engine's ``discrete`` schedule of a flow model before its time shift: timesteps
    evenly spaced from 999 to 0, each ``(t + 1) / 1000``."""
    return [float(s) for s in np.linspace(1.0, 1 / 1000, steps)]


class Flux1Reference:
    """diffusers' ``FluxPipeline`` (fp32, CPU) on FLUX.1's files as the engine loads them:
    the transformers of [dev] and [schnell] (``files["dev"]``, ``files["schnell"]``)
    converted by diffusers' own single-file converter, the VAE, CLIP-L (transformers' names)
    and T5-XXL (:class:`StreamedT5`)."""

    def __init__(self, files: dict[str, Path], threads: int | None = None) -> None:
        import torch
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
        from safetensors.torch import load_file

        if threads is not None:
            torch.set_num_threads(threads)
        self.transformers: dict[str, Any] = {}
        for variant in FLUX1_PARITY:
            checkpoint = {name: t.float() for name, t in load_file(str(files[variant])).items()}
            state = convert_flux_transformer_checkpoint_to_diffusers(checkpoint)
            config = {**FLUX1_TRANSFORMER_CONFIG, "guidance_embeds": variant == "dev"}
            make = functools.partial(FluxTransformer2DModel.from_config, config)
            self.transformers[variant] = built_module(make, state)
        vae = diffusers_state(files["vae"], FLUX1_VAE_SPECS)
        self.vae = built_module(lambda: AutoencoderKL.from_config(FLUX1_VAE_CONFIG), vae)
        self.clip_l = clip_text_model(files["clip_l"], "clip_l")
        self.t5 = StreamedT5(files["t5xxl"])
        self._encoded: dict[tuple[str, tuple[int, int] | None], Any] = {}

    def encode_t5(self, prompt: str, swapped: tuple[int, int] | None = None) -> Any:
        """T5's last hidden state of ``prompt`` (``1 x 256 x 4096``), computed once per prompt
        (``swapped``: :meth:`StreamedT5.encode`'s)."""
        key = (prompt, swapped)
        if key not in self._encoded:
            self._encoded[key] = self.t5.encode(t5_token_ids(prompt), swapped)
        return self._encoded[key]

    def pooled(self, prompt: str) -> Any:
        """CLIP-L's pooled output of ``prompt`` (final layer norm at the end token)."""
        import torch

        with torch.no_grad():
            return self.clip_l(torch.tensor([sd_token_ids(prompt, EOS)], dtype=torch.long)).pooler_output

    def txt2img(
        self,
        variant: str,
        prompt: str,
        *,
        width: int,
        height: int,
        steps: int,
        guidance: float,
        seed: int,
        t5_prompt: str | None = None,
        clip_prompt: str | None = None,
        t5_swapped: tuple[int, int] | None = None,
        latent_scale: bool = True,
        shift: float | None = None,
    ) -> npt.NDArray[np.uint8]:
        """One euler txt2img run of ``variant`` (``"dev"`` or ``"schnell"``, which ignores
        ``guidance``) from ``torch.randn`` (seeded CPU generator, packed as the pipeline packs
        it) on the engine's ``discrete`` sigmas (:func:`flow_sigmas`) time-shifted by the
        variant's :data:`FLUX1_SHIFT`.

        The keyword arguments after ``seed`` break one mapping each, for the negative
        controls: T5 or CLIP-L given another prompt than the other encoder, two T5 blocks
        run with each other's weights, the VAE's latent scale and shift left out, and
        another time shift (``shift``: a ``mu``, 0 for none)."""
        import torch
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

        mu = FLUX1_SHIFT[variant] if shift is None else shift
        scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=mu, max_shift=mu)
        pipe = FluxPipeline(
            scheduler=scheduler, vae=self.vae, text_encoder=self.clip_l, tokenizer=None, text_encoder_2=None,
            tokenizer_2=None, transformer=self.transformers[variant],
        )  # fmt: skip
        pipe.set_progress_bar_config(disable=True)
        noise = torch_noise(seed, (1, 16, height // 8, width // 8))
        latents = FluxPipeline._pack_latents(noise, 1, 16, height // 8, width // 8)
        with _latent_scale(self.vae, latent_scale), torch.no_grad():
            out = pipe(
                prompt_embeds=self.encode_t5(t5_prompt or prompt, t5_swapped),
                pooled_prompt_embeds=self.pooled(clip_prompt or prompt), width=width, height=height,
                num_inference_steps=steps, sigmas=flow_sigmas(steps),
                guidance_scale=guidance, latents=latents, output_type="np",
            )  # fmt: skip
        image: npt.NDArray[np.uint8] = to_uint8(out.images)[0]
        return image


class SD3Reference:
    """diffusers' ``StableDiffusion3Pipeline`` (fp32, CPU) on SD3 Medium's files as the engine
    loads them: the checkpoint's MMDiT converted by diffusers' own single-file converter and
    its VAE, CLIP-L and CLIP-G (transformers' names) and T5-XXL (:class:`StreamedT5`)."""

    def __init__(self, files: dict[str, Path], threads: int | None = None) -> None:
        import torch
        from diffusers import AutoencoderKL, SD3Transformer2DModel
        from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

        if threads is not None:
            torch.set_num_threads(threads)
        state = convert_sd3_transformer_checkpoint_to_diffusers(
            gguf_state(files["diffusion"], "model.diffusion_model.")
        )
        self.transformer = built_module(lambda: SD3Transformer2DModel.from_config(SD3_TRANSFORMER_CONFIG), state)
        vae = diffusers_named(gguf_state(files["diffusion"], "first_stage_model.").items(), SD3_VAE_SPECS)
        self.vae = built_module(lambda: AutoencoderKL.from_config(SD3_VAE_CONFIG), vae)
        self.clip_l = clip_text_model(files["clip_l"], "clip_l")
        self.clip_g = clip_text_model(files["clip_g"], "clip_g")
        self.t5 = StreamedT5(files["t5xxl"])
        self._encoded: dict[str, Any] = {}

    def encode(self, prompt: str, t5_prompt: str | None = None) -> tuple[Any, Any]:
        """SD3's conditioning of ``prompt``: both CLIPs' next-to-last hidden states side by
        side (CLIP-L padded with its end token, CLIP-G with 0), zero-padded to 4096 wide,
        before T5's (of ``t5_prompt``, if given); and CLIP-L's pooled output (the file has
        no projection) beside CLIP-G's projected one."""
        import torch

        t5_prompt = t5_prompt or prompt
        if t5_prompt not in self._encoded:
            self._encoded[t5_prompt] = self.t5.encode(t5_token_ids(t5_prompt, SD3_T5_LENGTH))
        clip, pooled_l, pooled_g = clip_pair_encoding(self.clip_l, self.clip_g, prompt)
        clip = torch.nn.functional.pad(clip, (0, T5_XXL_CONFIG["d_model"] - clip.shape[-1]))
        embeds = torch.cat([clip, self._encoded[t5_prompt]], dim=-2)
        return embeds, torch.cat([pooled_l, pooled_g], dim=-1)

    def txt2img(
        self,
        prompt: str,
        negative_prompt: str,
        *,
        width: int,
        height: int,
        steps: int,
        cfg_scale: float,
        seed: int,
        t5_prompt: str | None = None,
        clip_prompt: str | None = None,
        swap_blocks: bool = False,
        latent_scale: bool = True,
    ) -> npt.NDArray[np.uint8]:
        """One euler txt2img run from ``torch.randn`` (seeded CPU generator) on the engine's
        ``discrete`` sigmas (:func:`flow_sigmas`) shifted by :data:`SD3_SHIFT`.

        The keyword arguments after ``seed`` break one mapping each, for the negative
        controls: T5 or both CLIPs given another prompt than the other encoders, the first
        two joint blocks run in each other's place, and the VAE's latent scale and shift
        left out."""
        import torch
        from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

        embeds, pooled = self.encode(clip_prompt or prompt, t5_prompt or prompt)
        negative, negative_pooled = self.encode(negative_prompt)
        pipe = StableDiffusion3Pipeline(
            transformer=self.transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=SD3_SHIFT), vae=self.vae,
            text_encoder=self.clip_l, tokenizer=None, text_encoder_2=self.clip_g, tokenizer_2=None,
            text_encoder_3=None, tokenizer_3=None,
        )  # fmt: skip
        pipe.set_progress_bar_config(disable=True)
        blocks = self.transformer.transformer_blocks
        if swap_blocks:
            blocks[0], blocks[1] = blocks[1], blocks[0]
        try:
            with _latent_scale(self.vae, latent_scale), torch.no_grad():
                out = pipe(
                    prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=negative,
                    negative_pooled_prompt_embeds=negative_pooled, width=width, height=height,
                    num_inference_steps=steps, sigmas=flow_sigmas(steps), guidance_scale=cfg_scale,
                    latents=torch_noise(seed, (1, 16, height // 8, width // 8)), output_type="np",
                )  # fmt: skip
        finally:
            if swap_blocks:
                blocks[0], blocks[1] = blocks[1], blocks[0]
        image: npt.NDArray[np.uint8] = to_uint8(out.images)[0]
        return image

"""The reference implementation for FLUX.2 [klein] (diffusers and transformers, PyTorch, CPU,
fp32) on the very files the engine loads: the suite's klein 4B transformer (one block of each
kind), its Qwen3-4B (27 layers, as deep as klein reads it) and its 32-channel VAE.

Qwen3-4B's 27 layers in fp32 are 11 GB, so :class:`StreamedQwen3` runs transformers' own
``Qwen3Model`` one layer at a time (:class:`tests.support.reference_t5.BlockStream`), each
dequantized exactly from the q4_0 GGUF as it is entered.

Qwen token ids come from transformers' ``Qwen2Tokenizer`` (its byte-level BPE and
pre-tokenizer) on the merges the engine carries in its library: the vocabulary is the
engine's own, the tokenizer that applies it is the reference's.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from tests.support.layouts import FLUX2_KLEIN_4B
from tests.support.models import QWEN3_4B_TEST
from tests.support.reference import built_module, to_uint8, torch_noise
from tests.support.reference_t5 import BlockStream, flow_sigmas, gguf_state, gguf_value

# Qwen3-4B (facts of the architecture) as deep as the suite's file holds it.
QWEN3_CONFIG: dict[str, Any] = {
    "vocab_size": 151936, "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": QWEN3_4B_TEST.layers,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0}, "max_position_embeddings": 40960,
    "tie_word_embeddings": True, "attention_bias": False, "use_cache": False,
}  # fmt: skip
QWEN3_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}  # fmt: skip
"""llama.cpp's GGUF names of a Qwen3 layer's tensors, and transformers' own."""

QWEN_MERGES = 151387  # Qwen2's byte-level BPE merges: ids 256 .. 151642 (facts of its vocabulary)
QWEN_SPECIAL = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<think>": 151667,
                "</think>": 151668}  # fmt: skip
QWEN_PAD = QWEN_SPECIAL["<|endoftext|>"]
KLEIN_TEXT_LENGTH = 512  # klein's prompt, padded with QWEN_PAD under an attention mask
KLEIN_TEXT_LAYERS = (9, 18, 27)
"""The Qwen3 layers whose outputs klein stacks into its text context (each after that many layers)."""

# klein 4B's transformer (3072 wide in 128-wide heads, text 3 x 2560) with one block of each
# kind, its VAE (FLUX.1's autoencoder with 32 latent channels and both quant convolutions).
FLUX2_TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 1, "in_channels": FLUX2_KLEIN_4B.in_channels, "num_layers": 1, "num_single_layers": 1,
    "attention_head_dim": FLUX2_KLEIN_4B.head_dim,
    "num_attention_heads": FLUX2_KLEIN_4B.hidden // FLUX2_KLEIN_4B.head_dim,
    "joint_attention_dim": FLUX2_KLEIN_4B.context_dim, "mlp_ratio": float(FLUX2_KLEIN_4B.mlp_ratio),
    "guidance_embeds": False,
}  # fmt: skip
FLUX2_VAE_EPS = 1e-4  # the batch norm's epsilon over the packed latents

# The released FLUX.2 VAE's batch-norm statistics over its 128 packed latent channels
# (``bn.running_mean``, and ``sqrt(bn.running_var + eps)``), to 4 places: the engine applies
# these whatever the VAE file holds, so the reference's VAE gets them too.
FLUX2_LATENT_MEAN = (
    -0.0676, -0.0715, -0.0753, -0.0745, 0.0223, 0.0180, 0.0142, 0.0184, -0.0001, -0.0063, -0.0002, -0.0031,
    -0.0272, -0.0281, -0.0276, -0.0290, -0.0769, -0.0672, -0.0902, -0.0892, 0.0168, 0.0152, 0.0079, 0.0086,
    0.0083, 0.0015, 0.0003, -0.0043, -0.0439, -0.0419, -0.0438, -0.0431, -0.0102, -0.0132, -0.0066, -0.0048,
    -0.0311, -0.0306, -0.0279, -0.0180, 0.0030, 0.0015, 0.0126, 0.0145, 0.0347, 0.0338, 0.0337, 0.0283,
    0.0020, 0.0047, 0.0047, 0.0050, 0.0123, 0.0081, 0.0081, 0.0146, 0.0681, 0.0679, 0.0767, 0.0732,
    -0.0462, -0.0474, -0.0392, -0.0511, -0.0528, -0.0477, -0.0470, -0.0517, -0.0317, -0.0316, -0.0345, -0.0283,
    0.0510, 0.0445, 0.0578, 0.0458, -0.0412, -0.0458, -0.0487, -0.0467, -0.0088, -0.0106, -0.0088, -0.0046,
    -0.0376, -0.0432, -0.0436, -0.0499, 0.0118, 0.0166, 0.0203, 0.0279, 0.0113, 0.0129, 0.0016, 0.0072,
    -0.0118, -0.0018, -0.0141, -0.0054, -0.0091, -0.0138, -0.0145, -0.0187, 0.0323, 0.0305, 0.0259, 0.0300,
    0.0540, 0.0614, 0.0495, 0.0590, -0.0511, -0.0603, -0.0478, -0.0524, -0.0227, -0.0274, -0.0154, -0.0255,
    -0.0572, -0.0565, -0.0518, -0.0496, 0.0116, 0.0054, 0.0163, 0.0104,
)  # fmt: skip
FLUX2_LATENT_STD = (
    1.8029, 1.7786, 1.7868, 1.7837, 1.7717, 1.7590, 1.7610, 1.7479, 1.7336, 1.7373, 1.7340, 1.7343,
    1.8626, 1.8527, 1.8629, 1.8589, 1.7593, 1.7526, 1.7556, 1.7583, 1.7363, 1.7400, 1.7355, 1.7394,
    1.7342, 1.7246, 1.7392, 1.7304, 1.7551, 1.7513, 1.7559, 1.7488, 1.8449, 1.8454, 1.8550, 1.8535,
    1.8240, 1.7813, 1.7854, 1.7945, 1.8047, 1.7876, 1.7695, 1.7676, 1.7782, 1.7667, 1.7925, 1.7848,
    1.7579, 1.7407, 1.7483, 1.7368, 1.7961, 1.7998, 1.7920, 1.7925, 1.7780, 1.7747, 1.7727, 1.7749,
    1.7526, 1.7447, 1.7657, 1.7495, 1.7775, 1.7720, 1.7813, 1.7813, 1.8162, 1.8013, 1.8023, 1.8033,
    1.7527, 1.7331, 1.7563, 1.7482, 1.7610, 1.7507, 1.7681, 1.7613, 1.7665, 1.7545, 1.7828, 1.7726,
    1.7896, 1.7999, 1.7864, 1.7760, 1.7613, 1.7625, 1.7560, 1.7577, 1.7783, 1.7671, 1.7810, 1.7799,
    1.7201, 1.7068, 1.7265, 1.7091, 1.7793, 1.7578, 1.7502, 1.7455, 1.7587, 1.7500, 1.7525, 1.7362,
    1.7616, 1.7572, 1.7444, 1.7430, 1.7509, 1.7610, 1.7634, 1.7612, 1.7254, 1.7135, 1.7321, 1.7226,
    1.7664, 1.7624, 1.7718, 1.7664, 1.7457, 1.7441, 1.7569, 1.7530,
)  # fmt: skip


@functools.cache
def _qwen_tokenizer() -> Any:
    """transformers' ``Qwen2Tokenizer`` on the Qwen2 merges inside the engine library: the
    256 byte symbols in GPT-2's order, then one token per merge, then the special tokens."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from sfumato.engine.library import locate_library

    data = locate_library().read_bytes()
    start = data.find("Ġ Ġ\nĠĠ ĠĠ\ni n\n".encode())
    if start < 0:
        raise LookupError("the engine library carries no Qwen2 merges")
    lines = data[start : start + 8_000_000].decode("utf-8", "replace").split("\n")[:QWEN_MERGES]
    merges = [tuple(line.split(" ", 1)) for line in lines]
    symbols = list(bytes_to_unicode().values())
    vocab = {symbol: i for i, symbol in enumerate(symbols + [a + b for a, b in merges])}
    if len(vocab) != QWEN_PAD:
        raise LookupError(f"the engine's Qwen2 merges make {len(vocab)} tokens, not {QWEN_PAD}")
    vocab.update(QWEN_SPECIAL)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL)})
    return tokenizer


def klein_token_ids(prompt: str) -> tuple[list[int], list[int]]:
    """The Qwen ids of ``prompt`` in Qwen3's chat template for one user turn with thinking
    off (as klein's pipeline applies it), padded to :data:`KLEIN_TEXT_LENGTH` with
    :data:`QWEN_PAD`, and the attention mask (1 for the prompt's tokens, 0 for padding)."""
    text = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    ids: list[int] = _qwen_tokenizer()(text)["input_ids"]
    if len(ids) > KLEIN_TEXT_LENGTH:
        raise ValueError(f"{prompt!r} takes {len(ids)} Qwen tokens, more than {KLEIN_TEXT_LENGTH}")
    pad = KLEIN_TEXT_LENGTH - len(ids)
    return ids + [QWEN_PAD] * pad, [1] * len(ids) + [0] * pad


class StreamedQwen3:
    """transformers' ``Qwen3Model`` (:data:`QWEN3_CONFIG`) on the Qwen3 GGUF ``path``
    (llama.cpp's names), each layer's weights read and dequantized to fp32 as the layer is
    entered and released as it is left."""

    def __init__(self, path: Path) -> None:
        import gguf
        import torch
        from transformers import Qwen3Config, Qwen3Model

        self.tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
        with torch.device("meta"):
            model = Qwen3Model(Qwen3Config(**QWEN3_CONFIG))
        embedding = gguf_value(self.tensors["token_embd.weight"])
        model.embed_tokens.weight = torch.nn.Parameter(embedding, requires_grad=False)
        model.norm.weight = torch.nn.Parameter(gguf_value(self.tensors["output_norm.weight"]), requires_grad=False)
        model.rotary_emb = type(model.rotary_emb)(model.config)  # its frequencies, computed off the meta device
        self.model = model.eval()
        self.stream = BlockStream(model.layers, self._layer)

    def _layer(self, i: int) -> dict[str, Any]:
        prefix = f"blk.{i}."
        return {
            QWEN3_NAMES[name.removeprefix(prefix).rsplit(".", 1)[0]] + ".weight": gguf_value(tensor)
            for name, tensor in self.tensors.items()
            if name.startswith(prefix)
        }

    def hidden_states(self, ids: list[int], mask: list[int], swapped: tuple[int, int] | None = None) -> list[Any]:
        """Each layer's output for ``ids`` under the attention ``mask`` (padding masked
        besides the causal mask), by layer (``1 x len(ids) x 2560`` each); ``swapped`` runs
        two layers with each other's weights."""
        import torch

        with self.stream.swapped(swapped), torch.no_grad():
            self.model(
                input_ids=torch.tensor([ids], dtype=torch.long), attention_mask=torch.tensor([mask], dtype=torch.long)
            )
        return [self.stream.outputs[i] for i in range(self.stream.count)]


@contextlib.contextmanager
def _latent_statistics(vae: Any, kept: bool) -> Iterator[None]:
    """``vae`` as it is, or (``kept`` false: a negative control) with its batch norm's
    statistics those of no normalisation (mean 0, deviation 1)."""
    mean, var = vae.bn.running_mean.clone(), vae.bn.running_var.clone()
    if not kept:
        vae.bn.running_mean.zero_()
        vae.bn.running_var.fill_(1.0 - vae.config.batch_norm_eps)
    try:
        yield
    finally:
        vae.bn.running_mean.copy_(mean)
        vae.bn.running_var.copy_(var)


class Flux2KleinReference:
    """diffusers' ``Flux2KleinPipeline`` (fp32, CPU) on FLUX.2 [klein]'s files as the engine
    loads them: the transformer (``files["diffusion"]``, converted by diffusers' own
    single-file converter), Qwen3 (``files["llm"]``, :class:`StreamedQwen3`) and the VAE
    (``files["vae"]``, diffusers' names) with :data:`FLUX2_LATENT_MEAN` and
    :data:`FLUX2_LATENT_STD` as its batch-norm statistics."""

    def __init__(self, files: dict[str, Path], threads: int | None = None) -> None:
        import torch
        from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
        from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers
        from safetensors.torch import load_file

        if threads is not None:
            torch.set_num_threads(threads)
        state = convert_flux2_transformer_checkpoint_to_diffusers(gguf_state(files["diffusion"]))
        self.transformer = built_module(lambda: Flux2Transformer2DModel.from_config(FLUX2_TRANSFORMER_CONFIG), state)
        vae = {name: t.float() for name, t in load_file(str(files["vae"])).items()}
        std = torch.tensor(FLUX2_LATENT_STD, dtype=torch.float32)
        vae.update({
            "bn.running_mean": torch.tensor(FLUX2_LATENT_MEAN, dtype=torch.float32),
            "bn.running_var": std * std - FLUX2_VAE_EPS, "bn.num_batches_tracked": torch.tensor(0),
        })  # fmt: skip
        self.vae = built_module(lambda: AutoencoderKLFlux2.from_config({"batch_norm_eps": FLUX2_VAE_EPS}), vae)
        self.qwen = StreamedQwen3(files["llm"])
        self._encoded: dict[tuple[str, tuple[int, int] | None], list[Any]] = {}

    def encode(
        self, prompt: str, layers: tuple[int, ...] = KLEIN_TEXT_LAYERS, swapped: tuple[int, int] | None = None
    ) -> Any:
        """klein's text context of ``prompt``: Qwen3's outputs after each of ``layers``
        layers side by side (``1 x 512 x 7680``), Qwen3 run once per prompt (``swapped``:
        :meth:`StreamedQwen3.hidden_states`')."""
        import torch

        key = (prompt, swapped)
        if key not in self._encoded:
            self._encoded[key] = self.qwen.hidden_states(*klein_token_ids(prompt), swapped=swapped)
        states = self._encoded[key]
        return torch.cat([states[n - 1] for n in layers], dim=-1)

    def txt2img(
        self,
        prompt: str,
        *,
        width: int,
        height: int,
        steps: int,
        seed: int,
        layers: tuple[int, ...] = KLEIN_TEXT_LAYERS,
        qwen_swapped: tuple[int, int] | None = None,
        latent_statistics: bool = True,
        shift: bool = True,
    ) -> npt.NDArray[np.uint8]:
        """One euler txt2img run without classifier-free guidance from ``torch.randn``
        (seeded CPU generator, 128 packed channels at a sixteenth of the size) on the engine's
        ``discrete`` sigmas (:func:`tests.support.reference_t5.flow_sigmas`) time-shifted by
        the ``mu`` both klein's pipeline and the engine compute from the size and steps.

        The keyword arguments after ``seed`` break one mapping each, for the negative
        controls: other Qwen3 layers stacked, two Qwen3 layers run with each other's weights,
        the VAE's latent statistics left out, the sigmas left unshifted."""
        import torch
        from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

        scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=shift, time_shift_type="exponential")
        pipe = Flux2KleinPipeline(
            scheduler=scheduler, vae=self.vae, text_encoder=None, tokenizer=None, transformer=self.transformer,
            is_distilled=True,
        )  # fmt: skip
        pipe.set_progress_bar_config(disable=True)
        noise = torch_noise(seed, (1, FLUX2_KLEIN_4B.in_channels, height // 16, width // 16))
        with _latent_statistics(self.vae, latent_statistics), torch.no_grad():
            out = pipe(
                prompt_embeds=self.encode(prompt, tuple(layers), qwen_swapped), width=width, height=height,
                num_inference_steps=steps, sigmas=flow_sigmas(steps), guidance_scale=1.0, latents=noise,
                output_type="np",
            )  # fmt: skip
        image: npt.NDArray[np.uint8] = to_uint8(out.images)[0]
        return image

"""The reference implementation sfumato is compared with: diffusers and
transformers (PyTorch, CPU, fp32), built on the very weights the engine loads.

:func:`write_sd_reference_folder` writes an SD 1.x or 2.x diffusers folder
(random weights from :mod:`tests.support.models`, plus the ``config.json`` files
diffusers needs to build the modules offline). The engine loads that folder as
it is; :class:`SDReference` loads the same files into diffusers' modules and
runs them. Used by the parity tests and by the benchmarks.

Needs ``torch``, ``diffusers``, ``transformers`` and, for prompts,
``instant-clip-tokenizer`` (which carries CLIP's BPE vocabulary); none of
them is a dependency of sfumato itself.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from tests.support.layouts import SD1_UNET, SD2_UNET, clip_text_layout, unet_layout, vae_layout
from tests.support.models import SDXL_PARTS, cached, random_tensors, sdxl_part_layout, write_safetensors

# The published SD 1.x configurations (facts of the architecture).
SD1_UNET_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
SD1_VAE_CONFIG: dict[str, Any] = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SD1_TEXT_CONFIG: dict[str, Any] = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 1,
}
# SD 2.x (512, epsilon): a 1024-wide cross-attention with linear projections, heads of 64
# channels; OpenCLIP-H's text tower as diffusers keeps it (23 of its 24 layers: SD 2.x
# reads the next to last).
SD2_UNET_CONFIG: dict[str, Any] = {
    **SD1_UNET_CONFIG,
    "cross_attention_dim": 1024,
    "attention_head_dim": [5, 10, 20, 20],
    "use_linear_projection": True,
}
SD2_TEXT_CONFIG: dict[str, Any] = {
    **SD1_TEXT_CONFIG,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "hidden_act": "gelu",
    "projection_dim": 512,
}
# SD 1.x's and 2.x's noise schedule (scaled_linear betas over 1000 training steps).
SD1_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,  # as SD 1.x ships it; unused by the "linspace" spacing used here
}
BOS, EOS, CONTEXT_LENGTH = 49406, 49407, 77
# The long-prompt families' parity prompt and a near one (25 words each): with a short
# prompt another prompt moves a large text encoder's picture by only a few levels.
LONG_PROMPT = (
    "a watercolor painting of a lighthouse on a rocky coast at dusk, waves crashing, seagulls in the sky, "
    "warm light in the windows"
)
LONG_OTHER = (
    "a watercolor painting of a lighthouse on a rocky coast at dawn, calm sea, fishing boats in the harbour, "
    "cold light over the hills"
)
SD2_PAD = 0  # OpenCLIP pads with token 0 ("!"), CLIP (SD 1.x) with its end token

_UNET_OUT = "conv_out.weight"


def write_sd_reference_folder(path: Path, version: str = "sd1", seed: int = 0, zero_eps: bool = False) -> Path:
    """Write an SD 1.x (``version="sd2"``: 2.x) diffusers folder in fp32 with diffusers' config files.

    ``zero_eps`` zeroes the UNet's last convolution, so that the model predicts
    zero noise at every step: a sampler then leaves its initial noise latent
    untouched, and the image is the VAE decode of the engine's own noise. (That
    UNet is stored in fp16: its output is exactly zero either way.)
    """
    path = Path(path)
    sd2 = version == "sd2"
    unet, unet_config = (SD2_UNET, SD2_UNET_CONFIG) if sd2 else (SD1_UNET, SD1_UNET_CONFIG)
    text = clip_text_layout(prefix="", hidden=1024, layers=23) if sd2 else clip_text_layout(prefix="")
    parts: list[tuple[str, Any, str, str, dict[str, Any]]] = [
        ("unet", unet_layout(unet, prefix=""), "diffusion_pytorch_model.safetensors", "f16" if zero_eps else "f32",
         unet_config),
        ("vae", vae_layout(prefix=""), "diffusion_pytorch_model.safetensors", "f32", SD1_VAE_CONFIG),
        ("text_encoder", text, "model.safetensors", "f32", SD2_TEXT_CONFIG if sd2 else SD1_TEXT_CONFIG),
    ]  # fmt: skip
    for folder, specs, file_name, dtype, config in parts:
        (path / folder).mkdir(parents=True, exist_ok=True)
        tensors = random_tensors(specs, seed, dtype, diffusers=True)
        if folder == "unet" and zero_eps:
            tensors = ((n, np.zeros_like(a) if n == _UNET_OUT else a) for n, a in tensors)
        write_safetensors(path / folder / file_name, tensors)
        (path / folder / "config.json").write_text(json.dumps(config, indent=1))
    (path / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0"})
    )
    return path


def cached_reference_folder(folder: Path, zero_eps: bool = False, version: str = "sd1") -> Path:
    """The reference folder of ``version`` in the model cache ``folder``, written the first time."""
    name = f"parity-{version}-zero-eps" if zero_eps else f"parity-{version}-f32"
    return cached(folder, name, lambda p: write_sd_reference_folder(p, version, zero_eps=zero_eps))


def sd_token_ids(prompt: str, pad: int = EOS) -> list[int]:
    """CLIP token ids of ``prompt`` as SD feeds them to its text encoder: start token,
    at most 75 BPE tokens, end token, padded to 77 with ``pad`` (SD 2.x: :data:`SD2_PAD`)."""
    from instant_clip_tokenizer import Tokenizer

    body = list(Tokenizer().encode(prompt))[: CONTEXT_LENGTH - 2]
    ids = [BOS, *body, EOS]
    return ids + [pad] * (CONTEXT_LENGTH - len(ids))


def torch_noise(seed: int, shape: tuple[int, ...]) -> Any:
    """``torch.randn(shape)`` from a CPU generator seeded with ``seed``: what the
    engine's ``cpu`` RNG imitates."""
    import torch

    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)


def to_uint8(images: Any) -> npt.NDArray[np.uint8]:
    """A diffusers float image batch (``N, H, W, 3`` in 0..1) as the engine
    writes pixels: ``value * 255`` rounded half up."""
    return (np.clip(np.asarray(images, dtype=np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def euler_scheduler(scheduler: str = "discrete", prediction: str = "eps") -> Any:
    """diffusers' Euler scheduler configured as the engine's ``scheduler``
    (``discrete``: timesteps evenly spaced from 999 to 0; ``karras``: Karras
    sigmas) and prediction (``eps`` or ``v``), on SD's and SDXL's noise schedule."""
    from diffusers import EulerDiscreteScheduler

    if scheduler not in ("discrete", "karras"):
        raise ValueError(f"scheduler must be 'discrete' or 'karras', got {scheduler!r}")
    return EulerDiscreteScheduler(
        **SD1_SCHEDULE,
        prediction_type={"eps": "epsilon", "v": "v_prediction"}[prediction],
        timestep_spacing="linspace",
        use_karras_sigmas=scheduler == "karras",
    )


class SDReference:
    """diffusers' SD 1.x or 2.x modules (fp32, CPU) on the weights of one folder written
    by :func:`write_sd_reference_folder`."""

    def __init__(self, folder: Path, threads: int | None = None) -> None:
        import torch
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        if threads is not None:
            torch.set_num_threads(threads)
        folder = Path(folder)
        self.unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32).eval()
        self.vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32).eval()
        self.text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=torch.float32).eval()

    def encode_ids(self, ids: list[int]) -> Any:
        """The text encoder's last hidden state (after the final layer norm), ``1 x 77 x width``."""
        import torch

        with torch.no_grad():
            return self.text_encoder(torch.tensor([ids], dtype=torch.long)).last_hidden_state

    def decode(self, latent: Any) -> npt.NDArray[np.uint8]:
        """VAE-decode an SD latent (already divided by the scaling factor) to uint8 images."""
        import torch

        with torch.no_grad():
            image = self.vae.decode(latent).sample
        return to_uint8((image / 2 + 0.5).permute(0, 2, 3, 1).numpy())

    def scheduler(self, scheduler: str = "discrete", prediction: str = "eps") -> Any:
        """:func:`euler_scheduler` (a method, for the tests that read its sigmas)."""
        return euler_scheduler(scheduler, prediction)

    def pipeline(self, scheduler: Any) -> Any:
        """diffusers' ``StableDiffusionPipeline`` on these modules; prompts go in
        as embeddings (:meth:`encode_ids`), so it needs no tokenizer."""
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=None,
            unet=self.unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def txt2img(
        self,
        prompt_ids: list[int],
        negative_ids: list[int],
        *,
        width: int,
        height: int,
        steps: int,
        cfg_scale: float,
        seed: int,
        scheduler: str = "discrete",
        prediction: str = "eps",
    ) -> npt.NDArray[np.uint8]:
        """One euler txt2img run of diffusers' ``StableDiffusionPipeline``.

        The initial latent is ``sigma_max * torch.randn`` (seeded CPU
        generator), the k-diffusion convention the engine follows; diffusers'
        own Euler would start from ``sqrt(sigma_max**2 + 1) * noise``.
        """
        import torch

        sched = self.scheduler(scheduler, prediction)
        sched.set_timesteps(steps)
        sigma_max = float(sched.sigmas[0])
        latents = torch_noise(seed, (1, 4, height // 8, width // 8)) * sigma_max / float(sched.init_noise_sigma)
        pipe = self.pipeline(sched)
        with torch.no_grad():
            out = pipe(
                prompt_embeds=self.encode_ids(prompt_ids),
                negative_prompt_embeds=self.encode_ids(negative_ids),
                width=width,
                height=height,
                num_inference_steps=steps,
                guidance_scale=cfg_scale,
                latents=latents,
                output_type="np",
            )
        image: npt.NDArray[np.uint8] = to_uint8(out.images)[0]
        return image


# SDXL base 1.0's published configurations (facts of the architecture): a three-level UNet
# with 1, 2 and 10 transformer blocks per attention, 2048-wide context (CLIP-L's 768 beside
# OpenCLIP-bigG's 1280) and the size-and-pooled-text vector (1280 + 6 x 256); the SD VAE
# with its own latent scale.
SDXL_UNET_CONFIG: dict[str, Any] = {
    **SD1_UNET_CONFIG,
    "sample_size": 128,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "attention_head_dim": [5, 10, 20],
    "transformer_layers_per_block": [1, 2, 10],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
SDXL_CLIP_G_CONFIG: dict[str, Any] = {
    **SD1_TEXT_CONFIG,
    "architectures": ["CLIPTextModelWithProjection"],
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}
SDXL_VAE_CONFIG: dict[str, Any] = {**SD1_VAE_CONFIG, "scaling_factor": 0.13025}


def cached_sdxl_parity_files(folder: Path, roles: tuple[str, ...] = SDXL_PARTS) -> dict[str, Path]:
    """SDXL's split layout (:func:`tests.support.models.sdxl_part_layout`: full-depth UNet,
    CLIP-L, CLIP-G, VAE; or those of ``roles``) in fp16, with drawn biases and norm scales,
    in the model cache ``folder``: what both sides of the SDXL parity test load (written the
    first time). FLUX.1's takes its CLIP-L."""

    def writer(role: str) -> Callable[[Path], object]:
        return lambda path: write_safetensors(path, random_tensors(sdxl_part_layout(role), dtype="f16", offsets=True))

    return {role: cached(folder, f"parity-sdxl-{role}.safetensors", writer(role)) for role in roles}


_OPEN_CLIP_NAMES = {
    "self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
}  # fmt: skip


def _open_clip(tensors: dict[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
    """A ``CLIPTextModelWithProjection`` state in OpenCLIP's text-tower layout: q, k and v
    stacked into ``in_proj``, the projection as the matrix it multiplies from the right."""
    out = {
        "token_embedding.weight": tensors.pop("text_model.embeddings.token_embedding.weight"),
        "positional_embedding": tensors.pop("text_model.embeddings.position_embedding.weight"),
        "text_projection": np.ascontiguousarray(tensors.pop("text_projection.weight").T),
        "ln_final.weight": tensors.pop("text_model.final_layer_norm.weight"),
        "ln_final.bias": tensors.pop("text_model.final_layer_norm.bias"),
    }
    layers = {int(name.split(".")[3]) for name in tensors}
    for i in sorted(layers):
        hf, oc = f"text_model.encoder.layers.{i}", f"transformer.resblocks.{i}"
        for kind in ("weight", "bias"):
            parts = [tensors.pop(f"{hf}.self_attn.{p}_proj.{kind}") for p in "qkv"]
            out[f"{oc}.attn.in_proj_{kind}"] = np.concatenate(parts)
            for ours, theirs in _OPEN_CLIP_NAMES.items():
                out[f"{oc}.{theirs}.{kind}"] = tensors.pop(f"{hf}.{ours}.{kind}")
    if tensors:
        raise ValueError(f"tensors left unconverted: {sorted(tensors)[:5]}")
    return out


def write_sdxl_checkpoint(parts: dict[str, Path], path: Path) -> Path:
    """The all-in-one SDXL checkpoint holding the very tensors of the split files ``parts``
    (:func:`cached_sdxl_parity_files`), named as SDXL base's own checkpoint names them: the
    UNet under ``model.diffusion_model.``, the VAE under ``first_stage_model.``, CLIP-L under
    ``conditioner.embedders.0.transformer.`` and CLIP-G in OpenCLIP's layout
    (:func:`_open_clip`) under ``conditioner.embedders.1.model.``."""
    from safetensors import safe_open

    def read(role: str) -> dict[str, npt.NDArray[Any]]:
        with safe_open(str(parts[role]), "numpy") as opened:
            return {name: opened.get_tensor(name) for name in opened.keys()}

    prefixes = {
        "unet": "model.diffusion_model.",
        "vae": "first_stage_model.",
        "clip_l": "conditioner.embedders.0.transformer.",
    }
    tensors = {prefix + name: t for role, prefix in prefixes.items() for name, t in read(role).items()}
    tensors.update({f"conditioner.embedders.1.model.{n}": t for n, t in _open_clip(read("clip_g")).items()})
    return write_safetensors(path, tensors.items())


def diffusers_state(file: Path, specs: list[Any]) -> dict[str, Any]:
    """The tensors of ``file`` (written in the checkpoint layout of ``specs``) under
    diffusers' names and shapes, widened to fp32 one at a time."""
    from safetensors import safe_open

    with safe_open(str(file), "pt") as opened:
        return diffusers_named(((name, opened.get_tensor(name)) for name in opened.keys()), specs)


def diffusers_named(tensors: Iterable[tuple[str, Any]], specs: list[Any]) -> dict[str, Any]:
    """``(name, tensor)`` pairs of the checkpoint layout of ``specs`` under diffusers' names
    and shapes, in fp32."""
    by_name = {spec.name: spec for spec in specs if spec.diffusers is not None}
    state: dict[str, Any] = {}
    for name, tensor in tensors:
        spec = by_name[name]
        state[spec.diffusers] = tensor.float().reshape(spec.diffusers_shape or spec.shape)
    return state


def built_module(make: Any, state: dict[str, Any]) -> Any:
    """The module ``make()`` builds, made on the meta device (no random initialisation of
    billions of weights) and given ``state`` as its parameters."""
    import torch

    with torch.device("meta"):
        module = make()
    module.load_state_dict(state, strict=True, assign=True)
    for name, buffer in module.named_buffers():
        if buffer.is_meta:  # a buffer no file stores (CLIP's position ids)
            raise ValueError(f"{name} was left on the meta device")
    return module.eval()


def clip_text_model(file: Path, role: str) -> Any:
    """transformers' fp32 text model on one file of SDXL's split layout: CLIP-L (``role``
    ``"clip_l"``, ``CLIPTextModel``) or CLIP-G (``"clip_g"``, ``CLIPTextModelWithProjection``).
    The file's names carry the ``text_model.`` prefix that transformers 5 drops from its own."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    kinds = {"clip_l": (CLIPTextModel, SD1_TEXT_CONFIG), "clip_g": (CLIPTextModelWithProjection, SDXL_CLIP_G_CONFIG)}
    kind, config = kinds[role]
    module = kind(CLIPTextConfig(**config))
    own = module.state_dict()
    state = diffusers_state(file, sdxl_part_layout(role))
    module.load_state_dict({k if k in own else k.removeprefix("text_model."): v for k, v in state.items()}, strict=True)
    return module.eval()


def clip_pair_encoding(clip_l: Any, clip_g: Any, prompt: str, g_pad: int = SD2_PAD) -> tuple[Any, Any, Any]:
    """What SDXL and SD3 take from CLIP-L and CLIP-G for ``prompt``: both encoders'
    next-to-last hidden states side by side, CLIP-L's pooled output (its final norm at the
    end token, projected where the model has a projection) and CLIP-G's projected one.
    CLIP-L's ids are padded with its end token, CLIP-G's with ``g_pad`` (OpenCLIP's 0)."""
    import torch

    with torch.no_grad():
        out_l = clip_l(torch.tensor([sd_token_ids(prompt, EOS)], dtype=torch.long), output_hidden_states=True)
        out_g = clip_g(torch.tensor([sd_token_ids(prompt, g_pad)], dtype=torch.long), output_hidden_states=True)
    pooled_l = getattr(out_l, "text_embeds", None)
    pooled_l = out_l.pooler_output if pooled_l is None else pooled_l
    hidden = torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1)
    return hidden, pooled_l, out_g.text_embeds


class SDXLReference:
    """diffusers' ``StableDiffusionXLPipeline`` (fp32, CPU) on the four files of SDXL's split
    layout as the suite writes them (:func:`tests.support.models.write_sdxl_part`): the UNet
    and VAE in the checkpoint layout, renamed to diffusers' on load; CLIP-L and CLIP-G
    (``CLIPTextModelWithProjection``) in transformers' own."""

    def __init__(self, files: dict[str, Path], threads: int | None = None) -> None:
        import torch
        from diffusers import AutoencoderKL, UNet2DConditionModel

        if threads is not None:
            torch.set_num_threads(threads)

        def state(role: str) -> dict[str, Any]:
            return diffusers_state(files[role], sdxl_part_layout(role))

        self.unet = built_module(lambda: UNet2DConditionModel.from_config(SDXL_UNET_CONFIG), state("unet"))
        self.vae = built_module(lambda: AutoencoderKL.from_config(SDXL_VAE_CONFIG), state("vae"))
        self.clip_l = clip_text_model(files["clip_l"], "clip_l")
        self.clip_g = clip_text_model(files["clip_g"], "clip_g")

    def encode(self, prompt: str, g_pad: int = SD2_PAD) -> tuple[Any, Any]:
        """SDXL's conditioning of ``prompt`` (:func:`clip_pair_encoding`'s hidden states and
        CLIP-G's projected pooled output)."""
        hidden, _, pooled_g = clip_pair_encoding(self.clip_l, self.clip_g, prompt, g_pad)
        return hidden, pooled_g

    def conditioning(
        self, prompt: str, negative_prompt: str, g_pad: int, zero_negative: str | None, transposed_projection: bool
    ) -> dict[str, Any]:
        """The pipeline's four conditioning arguments (:meth:`txt2img` says what the options do)."""
        import torch

        if zero_negative not in (None, "hidden", "both"):
            raise ValueError(f"zero_negative must be None, 'hidden' or 'both', got {zero_negative!r}")
        projection = self.clip_g.text_projection.weight
        if transposed_projection:
            projection.data = projection.data.T.contiguous()
        try:
            embeds, pooled = self.encode(prompt, g_pad)
            negative, negative_pooled = self.encode(negative_prompt, g_pad)
        finally:
            if transposed_projection:
                projection.data = projection.data.T.contiguous()
        if zero_negative is not None:
            negative = torch.zeros_like(negative)
        if zero_negative == "both":
            negative_pooled = torch.zeros_like(negative_pooled)
        return {
            "prompt_embeds": embeds, "pooled_prompt_embeds": pooled,
            "negative_prompt_embeds": negative, "negative_pooled_prompt_embeds": negative_pooled,
        }  # fmt: skip

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
        zero_negative: str | None = None,
        g_pad: int = SD2_PAD,
        original_size: tuple[int, int] | None = None,
        swap_blocks: bool = False,
        transposed_projection: bool = False,
    ) -> npt.NDArray[np.uint8]:
        """One euler txt2img run (``discrete`` timesteps), from ``sigma_max * torch.randn``
        as :meth:`SDReference.txt2img`.

        ``zero_negative`` zeroes the negative prompt's conditioning: its hidden states
        (``"hidden"``) or those and its pooled text (``"both"``, diffusers' own way with an
        empty negative prompt). The other keyword arguments break one mapping each, for the
        negative controls: CLIP-G's padding (``g_pad``), the size conditioning, the order of
        the first two transformer blocks of the deepest level, and CLIP-G's pooled
        projection (used transposed)."""
        import torch
        from diffusers import StableDiffusionXLPipeline

        sched = euler_scheduler()
        sched.set_timesteps(steps)
        latents = torch_noise(seed, (1, 4, height // 8, width // 8)) * float(sched.sigmas[0]) / sched.init_noise_sigma
        conditioning = self.conditioning(prompt, negative_prompt, g_pad, zero_negative, transposed_projection)
        pipe = StableDiffusionXLPipeline(
            vae=self.vae, text_encoder=self.clip_l, text_encoder_2=self.clip_g, tokenizer=None, tokenizer_2=None,
            unet=self.unet, scheduler=sched, force_zeros_for_empty_prompt=False, add_watermarker=False,
        )  # fmt: skip
        pipe.set_progress_bar_config(disable=True)
        blocks = self.unet.down_blocks[2].attentions[0].transformer_blocks
        if swap_blocks:
            blocks[0], blocks[1] = blocks[1], blocks[0]
        try:
            with torch.no_grad():
                out = pipe(
                    **conditioning, width=width, height=height, num_inference_steps=steps, guidance_scale=cfg_scale,
                    latents=latents, original_size=original_size or (height, width), target_size=(height, width),
                    output_type="np",
                )  # fmt: skip
        finally:
            if swap_blocks:
                blocks[0], blocks[1] = blocks[1], blocks[0]
        image: npt.NDArray[np.uint8] = to_uint8(out.images)[0]
        return image


REFERENCE_FAMILIES = ("sdxl", "sd3", "flux1", "flux2")


def reference_images(
    family: str, files: dict[str, Path], runs: dict[str, dict[str, Any]], out: Path, threads: int | None = None
) -> dict[str, npt.NDArray[np.uint8]]:
    """Run the reference of ``family`` (``"sdxl"``: :class:`SDXLReference`; ``"sd3"`` and
    ``"flux1"``: :mod:`tests.support.reference_t5`'s; ``"flux2"``:
    :class:`tests.support.reference_flux2.Flux2KleinReference`) on ``files``, its ``txt2img`` once
    per entry of ``runs``, in a process of its own (SDXL's fp32 UNet alone is 10 GB: the
    engine's side must not share memory with it), and return the images by name (saved in
    ``out``, an ``.npz`` file)."""
    import subprocess
    import sys

    if family not in REFERENCE_FAMILIES:
        raise ValueError(f"family must be one of {REFERENCE_FAMILIES}, got {family!r}")
    spec = {"family": family, "files": {role: str(p) for role, p in files.items()}, "runs": runs, "threads": threads}
    spec_file = out.with_suffix(".json")
    spec_file.write_text(json.dumps(spec))
    subprocess.run([sys.executable, "-m", "tests.support.reference", str(spec_file), str(out)], check=True)
    with np.load(out) as images:
        return {name: images[name] for name in runs}


def _main(spec_file: str, out: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    files = {role: Path(p) for role, p in spec["files"].items()}
    reference: Any
    if spec["family"] == "sdxl":
        reference = SDXLReference(files, threads=spec["threads"])
    elif spec["family"] == "flux2":
        from tests.support.reference_flux2 import Flux2KleinReference

        reference = Flux2KleinReference(files, threads=spec["threads"])
    else:
        from tests.support.reference_t5 import Flux1Reference, SD3Reference

        kind = {"sd3": SD3Reference, "flux1": Flux1Reference}[spec["family"]]
        reference = kind(files, threads=spec["threads"])
    images = {}
    for name, params in spec["runs"].items():
        for key in ("original_size", "t5_swapped", "qwen_swapped", "layers"):  # (tuples, which JSON keeps as lists)
            if params.get(key) is not None:
                params[key] = tuple(params[key])
        images[name] = reference.txt2img(**params)
    np.savez(out, **images)


if __name__ == "__main__":
    import sys

    _main(*sys.argv[1:])

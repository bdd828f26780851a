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
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from tests.support.layouts import SD1_UNET, SD2_UNET, clip_text_layout, unet_layout, vae_layout
from tests.support.models import cached, random_tensors, write_safetensors

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
        """diffusers' Euler scheduler configured as the engine's ``scheduler``
        (``discrete``: timesteps evenly spaced from 999 to 0; ``karras``: Karras
        sigmas) and prediction (``eps`` or ``v``)."""
        from diffusers import EulerDiscreteScheduler

        if scheduler not in ("discrete", "karras"):
            raise ValueError(f"scheduler must be 'discrete' or 'karras', got {scheduler!r}")
        return EulerDiscreteScheduler(
            **SD1_SCHEDULE,
            prediction_type={"eps": "epsilon", "v": "v_prediction"}[prediction],
            timestep_spacing="linspace",
            use_karras_sigmas=scheduler == "karras",
        )

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

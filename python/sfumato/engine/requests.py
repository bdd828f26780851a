"""What the native handles take and give: model and image requests, progress
ticks, generation outputs, and the engine's names for weight types and RNGs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from sfumato.images import ImageArray

# Weight types offered for ``wtype``: the engine's own names.
WEIGHT_TYPES: dict[str, str] = {
    "f32": "SD_TYPE_F32", "f16": "SD_TYPE_F16", "bf16": "SD_TYPE_BF16",
    "q8_0": "SD_TYPE_Q8_0", "q5_0": "SD_TYPE_Q5_0", "q5_1": "SD_TYPE_Q5_1",
    "q4_0": "SD_TYPE_Q4_0", "q4_1": "SD_TYPE_Q4_1", "q2_k": "SD_TYPE_Q2_K",
    "q3_k": "SD_TYPE_Q3_K", "q4_k": "SD_TYPE_Q4_K", "q5_k": "SD_TYPE_Q5_K",
    "q6_k": "SD_TYPE_Q6_K",
}  # fmt: skip
RNG_TYPES: dict[str, str] = {"std_default": "STD_DEFAULT_RNG", "cuda": "CUDA_RNG", "cpu": "CPU_RNG"}

Phase = Literal["conditioning", "sampling", "hires", "vae", "upscale", "refiner"]
"""The phases a job's progress ticks name; ``refiner`` is the second model's pass (:mod:`sfumato.chain`)."""
PHASE_CONDITIONING: Phase = "conditioning"
PHASE_SAMPLING: Phase = "sampling"
PHASE_HIRES: Phase = "hires"
PHASE_VAE: Phase = "vae"
PHASE_UPSCALE: Phase = "upscale"
PHASE_REFINER: Phase = "refiner"


@dataclass(frozen=True)
class ProgressTick:
    """One progress report of a running job.

    Attributes
    ----------
    step:
        Units of work done in this phase (sampling steps across the whole
        batch, latents decoded, upscale passes done).
    total_steps:
        Units of work this phase has in all.
    elapsed_ms:
        Milliseconds since the job started.
    phase:
        ``"sampling"``, ``"hires"``, ``"vae"`` or ``"upscale"``.
    preview:
        With previews asked for (``preview`` of the request), a PNG of the
        image as it stands after this sampling step; else ``None``.
    """

    step: int
    total_steps: int
    elapsed_ms: float
    phase: Phase = PHASE_SAMPLING
    preview: bytes | None = None


TickCallback = Callable[[ProgressTick], None]

PreviewMode = Literal["proj", "tae", "vae"]
"""How the engine previews a sampling step: ``"proj"`` projects the latent to RGB
(cheap; an eighth of the image's side), ``"tae"`` decodes it with the model's tiny
autoencoder (``taesd_path``), ``"vae"`` with its decoder (a full decode per preview:
the tiny autoencoder's when one is loaded)."""
PREVIEW_MODES: tuple[PreviewMode, ...] = ("proj", "tae", "vae")


@dataclass
class ContextParams:
    """What a :class:`DiffusionContext` is created from (``sd_ctx_params_t``).

    Paths left ``None`` are not passed. ``n_threads=-1`` lets the engine use
    its count of physical cores. ``wtype=None`` keeps each tensor's own type.
    ``prediction=None`` lets the engine detect it from the weights.
    """

    model_path: str | None = None
    diffusion_model_path: str | None = None
    clip_l_path: str | None = None
    clip_g_path: str | None = None
    t5xxl_path: str | None = None
    llm_path: str | None = None
    vae_path: str | None = None
    taesd_path: str | None = None
    tae_preview_only: bool = False
    """With ``taesd_path``: the tiny autoencoder only draws previews; the VAE decodes the images."""
    control_net_path: str | None = None
    embeddings: tuple[tuple[str, str], ...] = ()
    """Textual-inversion embeddings as ``(name, path)``: a prompt word ``name`` takes the file's vectors."""
    n_threads: int = -1
    wtype: str | None = None
    rng: str = "cuda"
    prediction: str | None = None
    vae_decode_only: bool = False
    flash_attn: bool = False
    diffusion_flash_attn: bool = False
    fused_attention: bool = True
    """Whether sfumato's fused attention kernel may run the diffusion model's attention
    (as flash attention) when the CPU build has it."""
    chroma_use_dit_mask: bool = True
    """Chroma's attention mask over the prompt's padding. The engine's flash attention
    breaks it (the pictures saturate), so a Chroma model asked for flash attention drops it."""
    diffusion_conv_direct: bool = False
    vae_conv_direct: bool = False
    offload_params_to_cpu: bool = False
    keep_clip_on_cpu: bool = False
    keep_vae_on_cpu: bool = False
    max_vram: float = 0.0
    enable_mmap: bool = False
    # LoRAs are applied in the graph, never merged into the weights: merging and
    # unmerging between requests drifts the weights (a request without a LoRA
    # after one with it did not give the same image).
    lora_apply_mode: str = "at_runtime"


LORA_APPLY_MODES = ("auto", "immediately", "at_runtime")


@dataclass
class HiresParams:
    """Hires fix as the engine runs it (``sd_hires_params_t``)."""

    upscaler: str = "Latent"
    model_path: str | None = None
    scale: float = 2.0
    steps: int = 0
    denoising_strength: float = 0.7
    tile_size: int = 128


@dataclass
class ImageRequest:
    """One ``generate_image`` call, in engine terms (``sd_img_gen_params_t``).

    ``sample_method`` / ``scheduler`` / ``eta`` / ``img_cfg_scale`` / ``flow_shift`` left ``None``
    take the engine's choice for the loaded model. ``seed`` must be >= 0 here:
    choosing a random seed is the caller's job, so that it can be reported.
    """

    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    steps: int = 20
    cfg_scale: float = 7.0
    img_cfg_scale: float | None = None
    flow_shift: float | None = None
    guidance: float = 3.5
    sample_method: str | None = None
    scheduler: str | None = None
    eta: float | None = None
    seed: int = 0
    batch_count: int = 1
    clip_skip: int = -1
    strength: float = 0.75
    init_image: ImageArray | None = None
    mask_image: ImageArray | None = None
    control_image: ImageArray | None = None
    control_strength: float = 0.9
    ref_images: Sequence[ImageArray] = ()
    vae_tiling: bool = False
    cache_threshold: float | None = None
    preview: PreviewMode | None = None
    preview_interval: int = 1
    loras: Sequence[tuple[str, float]] = ()
    hires: HiresParams | None = None


@dataclass
class GenerationOutput:
    """What one ``generate_image`` call produced.

    Attributes
    ----------
    images:
        ``batch_count`` arrays of shape ``(height, width, 3)``, uint8, owned by Python.
    seed:
        The seed of the first image; image ``i`` used ``seed + i``.
    phase_ms:
        Milliseconds spent in each engine phase that ran (conditioning,
        sampling, hires, vae), measured from the engine's own phase reports.
    total_ms:
        Wall time of the whole call.
    sampling_steps:
        Sampling steps the engine ran, over the whole batch.
    """

    images: list[ImageArray]
    seed: int
    phase_ms: dict[str, float] = field(default_factory=dict)
    total_ms: float = 0.0
    sampling_steps: int = 0

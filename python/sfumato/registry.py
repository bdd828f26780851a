"""Registry constants: named, downloadable model files.

A constant resolves through a local model cache (``SFUMATO_CACHE``, default
``~/.cache/sfumato/models``). A file already in the cache is used as is;
otherwise it is downloaded (Hugging Face files through ``huggingface_hub``,
release assets over HTTPS). Offline, or when the download fails, the error names
the constant, the URL, and the path to put the file at by hand.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sfumato.errors import InvalidModelError, ModelNotFoundError

ENV_CACHE = "SFUMATO_CACHE"
CONNECT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class RegistryModel:
    """A downloadable model file.

    Attributes
    ----------
    name:
        The constant's name (``"SD_V2_1_1B_Q8_0"``).
    filename:
        The file name in the cache (and at the source, unless ``hf_path`` says otherwise).
    hf_repo:
        The Hugging Face repository holding the file, if it lives on the Hub.
    url:
        A direct HTTPS URL, for files that are not on the Hub.
    family:
        The family detection should find in the file, or the companion role
        the file plays (``"vae"``, ``"llm"``, ``"t5xxl"``, ``"clip_l"``).
    prediction:
        The prediction type the model was trained for, when detection cannot
        tell it from the header (SD 2.1 768 is v-prediction).
    size:
        The expected size in bytes, where it is published.
    sha256:
        The expected checksum, where it is published.
    hf_path:
        The file's path inside ``hf_repo`` when it differs from ``filename``
        (a diffusers repository's ``vae/diffusion_pytorch_model.safetensors``).
    """

    name: str
    filename: str
    family: str
    hf_repo: str | None = None
    url: str | None = None
    prediction: str | None = None
    size: int | None = None
    sha256: str | None = None
    hf_path: str | None = None

    @property
    def remote_path(self) -> str:
        """The file's path at its Hugging Face source."""
        return self.hf_path or self.filename

    @property
    def source_url(self) -> str:
        """Where the file is downloaded from."""
        if self.url is not None:
            return self.url
        return f"https://huggingface.co/{self.hf_repo}/resolve/main/{self.remote_path}"

    def __str__(self) -> str:
        return self.name


SD_V2_1_1B_Q8_0 = RegistryModel(
    "SD_V2_1_1B_Q8_0", "stable-diffusion-v2-1-Q8_0.gguf", "sd2",
    hf_repo="gpustack/stable-diffusion-v2-1-GGUF", prediction="v",
)  # fmt: skip
SD_V2_1_1B_Q4_0 = RegistryModel(
    "SD_V2_1_1B_Q4_0", "stable-diffusion-v2-1-Q4_0.gguf", "sd2",
    hf_repo="gpustack/stable-diffusion-v2-1-GGUF", prediction="v",
)  # fmt: skip
REALESRGAN_X4PLUS = RegistryModel(
    "REALESRGAN_X4PLUS", "RealESRGAN_x4plus.pth", "esrgan",
    url="https://github.com/xinntao/Real-ESRGAN/releases/download/v0.1.0/RealESRGAN_x4plus.pth",
)  # fmt: skip
REALESRGAN_X4PLUS_ANIME_6B = RegistryModel(
    "REALESRGAN_X4PLUS_ANIME_6B", "RealESRGAN_x4plus_anime_6B.pth", "esrgan",
    url="https://github.com/xinntao/Real-ESRGAN/releases/download/v0.2.2.4/RealESRGAN_x4plus_anime_6B.pth",
)  # fmt: skip

SDXL_BASE_1_0_3B_Q4_0 = RegistryModel(
    "SDXL_BASE_1_0_3B_Q4_0", "stable-diffusion-xl-base-1.0-Q4_0.gguf", "sdxl",
    hf_repo="gpustack/stable-diffusion-xl-base-1.0-GGUF",
)  # fmt: skip
SDXL_BASE_1_0_3B_Q8_0 = RegistryModel(
    "SDXL_BASE_1_0_3B_Q8_0", "stable-diffusion-xl-base-1.0-Q8_0.gguf", "sdxl",
    hf_repo="gpustack/stable-diffusion-xl-base-1.0-GGUF",
)  # fmt: skip
FLUX_2_KLEIN_4B_Q4_0 = RegistryModel(
    "FLUX_2_KLEIN_4B_Q4_0", "flux-2-klein-4b-Q4_0.gguf", "flux2", hf_repo="unsloth/FLUX.2-klein-4B-GGUF"
)
FLUX_2_KLEIN_4B_Q4_K_M = RegistryModel(
    "FLUX_2_KLEIN_4B_Q4_K_M", "flux-2-klein-4b-Q4_K_M.gguf", "flux2", hf_repo="unsloth/FLUX.2-klein-4B-GGUF"
)
FLUX_2_KLEIN_4B_Q6_K = RegistryModel(
    "FLUX_2_KLEIN_4B_Q6_K", "flux-2-klein-4b-Q6_K.gguf", "flux2", hf_repo="unsloth/FLUX.2-klein-4B-GGUF"
)
FLUX_2_KLEIN_4B_Q8_0 = RegistryModel(
    "FLUX_2_KLEIN_4B_Q8_0", "flux-2-klein-4b-Q8_0.gguf", "flux2", hf_repo="unsloth/FLUX.2-klein-4B-GGUF"
)
FLUX_2_KLEIN_4B_VAE = RegistryModel(
    "FLUX_2_KLEIN_4B_VAE", "flux-2-klein-4b-vae.safetensors", "vae",
    hf_repo="black-forest-labs/FLUX.2-klein-4B", hf_path="vae/diffusion_pytorch_model.safetensors",
)  # fmt: skip
QWEN3_4B_Q4_K_M = RegistryModel("QWEN3_4B_Q4_K_M", "Qwen3-4B-Q4_K_M.gguf", "llm", hf_repo="unsloth/Qwen3-4B-GGUF")

# The FLUX.1 architecture: each transformer loads with FLUX_1_AE, T5_XXL_FP16 and (but for
# Chroma) CLIP_L as its companions.
FLUX_1_DEV_Q4_0 = RegistryModel("FLUX_1_DEV_Q4_0", "flux1-dev-q4_0.gguf", "flux1", hf_repo="leejet/FLUX.1-dev-gguf")
FLUX_1_KONTEXT_DEV_Q4_0 = RegistryModel(
    "FLUX_1_KONTEXT_DEV_Q4_0", "flux1-kontext-dev-Q4_0.gguf", "flux1", hf_repo="QuantStack/FLUX.1-Kontext-dev-GGUF"
)
FLUX_1_FILL_DEV_Q4_0 = RegistryModel(
    "FLUX_1_FILL_DEV_Q4_0", "flux1-fill-dev-Q4_0.gguf", "flux1", hf_repo="YarvixPA/FLUX.1-Fill-dev-gguf"
)
FLUX_1_DEPTH_DEV = RegistryModel(
    "FLUX_1_DEPTH_DEV", "flux1-depth-dev.safetensors", "flux1", hf_repo="black-forest-labs/FLUX.1-Depth-dev"
)
FLUX_1_CANNY_DEV = RegistryModel(
    "FLUX_1_CANNY_DEV", "flux1-canny-dev.safetensors", "flux1", hf_repo="black-forest-labs/FLUX.1-Canny-dev"
)
CHROMA1_HD = RegistryModel("CHROMA1_HD", "Chroma1-HD.safetensors", "chroma", hf_repo="lodestones/Chroma1-HD")
FLUX_1_AE = RegistryModel("FLUX_1_AE", "ae.safetensors", "vae", hf_repo="black-forest-labs/FLUX.1-schnell")
T5_XXL_FP16 = RegistryModel(
    "T5_XXL_FP16", "t5xxl_fp16.safetensors", "t5xxl", hf_repo="comfyanonymous/flux_text_encoders"
)
CLIP_L = RegistryModel("CLIP_L", "clip_l.safetensors", "clip_l", hf_repo="comfyanonymous/flux_text_encoders")

# Z-Image Turbo, with FLUX_1_AE and a whole Qwen3-4B (this or QWEN3_4B_Q4_K_M).
Z_IMAGE_TURBO_BF16 = RegistryModel(
    "Z_IMAGE_TURBO_BF16", "z_image_turbo_bf16.safetensors", "z_image", hf_repo="Comfy-Org/z_image_turbo",
    hf_path="split_files/diffusion_models/z_image_turbo_bf16.safetensors",
)  # fmt: skip
QWEN3_4B = RegistryModel(
    "QWEN3_4B", "qwen_3_4b.safetensors", "llm", hf_repo="Comfy-Org/z_image_turbo",
    hf_path="split_files/text_encoders/qwen_3_4b.safetensors",
)  # fmt: skip

# Ovis-Image, with FLUX_1_AE and Ovis 2.5's Qwen3 (28 layers).
OVIS_IMAGE_BF16 = RegistryModel(
    "OVIS_IMAGE_BF16", "ovis_image_bf16.safetensors", "ovis", hf_repo="Comfy-Org/Ovis-Image",
    hf_path="split_files/diffusion_models/ovis_image_bf16.safetensors",
)  # fmt: skip
OVIS_2_5 = RegistryModel(
    "OVIS_2_5", "ovis_2.5.safetensors", "llm", hf_repo="Comfy-Org/Ovis-Image",
    hf_path="split_files/text_encoders/ovis_2.5.safetensors",
)  # fmt: skip

# ERNIE-Image and its Turbo, with Ministral 3B and FLUX.2's VAE (ERNIE_IMAGE_VAE, FLUX_2_KLEIN_4B_VAE).
ERNIE_IMAGE = RegistryModel(
    "ERNIE_IMAGE", "ernie-image.safetensors", "ernie_image", hf_repo="Comfy-Org/ERNIE-Image",
    hf_path="diffusion_models/ernie-image.safetensors",
)  # fmt: skip
ERNIE_IMAGE_TURBO = RegistryModel(
    "ERNIE_IMAGE_TURBO", "ernie-image-turbo.safetensors", "ernie_image", hf_repo="Comfy-Org/ERNIE-Image",
    hf_path="diffusion_models/ernie-image-turbo.safetensors",
)  # fmt: skip
MINISTRAL_3_3B = RegistryModel(
    "MINISTRAL_3_3B", "ministral-3-3b.safetensors", "llm", hf_repo="Comfy-Org/ERNIE-Image",
    hf_path="text_encoders/ministral-3-3b.safetensors",
)  # fmt: skip
ERNIE_IMAGE_VAE = RegistryModel(
    "ERNIE_IMAGE_VAE", "flux2-vae.safetensors", "vae", hf_repo="Comfy-Org/ERNIE-Image",
    hf_path="vae/flux2-vae.safetensors",
)  # fmt: skip

# Qwen-Image (its Edit loads alike), with the Wan 2.1 VAE and a Qwen2.5-VL 7B GGUF (llama.cpp's).
QWEN_IMAGE_Q3_K_M = RegistryModel(
    "QWEN_IMAGE_Q3_K_M", "qwen-image-Q3_K_M.gguf", "qwen_image", hf_repo="city96/Qwen-Image-gguf",
    size=9679567392, sha256="ff96f80b90f8234e498c803965857d7850f89011dde805f83f1e80aa741bcdfb",
)  # fmt: skip
QWEN_IMAGE_VAE = RegistryModel(
    "QWEN_IMAGE_VAE", "qwen_image_vae.safetensors", "vae", hf_repo="Comfy-Org/Qwen-Image_ComfyUI",
    hf_path="split_files/vae/qwen_image_vae.safetensors",
)  # fmt: skip
# Qwen2.5-VL 7B whole (16-bit, 16.6 GB; its vision tower lets the Edit read its reference images).
QWEN_2_5_VL_7B = RegistryModel(
    "QWEN_2_5_VL_7B", "qwen_2.5_vl_7b.safetensors", "llm", hf_repo="Comfy-Org/Qwen-Image_ComfyUI",
    hf_path="split_files/text_encoders/qwen_2.5_vl_7b.safetensors",
)  # fmt: skip

# Anima, with QWEN_IMAGE_VAE (the Wan 2.1 VAE) and Qwen3-0.6B base whole (28 layers); checksums from the hub.
ANIMA_BASE_V1_0 = RegistryModel(
    "ANIMA_BASE_V1_0", "anima-base-v1.0.safetensors", "anima", hf_repo="circlestone-labs/Anima",
    hf_path="split_files/diffusion_models/anima-base-v1.0.safetensors",
    sha256="bd43b7cffe1ed1153d9c41e7beb2f18cb1273eafbaa3af3edd6a173dc90a006e",
)  # fmt: skip
QWEN_3_06B_BASE = RegistryModel(
    "QWEN_3_06B_BASE", "qwen_3_06b_base.safetensors", "llm", hf_repo="circlestone-labs/Anima",
    hf_path="split_files/text_encoders/qwen_3_06b_base.safetensors",
    sha256="cd2a512003e2f9f3cd3c32a9c3573f820bb28c940f73c57b1ddaa983d9223eba",
)  # fmt: skip

REGISTRY: dict[str, RegistryModel] = {
    model.name: model
    for model in (
        SD_V2_1_1B_Q8_0, SD_V2_1_1B_Q4_0, SDXL_BASE_1_0_3B_Q4_0, SDXL_BASE_1_0_3B_Q8_0,
        FLUX_2_KLEIN_4B_Q4_0, FLUX_2_KLEIN_4B_Q4_K_M, FLUX_2_KLEIN_4B_Q6_K, FLUX_2_KLEIN_4B_Q8_0,
        FLUX_2_KLEIN_4B_VAE, QWEN3_4B_Q4_K_M, REALESRGAN_X4PLUS, REALESRGAN_X4PLUS_ANIME_6B,
        FLUX_1_DEV_Q4_0, FLUX_1_KONTEXT_DEV_Q4_0, FLUX_1_FILL_DEV_Q4_0, FLUX_1_DEPTH_DEV, FLUX_1_CANNY_DEV,
        CHROMA1_HD, FLUX_1_AE, T5_XXL_FP16, CLIP_L, Z_IMAGE_TURBO_BF16, QWEN3_4B, OVIS_IMAGE_BF16, OVIS_2_5,
        ERNIE_IMAGE, ERNIE_IMAGE_TURBO, MINISTRAL_3_3B, ERNIE_IMAGE_VAE, QWEN_IMAGE_Q3_K_M, QWEN_IMAGE_VAE,
        QWEN_2_5_VL_7B, ANIMA_BASE_V1_0, QWEN_3_06B_BASE,
    )
}  # fmt: skip

DownloadProgress = Callable[[float], None]


def cache_dir() -> Path:
    """The local model cache folder."""
    root = os.environ.get(ENV_CACHE)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "sfumato" / "models"


def cached_path(model: RegistryModel) -> Path:
    """Where ``model`` lives in the cache (whether or not it is there yet)."""
    return cache_dir() / model.filename


def _verify(model: RegistryModel, path: Path) -> None:
    if model.size is not None and path.stat().st_size != model.size:
        raise InvalidModelError(
            f"{model.name}: {path} has {path.stat().st_size} bytes, expected {model.size}; delete it and retry"
        )
    if model.sha256 is not None:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
        if digest.hexdigest() != model.sha256:
            raise InvalidModelError(f"{model.name}: {path} fails its sha256 check; delete it and retry")


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "SFUMATO_OFFLINE"))


def _unreachable(url: str) -> str | None:
    """Why ``url``'s host cannot be reached now (``None`` if a connection opens): a
    download client would retry for half a minute before saying so."""
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        return f"no connection to {host} ({exc.strerror or exc})"
    return None


def _download(model: RegistryModel, target: Path, on_progress: DownloadProgress | None) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    if model.hf_repo is not None:
        from huggingface_hub import hf_hub_download

        fetched = Path(hf_hub_download(model.hf_repo, model.remote_path, local_dir=str(partial.parent / ".hf")))
        shutil.move(str(fetched), str(target))
        return
    request = urllib.request.Request(model.source_url, headers={"User-Agent": "sfumato"})
    with urllib.request.urlopen(request, timeout=30) as response, partial.open("wb") as out:
        total = int(response.headers.get("Content-Length") or 0)
        done = 0
        for chunk in iter(lambda: response.read(1 << 20), b""):
            out.write(chunk)
            done += len(chunk)
            if on_progress is not None and total:
                on_progress(100.0 * done / total)
    partial.replace(target)


def resolve(model: RegistryModel, on_progress: DownloadProgress | None = None) -> Path:
    """Return the local path of ``model``, downloading it into the cache if needed.

    Raises
    ------
    ModelNotFoundError
        Offline or when the download fails; the message names the constant and
        says where to put the file by hand.
    """
    target = cached_path(model)
    if target.is_file():
        _verify(model, target)
        return target
    how = (
        f"download {model.source_url} and save it as {target} (or set {ENV_CACHE} to the folder "
        f"that holds {model.filename}), or pass a local path as model_src"
    )
    if _offline():
        raise ModelNotFoundError(f"{model.name} is not in the model cache and downloads are off: {how}")
    source = model.source_url
    if model.hf_repo is not None and model.url is None:
        source = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    why = _unreachable(source)
    if why is not None:
        raise ModelNotFoundError(f"{model.name} is not in the model cache and cannot be downloaded: {why}; {how}")
    try:
        _download(model, target, on_progress)
    except Exception as exc:
        raise ModelNotFoundError(f"{model.name} could not be downloaded ({type(exc).__name__}: {exc}): {how}") from exc
    _verify(model, target)
    return target

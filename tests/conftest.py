"""Shared fixtures: self-made models with random weights in the real layouts.

Model files are written once into a cache folder (``SFUMATO_TEST_MODELS``,
default ``.test-models/`` in the repository) and reused by later runs; the
names carry a layout version so that a change of generator rewrites them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from safetensors.numpy import save_file

import sfumato
from sfumato.runtime.protocol import LoadSpec
from sfumato.server.app import create_app
from sfumato.server.settings import ServerSettings
from tests.support import models
from tests.support.farm import Farm
from tests.support.postgres import PostgresServer

from .helpers import MODEL, ROOT, SIZE, CaptureSpec


@pytest.fixture(scope="session", autouse=True)
def _offline_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No test may reach the network, and registry lookups use an empty cache."""
    old = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "SFUMATO_CACHE")}
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["SFUMATO_CACHE"] = str(tmp_path_factory.mktemp("model-cache"))
    yield
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server started for the session (Debian's binaries; a Unix socket, no TCP)."""
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.remove()


@pytest.fixture
def farm(postgres: PostgresServer, sd1_tiny_gguf: Path, tmp_path: Path) -> Iterator[Farm]:
    """Front ends and workers on a new database of the session's PostgreSQL, on the suite's tiny model."""
    made = Farm(postgres.new_database(), tmp_path, sd1_tiny_gguf, [])
    yield made
    made.stop()


@pytest.fixture
def no_engine_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the SDK tries to start a worker (where the engine loads)."""

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a worker was started for a file that detection should refuse")

    monkeypatch.setattr(sfumato.api, "ModelHost", refuse)


class _Recorded(Exception):  # noqa: N818 - a signal, not an error
    pass


@pytest.fixture
def load_spec(monkeypatch: pytest.MonkeyPatch) -> CaptureSpec:
    """``load_spec(source, config)``: the :class:`LoadSpec` that ``load_model``
    would start its worker with (every check before the engine passed); no
    worker starts."""

    def capture(source: Path, config: Mapping[str, object] | None = None) -> LoadSpec:
        seen: list[LoadSpec] = []

        def record(_model: object, spec: LoadSpec, *_args: object, **_kwargs: object) -> None:
            seen.append(spec)
            raise _Recorded

        monkeypatch.setattr(sfumato.api, "ModelHost", record)
        with pytest.raises(_Recorded):
            sfumato.load_model(source, model_config=config)
        return seen[0]

    return capture


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return models.models_dir(ROOT / ".test-models")


_cached = models.cached


def _model_file(name: str, write: Callable[[Path], object]) -> Callable[[Path], Path]:
    """A session fixture writing (once) the model file ``name`` of the suite with ``write``."""

    @pytest.fixture(scope="session")
    def fixture(model_dir: Path) -> Path:
        return _cached(model_dir, name, write)

    return fixture


def _sd_model(version: str, layout: str) -> Callable[[Path], Path]:
    """A session fixture writing (once) an SD ``version`` model as ``layout``:
    ``.gguf`` / ``.safetensors`` all-in-one files, or a ``diffusers`` folder."""

    def make(target: Path) -> object:
        if layout == "diffusers":
            return models.write_diffusers_folder(target, version)
        return models.write_sd_checkpoint(target, version)

    name = f"{version}-diffusers" if layout == "diffusers" else f"{version}{layout}"

    @pytest.fixture(scope="session")
    def fixture(model_dir: Path) -> Path:
        return _cached(model_dir, name, make)

    return fixture


sd1_gguf = _sd_model("sd1", ".gguf")
sd1_tiny_gguf = _sd_model("sd1-tiny", ".gguf")
"""BK-SDM-Tiny's layout (a third of SD 1.x's UNet): where a run only has to show that
the engine runs, on the slowest machines (an emulated CPU)."""
sd1_safetensors = _sd_model("sd1", ".safetensors")
sd1_diffusers = _sd_model("sd1", "diffusers")
sd1_inpaint_gguf = _sd_model("sd1-inpaint", ".gguf")
sd1_pix2pix_gguf = _sd_model("sd1-pix2pix", ".gguf")
sd2_gguf = _sd_model("sd2", ".gguf")
sd2_safetensors = _sd_model("sd2", ".safetensors")
sd2_diffusers = _sd_model("sd2", "diffusers")


sdxl_gguf = _model_file("sdxl-q4_0.gguf", lambda p: models.write_sd_checkpoint(p, "sdxl", quant="q4_0"))
"""An all-in-one SDXL checkpoint (full-depth 2.6B UNet, CLIP-L, OpenCLIP-G, VAE) as one GGUF, its
large matrices in q4_0 as quantized releases store them (2.6 GB, not 6.9)."""


SDXL_PART_FILES = {"unet": "sdxl-unet-q4_0.gguf", "clip_l": "sdxl-clip_l.safetensors",
                   "clip_g": "sdxl-clip_g.safetensors", "vae": "sdxl-vae.safetensors"}  # fmt: skip


@pytest.fixture(scope="session")
def sdxl_parts(model_dir: Path) -> dict[str, Path]:
    """SDXL's split layout: a UNet-only GGUF (q4_0) and the CLIP-L, CLIP-G and VAE files beside it."""

    def make(path: Path, part: str) -> Path:
        return models.write_sdxl_part(path, part, quant="q4_0" if part == "unet" else None)

    return {
        part: _cached(model_dir, name, lambda p, part=part: make(p, part)) for part, name in SDXL_PART_FILES.items()
    }


@pytest.fixture(scope="session")
def sdxl_distilled_unets(model_dir: Path) -> dict[str, Path]:
    """SSD-1B's and Segmind Vega's UNets alone (q4_0), which take SDXL's split companions."""

    def make(path: Path, part: str) -> Path:
        return models.write_sdxl_part(path, part, quant="q4_0")

    return {part: _cached(model_dir, f"sdxl-{part}-q4_0.gguf", lambda p, part=part: make(p, part))
            for part in ("ssd-1b-unet", "vega-unet")}  # fmt: skip


FLUX2_PART_FILES = {"diffusion": "flux2-klein-q4_0.gguf", "llm": "flux2-qwen3-q4_0.gguf",
                    "vae": "flux2-vae.safetensors"}  # fmt: skip


def _flux2_part(model_dir: Path, part: str) -> Path:
    return _cached(model_dir, FLUX2_PART_FILES[part], lambda p: models.write_flux2_part(p, part))


@pytest.fixture(scope="session")
def flux2_parts(model_dir: Path) -> dict[str, Path]:
    """FLUX.2 [klein] 4B's split layout at its real widths: the transformer
    (one double and one single block), Qwen3-4B to layer 27 (both q4_0) and the VAE."""
    return {part: _flux2_part(model_dir, part) for part in FLUX2_PART_FILES}


@pytest.fixture(scope="session")
def flux2_headers(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same transformer and VAE, and a Qwen3 file as far as header checks go
    (its GGUF names for 36 layers, a 2560-wide embedding of a few rows): what the
    checks before the engine read, without writing 3 GB of text encoder."""
    qwen = tmp_path_factory.mktemp("qwen3") / "qwen3-header.gguf"
    names = [("token_embd.weight", np.zeros((8, 2560), np.float16))]
    names += [(f"blk.{i}.attn_norm.weight", np.ones(2560, np.float16)) for i in range(36)]
    models.write_gguf(qwen, names, arch="qwen3")
    return {"diffusion": _flux2_part(model_dir, "diffusion"), "llm": qwen, "vae": _flux2_part(model_dir, "vae")}


t5xxl_gguf = _model_file(models.T5XXL_FILE, models.write_t5xxl)
"""T5-XXL's encoder, all 24 layers (the engine builds no fewer), q4_0: SD3's and FLUX.1's text encoder."""


@pytest.fixture(scope="session")
def t5_header(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A T5-XXL file as far as header checks go: its names and 4096-wide embedding, a few rows."""
    path = tmp_path_factory.mktemp("t5") / "t5xxl.safetensors"
    tensors = {
        "shared.weight": np.zeros((8, 4096), np.float16),
        "encoder.block.0.layer.0.SelfAttention.q.weight": np.zeros((8, 4096), np.float16),
    }
    save_file(tensors, str(path))
    return path


sd3_gguf = _model_file("sd3-medium-q4_0.gguf", models.write_sd3_checkpoint)
"""SD3 Medium as ``sd3_medium.safetensors`` holds it: the full MMDiT (q4_0) and its VAE, no text encoders."""


@pytest.fixture(scope="session")
def flux1_parts(model_dir: Path) -> dict[str, Path]:
    """FLUX.1 [dev] at its real widths (one block of each kind, q4_0) and its 16-channel VAE."""
    return {
        "diffusion": _cached(model_dir, "flux1-dev-q4_0.gguf", lambda p: models.write_flux1_part(p, "diffusion")),
        "vae": _cached(model_dir, "flux1-ae.safetensors", lambda p: models.write_flux1_part(p, "vae")),
    }


chroma_gguf = _model_file("chroma-q4_0.gguf", lambda p: models.write_flux1_part(p, "chroma"))
"""Chroma1-HD's transformer at its real widths (one block of each kind and the full modulation network, q4_0)."""


chroma_radiance_gguf = _model_file("chroma-radiance-q4_0.gguf", lambda p: models.write_flux1_part(p, "chroma-radiance"))
"""Chroma1-Radiance's transformer (pixel space) at its real widths, one block of each kind, q4_0."""


ovis_gguf = _model_file("ovis-image-q4_0.gguf", lambda p: models.write_flux1_part(p, "ovis"))
"""Ovis-Image's MMDiT at FLUX.1's widths (one block of each kind, q4_0)."""


ovis_llm = _model_file("ovis-qwen3-q4_0.gguf", models.write_ovis_llm)
"""Ovis 2.5's Qwen3 (2B, all 28 layers: the engine sets its heads by that depth), q4_0."""


z_image_gguf = _model_file("z-image-q4_0.gguf", models.write_z_image)
"""Z-Image's transformer, whole (6.6B parameters, q4_0, 3.7 GB)."""


qwen3_4b_gguf = _model_file("qwen3-4b-q4_0.gguf", models.write_qwen3_4b)
"""Qwen3-4B, whole (36 layers), q4_0: Z-Image's text encoder."""


ernie_image_gguf = _model_file("ernie-image-q4_0.gguf", models.write_ernie_image)
"""ERNIE-Image's transformer at its real widths with one layer, q4_0."""


ministral_3b_gguf = _model_file("ministral-3b-q4_0.gguf", models.write_ministral_3b)
"""Ministral 3B, whole (26 layers), q4_0: ERNIE-Image's text encoder."""


qwen_image_gguf = _model_file("qwen-image-q4_0.gguf", models.write_qwen_image)
"""Qwen-Image's transformer at its real widths with one block, q4_0."""


qwen25_vl_gguf = _model_file("qwen2.5-vl-7b-1-layer-q4_0.gguf", models.write_qwen25_vl)
"""Qwen2.5-VL 7B's language model at its real widths with one layer, q4_0: Qwen-Image's text encoder."""


wan_vae = _model_file("wan2.1-vae.safetensors", models.write_wan_vae)
"""The Wan 2.1 VAE, whole: Qwen-Image's."""


anima_gguf = _model_file("anima-q4_0.gguf", models.write_anima)
"""Anima's DiT at its real widths with one block (its LLM adapter whole), q4_0."""


qwen3_0_6b_gguf = _model_file("qwen3-0.6b-q4_0.gguf", models.write_qwen3_0_6b)
"""Qwen3-0.6B whole (28 layers), q4_0: Anima's text encoder."""


flux1_fill_gguf = _model_file("flux1-fill-q4_0.gguf", lambda p: models.write_flux1_part(p, "fill"))
"""FLUX.1 Fill [dev]'s transformer (384 input channels) at its real widths, one block of each kind, q4_0."""


flux1_depth_gguf = _model_file("flux1-depth-q4_0.gguf", lambda p: models.write_flux1_part(p, "depth"))
"""FLUX.1 Depth [dev]'s transformer (128 input channels; Canny's layout too), one block of each kind, q4_0."""


taesd = _model_file("taesd.safetensors", models.write_taesd)
"""TAESD, the tiny autoencoder of SD 1.x / 2.x latents (4.7 MB)."""


sd1_controlnet = _model_file("sd1-controlnet.safetensors", models.write_controlnet)
"""A ControlNet for the SD 1.x UNet, as the v1.1 releases store it (722 MB, f16)."""


esrgan_6b = _model_file("esrgan-6b.pth", lambda p: models.write_esrgan(p, num_block=6))
"""The layout of RealESRGAN_x4plus_anime_6B.pth (6 RRDB blocks, x4)."""


esrgan_1b = _model_file("esrgan-1b.pth", lambda p: models.write_esrgan(p, num_block=1))
"""The x4plus layout reduced to one RRDB block: the engine reads the depth from the file, and the
upscale tests that compound x16 stay fast."""


sd1_lora = _model_file("sd1-lora.safetensors", models.write_sd1_lora)
sd1_tiny_lora = _model_file(
    "sd1-tiny-lora.safetensors", lambda p: models.write_sd1_lora(p, attentions=models.SD1_TINY_ATTENTIONS)
)
"""A kohya-layout LoRA on every attention projection of the SD 1.x UNet."""


@pytest.fixture(scope="session")
def sd1_model(sd1_tiny_gguf: Path, esrgan_1b: Path) -> Iterator[str]:
    """An SD 1.x model (BK-SDM-Tiny's layout) loaded through the SDK, paired with an
    ESRGAN, shared by the session."""
    model_id = sfumato.load_model(sd1_tiny_gguf, model_config={"threads": 2, "upscaler": {"model_src": esrgan_1b}})
    yield model_id
    if model_id in sfumato.loaded_models():
        sfumato.unload_model(model_id)


@pytest.fixture(scope="session")
def upscaler_model(esrgan_1b: Path) -> Iterator[str]:
    """A standalone ESRGAN loaded with ``mode="upscale"``."""
    model_id = sfumato.load_model(esrgan_1b, model_config={"mode": "upscale", "threads": 2})
    yield model_id
    if model_id in sfumato.loaded_models():
        sfumato.unload_model(model_id)


@pytest.fixture(scope="session")
def gradient_image() -> np.ndarray:
    """A 64x64 RGB test picture with structure in every channel."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    return np.stack([x * 4, y * 4, (x + y) * 2], axis=2).astype(np.uint8)


@pytest.fixture
def settings(tmp_path: Path, sd1_tiny_gguf: Path, esrgan_1b: Path) -> ServerSettings:
    """Folders like a user's: one SD 1.x model, one ESRGAN, no LoRA yet."""
    for folder, name, target in (("models", f"{MODEL}.gguf", sd1_tiny_gguf), ("upscalers", "esrgan-x4.pth", esrgan_1b)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / name).symlink_to(target)
    (tmp_path / "models" / "notes.gguf").write_bytes(b"not a model")  # never offered
    return ServerSettings(
        models_dir=tmp_path / "models", loras_dir=tmp_path / "loras", upscalers_dir=tmp_path / "upscalers",
        data_dir=tmp_path / "data", threads=2,
    )  # fmt: skip


@pytest.fixture
def client(settings: ServerSettings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c

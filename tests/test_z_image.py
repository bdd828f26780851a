"""Z-Image: detection and the Qwen3 check before any engine call (on header files), and
real engine runs from the SDK and the job-queue API on the whole 6.6B transformer (the
engine builds no shallower one) and the whole Qwen3-4B (it reads layer 35 of 36), both
q4_0 and written once: ``heavy``."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

import sfumato
from sfumato import errors
from sfumato.families.detect import FAMILY_Z_IMAGE, detect
from sfumato.images import decode_png
from sfumato.server.app import create_app
from sfumato.server.settings import ServerSettings

from .helpers import SIZE, header_file, llm_header, pixels, run, wait_job


@pytest.fixture
def z_image_header(tmp_path: Path) -> Path:
    """A Z-Image transformer as far as detection reads it (ComfyUI's checkpoint prefix)."""
    return header_file(tmp_path / "z_image_turbo.safetensors", {
        "model.diffusion_model.cap_embedder.0.weight": (2560,),
        "model.diffusion_model.cap_embedder.1.weight": (8, 2560),
    })  # fmt: skip


def test_z_image_is_detected_from_its_header(z_image_header: Path) -> None:
    info = detect(z_image_header)
    assert (info.family, info.split, info.has_vae, info.text_width) == (FAMILY_Z_IMAGE, True, False, 2560)


@pytest.mark.usefixtures("no_engine_calls")
def test_z_image_needs_the_whole_qwen3_4b_and_a_16_channel_vae(
    z_image_header: Path, flux1_parts: dict[str, Path], sdxl_parts: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(errors.InvalidParameterError, match="pass its Qwen3 text encoder") as caught:
        sfumato.load_model(z_image_header, model_config={"vae_model_src": flux1_parts["vae"]})
    assert caught.value.field == "model_config.llm_model_src"
    # FLUX.2 [klein]'s Qwen3-4B file stops at layer 27; Z-Image reads layer 35.
    klein_s = header_file(tmp_path / "qwen3-4b-27.safetensors", {
        "model.embed_tokens.weight": (8, 2560), "model.layers.26.mlp.gate_proj.weight": (8, 8),
    })  # fmt: skip
    config = {"llm_model_src": klein_s, "vae_model_src": flux1_parts["vae"]}
    with pytest.raises(errors.InvalidParameterError, match=r"27-layer .*; Z-Image reads Qwen3-4B \(36 layers"):
        sfumato.load_model(z_image_header, model_config=config)
    whole = llm_header(tmp_path)
    config = {"llm_model_src": whole, "vae_model_src": sdxl_parts["vae"]}
    with pytest.raises(errors.InvalidParameterError, match="4 latent channels; Z-Image decodes 16") as caught:
        sfumato.load_model(z_image_header, model_config=config)
    assert caught.value.field == "model_config.vae_model_src"


@pytest.fixture(scope="module")
def z_image_model(z_image_gguf: Path, qwen3_4b_gguf: Path, flux1_parts: dict[str, Path]) -> Iterator[str]:
    config = {"llm_model_src": qwen3_4b_gguf, "vae_model_src": flux1_parts["vae"], "threads": 2}
    model_id = sfumato.load_model(z_image_gguf, model_config=config)
    yield model_id
    sfumato.unload_model(model_id)


@pytest.mark.heavy
def test_z_image_generates_from_the_sdk(z_image_model: str) -> None:
    cat, stats, _ = run(z_image_model, prompt="a cat", steps=1, seed=3)  # cfg_scale 1, Turbo's
    dog, _, _ = run(z_image_model, prompt="a dog", steps=1, seed=3)
    picture = decode_png(cat[0])
    assert picture.shape == (SIZE, SIZE, 3) and picture.std() > 0 and stats.total_steps == 1
    assert not np.array_equal(picture, decode_png(dog[0]))  # the prompt reaches the transformer


@pytest.mark.heavy
def test_z_image_is_served_by_the_job_queue(
    tmp_path: Path, z_image_gguf: Path, qwen3_4b_gguf: Path, flux1_parts: dict[str, Path]
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    for name, target in (("z-image.gguf", z_image_gguf), ("qwen3-4b.gguf", qwen3_4b_gguf),
                         ("ae.safetensors", flux1_parts["vae"])):  # fmt: skip
        (models / name).symlink_to(target)
    (models / "models.toml").write_text(
        '[models.z-image]\nfile = "z-image.gguf"\nllm = "qwen3-4b.gguf"\nvae = "ae.safetensors"\nsteps = 1\n'
    )
    settings = ServerSettings(models_dir=models, loras_dir=tmp_path / "loras", upscalers_dir=tmp_path / "upscalers",
                              data_dir=tmp_path / "data", threads=2)  # fmt: skip
    with TestClient(create_app(settings)) as client:
        listed = {m["name"]: m["family"] for m in client.get("/models").json()["models"]}
        assert listed["z-image"] == "Z-Image"
        body = {"prompt": "a lighthouse", "model": "z-image", "seed": 4, "width": SIZE, "height": SIZE}
        job_id = client.post("/txt2img", json=body).json()["job_id"]
        done = wait_job(client, job_id)
    assert done["state"] == "done", done
    picture = pixels(base64.b64decode(done["image"]))
    assert picture.shape == (SIZE, SIZE, 3) and picture.std() > 0

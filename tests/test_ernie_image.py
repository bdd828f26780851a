"""ERNIE-Image: detection and the Ministral 3B check before any engine call, and real
engine runs from the SDK and the job-queue API: the transformer at its real widths with
one layer (the engine reads the depth from the file), Ministral 3B whole (it reads layer
25 of 26) and FLUX.2's 32-channel VAE, all written by the suite."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

import sfumato
from sfumato import errors
from sfumato.families.detect import FAMILY_ERNIE_IMAGE, detect
from sfumato.images import decode_png
from sfumato.server.app import create_app
from sfumato.server.settings import ServerSettings

from .helpers import SIZE, llm_header, pixels, run, wait_job


def test_ernie_image_is_detected_from_its_header(ernie_image_gguf: Path) -> None:
    info = detect(ernie_image_gguf)
    assert (info.family, info.split, info.has_vae, info.text_width) == (FAMILY_ERNIE_IMAGE, True, False, 3072)


@pytest.mark.usefixtures("no_engine_calls")
def test_ernie_image_names_its_ministral_and_its_vae(
    ernie_image_gguf: Path, flux1_parts: dict[str, Path], flux2_parts: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(errors.InvalidParameterError, match="pass its Ministral 3B text encoder") as caught:
        sfumato.load_model(ernie_image_gguf, model_config={"vae_model_src": flux2_parts["vae"]})
    assert caught.value.field == "model_config.llm_model_src"
    qwen3 = llm_header(tmp_path)
    config = {"llm_model_src": qwen3, "vae_model_src": flux2_parts["vae"]}
    with pytest.raises(errors.InvalidParameterError, match=r"2560 wide; ERNIE-Image reads Ministral 3B") as caught:
        sfumato.load_model(ernie_image_gguf, model_config=config)
    assert caught.value.field == "model_config.llm_model_src"


@pytest.mark.slow
def test_ernie_image_generates_from_the_sdk_and_the_job_queue(
    ernie_image_gguf: Path, ministral_3b_gguf: Path, flux2_parts: dict[str, Path], flux1_parts: dict[str, Path],
    tmp_path: Path,
) -> None:  # fmt: skip
    with pytest.raises(errors.InvalidParameterError, match="16 latent channels; ERNIE-Image decodes 32"):
        sfumato.load_model(ernie_image_gguf, model_config={"llm_model_src": ministral_3b_gguf,
                                                           "vae_model_src": flux1_parts["vae"]})  # fmt: skip
    config = {"llm_model_src": ministral_3b_gguf, "vae_model_src": flux2_parts["vae"], "threads": 2}
    model_id = sfumato.load_model(ernie_image_gguf, model_config=config)
    try:
        cat, stats, _ = run(model_id, prompt="a cat", steps=1, seed=3)
        dog, _, _ = run(model_id, prompt="a dog", steps=1, seed=3)
    finally:
        sfumato.unload_model(model_id)
    picture = decode_png(cat[0])
    assert picture.shape == (SIZE, SIZE, 3) and picture.std() > 0 and stats.total_steps == 1
    assert not np.array_equal(picture, decode_png(dog[0]))  # the prompt reaches the transformer

    models = tmp_path / "models"
    models.mkdir()
    for name, target in (("ernie.gguf", ernie_image_gguf), ("ministral.gguf", ministral_3b_gguf),
                         ("vae.safetensors", flux2_parts["vae"])):  # fmt: skip
        (models / name).symlink_to(target)
    (models / "models.toml").write_text(
        '[models.ernie]\nfile = "ernie.gguf"\nllm = "ministral.gguf"\nvae = "vae.safetensors"\nsteps = 1\n'
    )
    settings = ServerSettings(models_dir=models, loras_dir=tmp_path / "loras", upscalers_dir=tmp_path / "upscalers",
                              data_dir=tmp_path / "data", threads=2)  # fmt: skip
    with TestClient(create_app(settings)) as client:
        assert {m["name"]: m["family"] for m in client.get("/models").json()["models"]}["ernie"] == "ERNIE-Image"
        body = {"prompt": "a lighthouse", "model": "ernie", "seed": 4, "width": SIZE, "height": SIZE}
        done = wait_job(client, client.post("/txt2img", json=body).json()["job_id"])
    assert done["state"] == "done", done
    assert pixels(base64.b64decode(done["image"])).std() > 0

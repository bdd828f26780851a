"""instruct-pix2pix on the real engine: an SD 1.x UNet that also takes the latent of the
image it edits (4 + 4 channels), found from its header, driven by the SDK's
``init_images`` and ``img_cfg_scale`` and by A1111's img2img with ``image_cfg_scale``."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import sfumato
from sfumato.families.detect import detect
from sfumato.server.app import create_app
from sfumato.server.settings import ServerSettings

from .helpers import SIZE, gradient, png_bytes, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pix2pix(sd1_pix2pix_gguf: Path) -> Iterator[str]:
    model_id = sfumato.load_model(sd1_pix2pix_gguf, model_config={"threads": 2})
    yield model_id
    sfumato.unload_model(model_id)


def test_the_variant_is_read_from_the_header(sd1_pix2pix_gguf: Path) -> None:
    info = detect(sd1_pix2pix_gguf)
    assert (info.family, info.variant) == ("sd1", "pix2pix")


def test_it_edits_its_image_guided_by_img_cfg_scale(pix2pix: str) -> None:
    picture, other = png_bytes(gradient(SIZE)), png_bytes(gradient(SIZE)[::-1].copy())
    edited, _, _ = run(pix2pix, init_images=[picture], img_cfg_scale=1.5)
    assert run(pix2pix, init_images=[picture], img_cfg_scale=1.5)[0] == edited  # the same request, the same image
    assert run(pix2pix, init_images=[picture], img_cfg_scale=4.0)[0] != edited  # the image guidance reaches it
    assert run(pix2pix, init_images=[other], img_cfg_scale=1.5)[0] != edited  # and so does the image
    # An img2img source is the image it edits when init_images names none.
    assert run(pix2pix, init_image=picture, strength=1.0, img_cfg_scale=1.5)[0] != edited
    with pytest.raises(sfumato.InvalidParameterError, match="edits an image") as caught:
        sfumato.diffusion(pix2pix, prompt="make it blue", width=SIZE, height=SIZE)
    assert caught.value.field == "init_images"
    with pytest.raises(sfumato.InvalidParameterError, match="edits one image"):
        sfumato.diffusion(pix2pix, prompt="x", width=SIZE, height=SIZE, init_images=[picture, other])


def test_a1111_img2img_takes_image_cfg_scale(sd1_pix2pix_gguf: Path, tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "edit.gguf").symlink_to(sd1_pix2pix_gguf)
    settings = ServerSettings(models_dir=tmp_path / "models", data_dir=tmp_path / "data", threads=2)
    body = {"prompt": "make it blue", "init_images": [base64.b64encode(png_bytes(gradient(SIZE))).decode()],
            "width": SIZE, "height": SIZE, "steps": 2, "seed": 5, "denoising_strength": 1.0}  # fmt: skip
    with TestClient(create_app(settings)) as client:
        images = []
        for scale in (1.5, 4.0):
            answer = client.post("/sdapi/v1/img2img", json={**body, "image_cfg_scale": scale})
            assert answer.status_code == 200, answer.text
            images.append(answer.json()["images"][0])
        assert images[0] != images[1]
        bad = client.post("/sdapi/v1/img2img", json={**body, "image_cfg_scale": -1})
        assert bad.status_code == 422 and bad.json()["field"] == "image_cfg_scale", bad.text

"""instruct-pix2pix on the real engine: an SD 1.x UNet that also takes the latent of the
image it edits (4 + 4 channels), found from its header, driven by the SDK's
``init_images`` and ``img_cfg_scale``; over HTTP by A1111's img2img with
``image_cfg_scale``, the job queue's and OpenAI's ``img_cfg_scale``, the models config's
``img_cfg_scale`` default, and ComfyUI's ``InstructPixToPixConditioning`` with
``KSampler`` or ``DualCFGGuider``."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

import sfumato
from sfumato.families.detect import detect
from sfumato.server.app import create_app
from sfumato.server.settings import ServerSettings

from .helpers import SIZE, error_body, gradient, pixels, png_bytes, run, wait_history, wait_job

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


@pytest.fixture(scope="module")
def client(sd1_pix2pix_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """The pix2pix UNet served as ``edit``, and by the models config as ``edit-strong``,
    whose image guidance defaults to 4."""
    root = tmp_path_factory.mktemp("pix2pix")
    (root / "models").mkdir()
    (root / "models" / "edit.gguf").symlink_to(sd1_pix2pix_gguf)
    (root / "models" / "models.toml").write_text('[models.edit-strong]\nfile = "edit.gguf"\nimg_cfg_scale = 4.0\n')
    settings = ServerSettings(models_dir=root / "models", data_dir=root / "data", threads=2)
    with TestClient(create_app(settings)) as client:
        yield client


SOURCE = png_bytes(gradient(SIZE))
B64_SOURCE = base64.b64encode(SOURCE).decode()


def test_a1111_img2img_takes_image_cfg_scale(client: TestClient) -> None:
    body = {"prompt": "make it blue", "init_images": [B64_SOURCE], "width": SIZE, "height": SIZE, "steps": 2,
            "seed": 5, "denoising_strength": 1.0, "override_settings": {"sd_model_checkpoint": "edit"}}  # fmt: skip
    images = []
    for scale in (1.5, 4.0):
        answer = client.post("/sdapi/v1/img2img", json={**body, "image_cfg_scale": scale})
        assert answer.status_code == 200, answer.text
        images.append(pixels(base64.b64decode(answer.json()["images"][0])))
    assert np.abs(images[0].astype(int) - images[1]).max() > 0
    # The models config's img_cfg_scale is what a request leaving it out runs with.
    strong = client.post(
        "/sdapi/v1/img2img", json={**body, "override_settings": {"sd_model_checkpoint": "edit-strong"}}
    )
    assert strong.status_code == 200, strong.text
    assert np.array_equal(pixels(base64.b64decode(strong.json()["images"][0])), images[1])
    error_body(client.post("/sdapi/v1/img2img", json={**body, "image_cfg_scale": -1}), 422, "image_cfg_scale")


def _job_pixels(client: TestClient, **fields: Any) -> np.ndarray:
    body = {"prompt": "make it blue", "init_image": B64_SOURCE, "width": SIZE, "height": SIZE, "steps": 2,
            "seed": 5, "strength": 1.0, "fileType": "png", "model": "edit", **fields}  # fmt: skip
    accepted = client.post("/img2img", json=body)
    assert accepted.status_code == 200, accepted.text
    done = wait_job(client, accepted.json()["job_id"])
    assert done["state"] == "done", done
    return pixels(base64.b64decode(done["image"]))


def test_the_job_queue_and_openai_take_img_cfg_scale(client: TestClient) -> None:
    weak, strong = _job_pixels(client, img_cfg_scale=1.5), _job_pixels(client, img_cfg_scale=4.0)
    assert np.abs(weak.astype(int) - strong).max() > 0
    assert np.array_equal(_job_pixels(client, model="edit-strong"), strong)  # the config's default
    error_body(client.post("/img2img", json={"prompt": "x", "init_image": B64_SOURCE, "img_cfg_scale": 60}), 422,
               "img_cfg_scale")  # fmt: skip

    # OpenAI's images.edit takes it as a form field; left out, the model's default applies.
    form = {"prompt": "make it blue", "size": f"{SIZE}x{SIZE}", "steps": "2", "seed": "5"}
    edited = []
    for model, extra in (("edit", {"img_cfg_scale": "1.5"}), ("edit", {"img_cfg_scale": "4"}), ("edit-strong", {})):
        answer = client.post("/v1/images/edits", data={**form, "model": model, **extra},
                             files={"image": ("in.png", SOURCE, "image/png")})  # fmt: skip
        assert answer.status_code == 200, answer.text
        edited.append(pixels(base64.b64decode(answer.json()["data"][0]["b64_json"])))
    assert np.abs(edited[0].astype(int) - edited[1]).max() > 0 and np.array_equal(edited[1], edited[2])
    bad = client.post("/v1/images/edits", data={**form, "img_cfg_scale": "-2"},
                      files={"image": ("in.png", SOURCE, "image/png")})  # fmt: skip
    assert bad.status_code == 422 and "img_cfg_scale" in bad.text, bad.text
    generated = client.post("/v1/images/generations", json={"prompt": "x", "model": "edit", "img_cfg_scale": 51})
    error_body(generated, 422, "img_cfg_scale")


def _pix2pix_graph(image: str, guider: dict[str, Any] | None = None) -> dict[str, Any]:
    """InstructPixToPixConditioning, then a KSampler (or, with ``guider``'s inputs, a
    DualCFGGuider and SamplerCustomAdvanced with the same sampler, schedule and seed)."""
    graph: dict[str, Any] = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "edit.gguf"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "make it blue", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "LoadImage", "inputs": {"image": image}},
        "5": {"class_type": "InstructPixToPixConditioning", "inputs": {
            "positive": ["2", 0], "negative": ["3", 0], "vae": ["1", 2], "pixels": ["4", 0]}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["5", 0], "negative": ["5", 1], "latent_image": ["5", 2], "seed": 9,
            "steps": 2, "cfg": 3.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "edit"}},
    }  # fmt: skip
    if guider is not None:
        del graph["6"]
        graph.update({
            "10": {"class_type": "DualCFGGuider", "inputs": {
                "model": ["1", 0], "cond1": ["5", 0], "cond2": ["5", 1], "negative": ["3", 0], **guider}},
            "11": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
            "12": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "normal", "steps": 2,
                                                              "denoise": 1.0}},
            "13": {"class_type": "RandomNoise", "inputs": {"noise_seed": 9}},
            "14": {"class_type": "SamplerCustomAdvanced", "inputs": {
                "noise": ["13", 0], "guider": ["10", 0], "sampler": ["11", 0], "sigmas": ["12", 0],
                "latent_image": ["5", 2]}},
        })  # fmt: skip
        graph["7"]["inputs"]["samples"] = ["14", 0]
    return graph


def _comfy_pixels(client: TestClient, graph: dict[str, Any]) -> np.ndarray:
    accepted = client.post("/prompt", json={"prompt": graph})
    assert accepted.status_code == 200, accepted.text
    [image] = wait_history(client, accepted.json()["prompt_id"])["outputs"]["8"]["images"]
    return pixels(client.get("/view", params=image).content)


def test_comfyui_instruct_pix2pix_conditioning_with_either_guidance(client: TestClient) -> None:
    upload = client.post("/upload/image", files={"image": ("source.png", SOURCE, "image/png")})
    assert upload.status_code == 200, upload.text
    info = client.get("/object_info/DualCFGGuider").json()["DualCFGGuider"]
    assert info["input"]["optional"]["style"][0] == ["regular"] and "cfg_cond2_negative" in info["input"]["required"]
    # A KSampler between InstructPixToPixConditioning's two prompts guides by the image at 1
    # (ComfyUI's single cfg between two prompts that both carry it): DualCFGGuider with
    # cfg_cond2_negative 1 is the same sampling; the image guidance reaches the engine.
    single = _comfy_pixels(client, _pix2pix_graph("source.png"))
    dual = _comfy_pixels(client, _pix2pix_graph("source.png", {"cfg_conds": 3.0, "cfg_cond2_negative": 1.0}))
    assert np.array_equal(single, dual)
    strong = _comfy_pixels(client, _pix2pix_graph("source.png", {"cfg_conds": 3.0, "cfg_cond2_negative": 4.0}))
    assert np.abs(strong.astype(int) - dual).max() > 0

    # What DualCFGGuider cannot mean for the engine is refused on its input.
    def refused(graph: dict[str, Any]) -> tuple[str, str]:
        answer = client.post("/prompt", json={"prompt": graph})
        assert answer.status_code == 400, answer.text
        [error] = answer.json()["node_errors"]["10"]["errors"]
        return error["extra_info"]["input_name"], error["details"]

    guider = {"cfg_conds": 3.0, "cfg_cond2_negative": 2.0}
    plain = _pix2pix_graph("source.png", guider)
    plain["10"]["inputs"]["cond1"] = ["2", 0]  # the prompt without the image
    assert refused(plain)[0] == "cond1"
    worded = _pix2pix_graph("source.png", guider)
    worded["3"]["inputs"]["text"] = "blurry"  # negative and cond2 differ in text...
    worded["15"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}}
    worded["10"]["inputs"]["negative"] = ["15", 0]
    assert refused(worded)[0] == "cond2"
    nested = _pix2pix_graph("source.png", {**guider, "style": "nested"})
    assert refused(nested)[0] == "style"

"""The AUTOMATIC1111 API (``/sdapi/v1``) on the real engine, as its clients call it."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from fastapi.testclient import TestClient
from PIL import Image, PngImagePlugin

import sfumato
from sfumato.server.app import create_app
from sfumato.server.settings import ServerSettings

from .helpers import MODEL, SIZE, default_graph, error_body, pixels, wait_history

API = "/sdapi/v1"


def _b64_png(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _size(b64: str) -> tuple[int, int]:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as image:
        return image.size


def _body(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": "a cat", "steps": 2, "width": SIZE, "height": SIZE, "seed": 3}
    body.update(fields)
    return body


def test_txt2img_batches_and_info(client: TestClient) -> None:
    response = client.post(f"{API}/txt2img", json=_body(sampler_name="Euler a", batch_size=2, restore_faces=False))
    assert response.status_code == 200, response.text
    out = response.json()
    assert [_size(i) for i in out["images"]] == [(SIZE, SIZE)] * 2
    assert len(set(out["images"])) == 2
    info = json.loads(out["info"])
    assert info["seed"] == 3 and info["all_seeds"] == [3, 4] and info["sd_model_name"] == MODEL
    # Each PNG carries A1111's generation parameters, as png-info reads them back.
    for i, image in enumerate(out["images"]):
        read = client.post(f"{API}/png-info", json={"image": image}).json()
        assert read["info"] == info["infotexts"][i]
        fields = read["parameters"]
        assert (fields["Prompt"], fields["Seed"], fields["Steps"], fields["Sampler"], fields["Size"]) == (
            "a cat", str(3 + i), "2", "Euler a", f"{SIZE}x{SIZE}")  # fmt: skip
        assert fields["Model"] == MODEL and fields["CFG scale"] == "7.0"
    assert out["parameters"]["sampler_name"] == "Euler a" and out["parameters"]["batch_size"] == 2


def test_img2img(client: TestClient, gradient_image: np.ndarray) -> None:
    body = _body(init_images=[_b64_png(gradient_image)], denoising_strength=0.5)
    out = client.post(f"{API}/img2img", json=body).json()
    assert [_size(i) for i in out["images"]] == [(SIZE, SIZE)]
    error_body(client.post(f"{API}/img2img", json={**body, "init_images": ["nope!"]}), 422, "init_images")


def test_listings_and_options(client: TestClient) -> None:
    assert [m["model_name"] for m in client.get(f"{API}/sd-models").json()] == [MODEL]
    assert {"Euler a", "DPM++ 2M Karras"} <= {s["name"] for s in client.get(f"{API}/samplers").json()}
    assert "karras" in {s["name"] for s in client.get(f"{API}/schedulers").json()}
    assert [u["name"] for u in client.get(f"{API}/upscalers").json()] == ["None", "Lanczos", "Nearest", "esrgan-x4"]
    assert client.get(f"{API}/loras").json() == []
    # One name for the model: sd-models' title is what options' sd_model_checkpoint says.
    [listed] = client.get(f"{API}/sd-models").json()
    assert client.get(f"{API}/options").json()["sd_model_checkpoint"] == listed["title"] == f"{MODEL}.gguf"
    error_body(client.post(f"{API}/options", json={"sd_model_checkpoint": "sdxl"}), 422, "sd_model_checkpoint")
    assert client.post(f"{API}/options", json={"sd_model_checkpoint": f"{MODEL}.gguf [abc123]"}).status_code == 200
    error_body(client.post(f"{API}/txt2img", json=_body(width=100)), 422, "width")
    error_body(client.post(f"{API}/txt2img", json=_body(refiner_checkpoint="x")), 422, "refiner_checkpoint")
    refined = client.post(f"{API}/txt2img", json=_body(refiner_checkpoint=MODEL, refiner_switch_at=0.5))
    assert refined.status_code == 200, refined.text
    assert len(refined.json()["images"]) == 1


def test_progress_and_interrupt(client: TestClient) -> None:
    assert client.get(f"{API}/progress").json()["progress"] == 0.0
    answer: dict[str, Any] = {}

    def generate() -> None:
        answer["response"] = client.post(f"{API}/txt2img", json=_body(steps=150))

    caller = threading.Thread(target=generate)
    caller.start()
    deadline = time.monotonic() + 120
    while True:
        progress = client.get(f"{API}/progress").json()
        if progress["state"]["sampling_step"] >= 2:
            break
        assert time.monotonic() < deadline, progress
        time.sleep(0.1)
    assert progress["state"]["sampling_steps"] == 150 and 0 < progress["progress"] < 1
    assert client.post(f"{API}/interrupt").status_code == 200
    caller.join(60)
    out = answer["response"].json()
    assert answer["response"].status_code == 200 and out["images"] == []
    assert json.loads(out["info"])["interrupted"] is True


def test_extra_single_image(client: TestClient, gradient_image: np.ndarray) -> None:
    body = {"image": _b64_png(gradient_image[:16, :16]), "upscaler_1": "esrgan-x4", "upscaling_resize": 2}
    out = client.post(f"{API}/extra-single-image", json=body).json()
    assert _size(out["image"]) == (32, 32)
    error_body(client.post(f"{API}/extra-single-image", json={**body, "upscaler_1": "x"}), 422, "upscaler_1")
    # Found by the fuzzing: a factor that rounds a side to 0, or an output past the pixel limit.
    error_body(
        client.post(f"{API}/extra-single-image", json={**body, "upscaling_resize": 0.01}), 422, "upscaling_resize"
    )
    big = {"image": _b64_png(np.zeros((2100, 2100, 3), np.uint8)), "upscaler_1": "esrgan-x4", "upscaling_resize": 4}
    error_body(client.post(f"{API}/extra-single-image", json=big), 422, "upscaling_resize")


# A1111's latent upscale modes (modules/shared_items.py), every one of which hr_upscaler takes.
A1111_LATENT_MODES = ["Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)",
                      "Latent (nearest)", "Latent (nearest-exact)"]  # fmt: skip


def test_every_listing_route(client: TestClient, settings: ServerSettings) -> None:
    get = lambda route: client.get(f"{API}/{route}")  # noqa: E731
    assert sorted(m["name"] for m in get("latent-upscale-modes").json()) == sorted(A1111_LATENT_MODES)
    for route in ("sd-vae", "hypernetworks", "face-restorers", "prompt-styles", "script-info", "extensions"):
        assert get(route).json() == [], route  # none of these exist here: empty lists, as A1111 with none
    assert get("scripts").json() == {"txt2img": [], "img2img": []}
    [esrgan] = get("realesrgan-models").json()
    assert (esrgan["name"], esrgan["scale"], esrgan["path"]) == (
        "esrgan-x4",
        4,
        str(settings.upscalers_dir / "esrgan-x4.pth"),
    )
    memory = get("memory").json()
    assert memory["ram"]["total"] == psutil.virtual_memory().total
    assert memory["ram"]["free"] + memory["ram"]["used"] == memory["ram"]["total"]
    assert "CPU" in memory["cuda"]["error"]  # no CUDA device here: the error names the engine's devices
    flags = get("cmd-flags").json()
    assert flags["ckpt_dir"] == str(settings.models_dir) and flags["lora_dir"] == str(settings.loras_dir)
    assert client.get("/internal/ping").json() == {}
    assert client.get("/queue/status").json()["queue_size"] == 0
    # A model dropped in the folder is listed after refresh-checkpoints (and before it: folders are read each time).
    (settings.models_dir / "second.gguf").symlink_to((settings.models_dir / f"{MODEL}.gguf").resolve())
    assert client.post(f"{API}/refresh-checkpoints").status_code == 200
    assert sorted(m["title"] for m in get("sd-models").json()) == ["second.gguf", f"{MODEL}.gguf"]
    for route in ("refresh-vae", "refresh-loras", "refresh-embeddings"):
        assert client.post(f"{API}/{route}").status_code == 200
    # What sfumato cannot do answers A1111's error shape, saying so.
    for route in ("interrogate", "skip", "server-kill", "train/embedding", "create/hypernetwork"):
        refused = client.post(f"{API}/{route}", json={})
        assert refused.status_code == 400 and set(refused.json()) == {"error", "detail", "body", "errors"}, route


def _as(user: str) -> dict[str, str]:
    """HTTP Basic headers of an A1111 client started with ``--api-auth USER:password``."""
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:password".encode()).decode()}


def _sampling_step(client: TestClient, user: str) -> int:
    return int(client.get(f"{API}/progress", headers=_as(user)).json()["state"]["sampling_step"])


def test_progress_and_interrupt_reach_only_the_clients_own_jobs(client: TestClient) -> None:
    """They name no job: a client (its Basic-auth user, else its address) sees and stops
    only the A1111 jobs it sent, never another client's or another API's."""
    other_api = client.post("/txt2img", json={"prompt": "x", "width": SIZE, "height": SIZE, "steps": 150}).json()
    while client.get(f"/queue/{other_api['job_id']}").json()["state"] != "processing":
        time.sleep(0.05)
    assert client.post(f"{API}/interrupt", headers=_as("alice")).status_code == 200
    assert client.get(f"{API}/progress", headers=_as("alice")).json()["state"]["job"] == ""
    time.sleep(0.5)
    assert client.get(f"/queue/{other_api['job_id']}").json()["state"] == "processing"  # not A1111's to stop
    client.delete(f"/queue/{other_api['job_id']}")
    answer: dict[str, Any] = {}
    caller = threading.Thread(
        target=lambda: answer.update(r=client.post(f"{API}/txt2img", json=_body(steps=150), headers=_as("alice")))
    )
    caller.start()
    deadline = time.monotonic() + 120
    while _sampling_step(client, "alice") < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    bob = client.get(f"{API}/progress", headers=_as("bob")).json()
    assert (bob["progress"], bob["state"]["job"], bob["current_task"]) == (0.0, "", None)
    assert client.post(f"{API}/interrupt", headers=_as("bob")).status_code == 200
    seen = _sampling_step(client, "alice")
    while _sampling_step(client, "alice") <= seen + 1:  # alice's job goes on
        assert time.monotonic() < deadline and caller.is_alive()
        time.sleep(0.05)
    assert client.post(f"{API}/interrupt", headers=_as("alice")).status_code == 200
    caller.join(60)
    assert json.loads(answer["r"].json()["info"])["interrupted"] is True


def test_unload_and_reload_checkpoint(client: TestClient) -> None:
    others = set(sfumato.loaded_models())  # the session's own SDK models, if earlier tests loaded them
    assert client.post(f"{API}/txt2img", json=_body()).status_code == 200
    loaded = set(sfumato.loaded_models()) - others
    assert len(loaded) == 1
    assert client.post(f"{API}/unload-checkpoint").status_code == 200
    assert not loaded & set(sfumato.loaded_models())  # its worker ended
    assert client.post(f"{API}/reload-checkpoint").status_code == 200
    assert len(set(sfumato.loaded_models()) - loaded - others) == 1


def test_png_info_and_extra_batch_images(client: TestClient, gradient_image: np.ndarray) -> None:
    text = ("a lighthouse, <lora:ink:0.5>\nat dusk\nNegative prompt: fog\nSteps: 20, Sampler: Euler a, "
            'CFG scale: 7, Seed: 123, Size: 512x512, Model: v1-5, Lora hashes: "ink: abc, other: def"')  # fmt: skip
    meta = PngImagePlugin.PngInfo()
    meta.add_text("parameters", text)
    meta.add_text("Software", "a painter")
    buffer = io.BytesIO()
    Image.fromarray(gradient_image).save(buffer, format="PNG", pnginfo=meta)
    info = client.post(f"{API}/png-info", json={"image": base64.b64encode(buffer.getvalue()).decode()}).json()
    assert info["info"] == text and info["items"] == {"Software": "a painter"}
    assert info["parameters"] == {
        "Prompt": "a lighthouse, <lora:ink:0.5>\nat dusk", "Negative prompt": "fog", "Steps": "20",
        "Sampler": "Euler a", "CFG scale": "7", "Seed": "123", "Size": "512x512", "Model": "v1-5",
        "Lora hashes": "ink: abc, other: def",
    }  # fmt: skip
    plain = client.post(f"{API}/png-info", json={"image": _b64_png(gradient_image)}).json()
    assert plain == {"info": "", "items": {}, "parameters": {}}
    images = [
        {"data": _b64_png(gradient_image[:16, :16]), "name": "a"},
        {"data": _b64_png(gradient_image), "name": "b"},
    ]
    out = client.post(f"{API}/extra-batch-images", json={"imageList": images, "upscaling_resize": 2,
                                                        "upscaler_1": "Lanczos"}).json()  # fmt: skip
    assert [_size(i) for i in out["images"]] == [(32, 32), (2 * SIZE, 2 * SIZE)]


def test_options_are_stored_durably_and_the_honoured_ones_act(settings: ServerSettings, sd1_tiny_gguf: Path) -> None:
    written = {"CLIP_stop_at_last_layers": 2, "samples_format": "jpg", "eta_noise_seed_delta": 31337,
               "an_extension_setting": {"nested": [1, 2]}, "sd_model_checkpoint": f"{MODEL}.gguf"}  # fmt: skip
    with TestClient(create_app(settings)) as client:
        defaults = client.get(f"{API}/options").json()
        assert defaults["CLIP_stop_at_last_layers"] == 1 and defaults["samples_format"] == "png"
        assert defaults["sd_vae"] == "Automatic"
        assert client.post(f"{API}/options", json=written).status_code == 200
        error_body(client.post(f"{API}/options", json={"samples_format": "gif"}), 422, "samples_format")
        error_body(client.post(f"{API}/options", json={"CLIP_stop_at_last_layers": 0}), 422, "CLIP_stop_at_last_layers")
        out = client.post(f"{API}/txt2img", json=_body()).json()
        with Image.open(io.BytesIO(base64.b64decode(out["images"][0]))) as image:
            assert image.format == "JPEG"  # samples_format
        assert json.loads(out["info"])["clip_skip"] == 2
        # A request's override_settings win over the stored options.
        png = client.post(f"{API}/txt2img", json=_body(override_settings={"samples_format": "png"})).json()
    with TestClient(create_app(settings)) as client:  # a restarted server reads back what was written
        options = client.get(f"{API}/options").json()
        assert {k: options[k] for k in written} == written
    model_id = sfumato.load_model(sd1_tiny_gguf, model_config={"threads": 2})
    try:
        expected = sfumato.diffusion(model_id, prompt="a cat", width=SIZE, height=SIZE, steps=2, seed=3,
                                     sampling_method="euler", clip_skip=2).outputs.result()  # fmt: skip
    finally:
        sfumato.unload_model(model_id)
    # CLIP_stop_at_last_layers 2 is clip skip 2 (the A1111 PNG adds its infotext: compare pixels)
    assert np.array_equal(pixels(base64.b64decode(png["images"][0])), pixels(expected[0]))


def test_a_vae_of_the_vaes_folder(
    settings: ServerSettings, sdxl_parts: dict[str, Path], flux2_headers: dict[str, Path], sd1_tiny_gguf: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    """``sd_vae`` (options or override_settings) and ComfyUI's VAELoader decode with a file of
    ``--vaes``: SDXL's VAE has SD 1.x's latents; FLUX.2's 32-channel one is refused by name."""
    settings = replace(settings, vaes_dir=tmp_path / "vaes")
    settings.vaes_dir.mkdir()
    (settings.vaes_dir / "xl-vae.safetensors").symlink_to(sdxl_parts["vae"])
    (settings.vaes_dir / "flux2-vae.safetensors").symlink_to(flux2_headers["vae"])
    with TestClient(create_app(settings)) as client:
        listed = client.get(f"{API}/sd-vae").json()
        assert listed == [{"model_name": n, "filename": str(settings.vaes_dir / n)}
                          for n in ("flux2-vae.safetensors", "xl-vae.safetensors")]  # fmt: skip

        def image(**fields: Any) -> bytes:
            response = client.post(f"{API}/txt2img", json=_body(**fields))
            assert response.status_code == 200, response.text
            return base64.b64decode(response.json()["images"][0])

        own = image()
        other = image(override_settings={"sd_vae": "xl-vae.safetensors"})
        assert other != own
        bad = error_body(
            client.post(f"{API}/txt2img", json=_body(override_settings={"sd_vae": "flux2-vae.safetensors"})), 422
        )
        assert bad["field"] == "override_settings.sd_vae" and "32" in bad["error"]
        assert client.post(f"{API}/options", json={"sd_vae": "xl-vae.safetensors"}).status_code == 200
        assert image() == other
        error_body(client.post(f"{API}/options", json={"sd_vae": "nope.safetensors"}), 422, "sd_vae")
        assert client.post(f"{API}/options", json={"sd_vae": "Automatic"}).status_code == 200
        assert image() == own  # switching back reloads the model with its own VAE

        graph = default_graph(**{"3.seed": 3, "3.steps": 2, "8.vae": ["30", 0]})
        graph["30"] = {"class_type": "VAELoader", "inputs": {"vae_name": "xl-vae.safetensors"}}
        entry = wait_history(client, client.post("/prompt", json={"prompt": graph}).json()["prompt_id"])
        comfy = client.get("/view", params=entry["outputs"]["9"]["images"][0]).content
        graph["30"]["inputs"]["vae_name"] = "flux2-vae.safetensors"
        refused = client.post("/prompt", json={"prompt": graph}).json()["node_errors"]
        assert refused["30"]["errors"][0]["extra_info"]["input_name"] == "vae_name"
    model_id = sfumato.load_model(sd1_tiny_gguf, model_config={"threads": 2, "vae_model_src": sdxl_parts["vae"]})
    try:
        a1111 = sfumato.diffusion(model_id, prompt="a cat", width=SIZE, height=SIZE, steps=2, seed=3,
                                  sampling_method="euler").outputs.result()  # fmt: skip
        comfy_sdk = sfumato.diffusion(model_id, prompt="a lighthouse on a cliff", negative_prompt="text, watermark",
                                      width=SIZE, height=SIZE, steps=2, seed=3, cfg_scale=8.0,
                                      sampling_method="euler", scheduler="discrete").outputs.result()  # fmt: skip
    finally:
        sfumato.unload_model(model_id)
    assert np.array_equal(pixels(other), pixels(a1111[0])) and [comfy] == comfy_sdk

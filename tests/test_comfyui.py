"""The ComfyUI-compatible API on the real engine: ComfyUI's default text-to-image
graph (the one Open WebUI sends) over ``/prompt`` with its websocket messages,
previews, ``/history`` and ``/view``, pixels equal to the SDK's; img2img and
inpainting graphs; the custom-sampling set; ``node_errors`` for what cannot run;
``/interrupt``; and the listing routes."""

from __future__ import annotations

import io
import json
import struct
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from websockets.sync.client import connect

import sfumato
from sfumato.params import SAMPLING_METHODS, SCHEDULER_NAMES
from sfumato.server.apis.comfy.compile import compile_prompt
from sfumato.server.settings import ServerSettings

from .helpers import CKPT, SIZE, default_graph, job_body, png_bytes, run, serving, wait_history, wait_job


def _sdk_png(model: Path, **params: Any) -> bytes:
    model_id = sfumato.load_model(model, model_config={"threads": 2})
    try:
        [png] = sfumato.diffusion(model_id, width=SIZE, height=SIZE, **params).outputs.result()
    finally:
        sfumato.unload_model(model_id)
    return png


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)


def _post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """POST as SillyTavern does: JSON without a JSON content type."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "text/plain"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def test_default_graph_over_the_websocket(settings: ServerSettings, sd1_tiny_gguf: Path) -> None:
    with serving(settings, "--preview-method", "latent2rgb") as url:
        ws_url = url.replace("http://", "ws://") + "/ws?clientId=webui-1"
        with connect(ws_url) as socket, connect(ws_url.replace("webui-1", "someone-else")) as other:
            first = json.loads(socket.recv(timeout=10))
            assert first["type"] == "status" and first["data"]["sid"] == "webui-1"
            assert first["data"]["status"]["exec_info"]["queue_remaining"] == 0
            status, accepted = _post(f"{url}/prompt", {"prompt": default_graph(), "client_id": "webui-1"})
            assert status == 200 and accepted["node_errors"] == {}, accepted
            prompt_id = accepted["prompt_id"]
            messages: list[dict[str, Any]] = []
            previews: list[bytes] = []
            while not (messages and messages[-1]["type"] == "executing" and messages[-1]["data"]["node"] is None):
                frame = socket.recv(timeout=120)
                if isinstance(frame, bytes):
                    previews.append(frame)
                else:
                    messages.append(json.loads(frame))
            # Another client's socket hears the queue's status, not this client's prompt.
            heard = [json.loads(f)["type"] for f in _frames(other)]
            assert heard and set(heard) == {"status"}

        kinds = [m["type"] for m in messages if m["type"] != "status"]
        assert kinds[:2] == ["execution_start", "execution_cached"]
        assert kinds[-4:] == ["executing", "executed", "execution_success", "executing"]
        executing = [m["data"]["node"] for m in messages if m["type"] == "executing"]
        assert executing[0] == "4" and "3" in executing and executing[-2:] == ["9", None]
        progress = [(m["data"]["value"], m["data"]["max"], m["data"]["node"]) for m in messages
                    if m["type"] == "progress"]  # fmt: skip
        assert progress and progress[-1] == (3, 3, "3") and all(m["data"]["prompt_id"] == prompt_id
                                                              for m in messages if m["type"] != "status")  # fmt: skip
        # Previews: ComfyUI's binary frames (event 1, PNG 2), the latent projected (an eighth of the side).
        assert previews
        for frame in previews:
            assert struct.unpack(">II", frame[:8]) == (1, 2)
            assert Image.open(io.BytesIO(frame[8:])).size == (SIZE // 8, SIZE // 8)
        executed = next(m["data"] for m in messages if m["type"] == "executed")
        [image] = executed["output"]["images"]
        assert executed["node"] == "9" and image["type"] == "output"

        with urllib.request.urlopen(f"{url}/history/{prompt_id}") as response:
            entry = json.load(response)[prompt_id]
        assert entry["status"]["status_str"] == "success" and entry["status"]["completed"] is True
        assert entry["outputs"] == {"9": {"images": [image]}} and entry["prompt"][1] == prompt_id
        query = urllib.parse.urlencode(image)
        with urllib.request.urlopen(f"{url}/view?{query}") as response:
            assert response.headers["Content-Type"] == "image/png"
            png = response.read()
        with urllib.request.urlopen(f"{url}/api/view?{query}") as response:
            assert response.read() == png
    # The same seed, size, steps, cfg and mapped sampler (euler / normal = discrete) on the SDK.
    expected = _sdk_png(sd1_tiny_gguf, prompt="a lighthouse on a cliff", negative_prompt="text, watermark", steps=3,
                        cfg_scale=8.0, sampling_method="euler", scheduler="discrete", seed=156680208700286)  # fmt: skip
    assert png == expected


def _frames(socket: Any) -> list[str | bytes]:
    out = []
    try:
        while True:
            out.append(socket.recv(timeout=0.5))
    except TimeoutError:
        return out


def _upload(client: TestClient, name: str, data: bytes, **form: str) -> dict[str, Any]:
    response = client.post("/upload/image", files={"image": (name, data, "image/png")}, data=form)
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_img2img_and_inpainting_graphs(client: TestClient, gradient_image: np.ndarray) -> None:
    assert _upload(client, "source.png", png_bytes(gradient_image)) == {"name": "source.png", "subfolder": "",
                                                                         "type": "input"}  # fmt: skip
    # Transparent on the right half: LoadImage's mask (1 - alpha) paints it anew.
    rgba = np.dstack([gradient_image, np.full((SIZE, SIZE), 255, np.uint8)])
    rgba[:, SIZE // 2 :, 3] = 0
    holed = _upload(client, "holed.png", png_bytes(rgba), subfolder="masks")
    assert holed == {"name": "holed.png", "subfolder": "masks", "type": "input"}
    listed = client.get("/object_info/LoadImage").json()["LoadImage"]["input"]["required"]["image"]
    assert listed[0] == ["masks/holed.png", "source.png"] and listed[1]["image_upload"] is True
    # Another file under a taken name is kept beside it, not over it.
    assert _upload(client, "source.png", png_bytes(gradient_image[::-1].copy()))["name"] == "source (1).png"

    graph = default_graph(**{"3.denoise": 0.6, "3.latent_image": ["11", 0]})
    graph["10"] = {"class_type": "LoadImage", "inputs": {"image": "source.png"}}
    graph["11"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
    accepted = client.post("/prompt", json={"prompt": graph})
    assert accepted.status_code == 200, accepted.text
    img2img_id = accepted.json()["prompt_id"]

    inpaint = default_graph(**{"3.latent_image": ["11", 0]})
    inpaint["10"] = {"class_type": "LoadImage", "inputs": {"image": "masks/holed.png"}}
    inpaint["11"] = {"class_type": "VAEEncodeForInpaint", "inputs": {"pixels": ["10", 0], "vae": ["4", 2],
                                                                     "mask": ["10", 1], "grow_mask_by": 0}}  # fmt: skip
    inpaint_id = client.post("/prompt", json={"prompt": inpaint}).json()["prompt_id"]

    source = gradient_image.astype(np.int16)
    entry = wait_history(client, img2img_id)
    [image] = entry["outputs"]["9"]["images"]
    img2img = _pixels(client.get("/view", params=image).content)
    job = client.get(f"/queue/{img2img_id}").json()  # the job API sees the same job
    assert job["state"] == "done" and job["payload"]["prompt"]["11"]["class_type"] == "VAEEncode"
    assert 0 < np.abs(img2img - source).mean()

    entry = wait_history(client, inpaint_id)
    [image] = entry["outputs"]["9"]["images"]
    out = _pixels(client.get("/view", params=image).content)
    keep, change = np.s_[:, : SIZE // 2], np.s_[:, SIZE // 2 :]
    assert np.abs(out[keep] - source[keep]).max() <= 1
    assert np.abs(out[change] - source[change]).mean() > 10
    # An uploaded image comes back from /view as an input.
    assert client.get("/view", params={"filename": "holed.png", "subfolder": "masks", "type": "input"}).content


def test_the_custom_sampling_set_runs_as_the_sdk(client: TestClient, sd1_tiny_gguf: Path) -> None:
    graph = default_graph()
    del graph["3"], graph["5"]
    graph.update({
        "20": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "dpmpp_2m"}},
        "21": {"class_type": "BasicScheduler", "inputs": {"model": ["4", 0], "scheduler": "karras", "steps": 3,
                                                          "denoise": 1.0}},
        "22": {"class_type": "RandomNoise", "inputs": {"noise_seed": 77}},
        "23": {"class_type": "BasicGuider", "inputs": {"model": ["4", 0], "conditioning": ["6", 0]}},
        "24": {"class_type": "EmptySD3LatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "25": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["22", 0], "guider": ["23", 0],
                                                                 "sampler": ["20", 0], "sigmas": ["21", 0],
                                                                 "latent_image": ["24", 0]}},
        "26": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
    })  # fmt: skip
    graph["8"]["inputs"]["samples"] = ["25", 1]
    accepted = client.post("/prompt", content=json.dumps({"prompt": graph}))  # no content type at all
    assert accepted.status_code == 200, accepted.text
    entry = wait_history(client, accepted.json()["prompt_id"])
    assert set(entry["outputs"]) == {"9", "26"} and entry["outputs"]["26"]["images"][0]["type"] == "temp"
    png = client.get("/view", params=entry["outputs"]["26"]["images"][0]).content
    # BasicGuider: one prompt, no classifier-free guidance (cfg 1).
    expected = _sdk_png(sd1_tiny_gguf, prompt="a lighthouse on a cliff", steps=3, cfg_scale=1.0,
                        sampling_method="dpm++2m", scheduler="karras", seed=77)  # fmt: skip
    assert png == expected


def test_clip_skip_and_the_advanced_sampler_run_as_the_sdk(
    client: TestClient, sd1_tiny_gguf: Path, gradient_image: np.ndarray
) -> None:
    """CLIPSetLastLayer -2 is clip skip 2; KSamplerAdvanced from step 1 of 3 on an encoded image is strength 2/3."""
    _upload(client, "source.png", png_bytes(gradient_image))
    graph = default_graph(**{"6.clip": ["12", 0], "7.clip": ["12", 0], "8.samples": ["13", 0]})
    del graph["3"]
    graph.update({
        "10": {"class_type": "LoadImage", "inputs": {"image": "source.png"}},
        "11": {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}},
        "12": {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["4", 1], "stop_at_clip_layer": -2}},
        "13": {"class_type": "KSamplerAdvanced", "inputs": {
            "model": ["4", 0], "add_noise": "enable", "noise_seed": 12, "steps": 3, "cfg": 6.5,
            "sampler_name": "euler_ancestral", "scheduler": "karras", "positive": ["6", 0], "negative": ["7", 0],
            "latent_image": ["11", 0], "start_at_step": 1, "end_at_step": 10000,
            "return_with_leftover_noise": "disable"}},
    })  # fmt: skip
    entry = wait_history(client, client.post("/prompt", json={"prompt": graph}).json()["prompt_id"])
    png = client.get("/view", params=entry["outputs"]["9"]["images"][0]).content
    expected = _sdk_png(sd1_tiny_gguf, prompt="a lighthouse on a cliff", negative_prompt="text, watermark", steps=3,
                        cfg_scale=6.5, sampling_method="euler_a", scheduler="karras", seed=12, clip_skip=2,
                        init_image=png_bytes(gradient_image), strength=2 / 3)  # fmt: skip
    assert png == expected


def test_set_latent_noise_mask_and_an_esrgan_upscale(client: TestClient, gradient_image: np.ndarray) -> None:
    rgba = np.dstack([gradient_image, np.full((SIZE, SIZE), 255, np.uint8)])
    rgba[: SIZE // 2, :, 3] = 0  # the top half is transparent: made anew
    _upload(client, "top.png", png_bytes(rgba))
    graph = default_graph(**{"3.latent_image": ["12", 0]})
    graph.update({
        "10": {"class_type": "LoadImage", "inputs": {"image": "top.png"}},
        "11": {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}},
        "12": {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["11", 0], "mask": ["10", 1]}},
    })  # fmt: skip
    inpaint_id = client.post("/prompt", json={"prompt": graph}).json()["prompt_id"]
    upscale = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "top.png"}},
        "2": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "esrgan-x4.pth"}},
        "3": {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["2", 0], "image": ["1", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "big"}},
    }
    upscale_id = client.post("/prompt", json={"prompt": upscale}).json()["prompt_id"]
    out = _pixels(client.get("/view", params=wait_history(client, inpaint_id)["outputs"]["9"]["images"][0]).content)
    source = gradient_image.astype(np.int16)
    keep, change = np.s_[SIZE // 2 :, :], np.s_[: SIZE // 2, :]
    assert np.abs(out[keep] - source[keep]).max() <= 1
    assert np.abs(out[change] - source[change]).mean() > 10
    entry = wait_history(client, upscale_id)
    big = Image.open(io.BytesIO(client.get("/view", params=entry["outputs"]["4"]["images"][0]).content))
    assert big.size == (4 * SIZE, 4 * SIZE)


def test_an_esrgan_upscales_the_generation(
    client: TestClient, settings: ServerSettings, sd1_model: str, esrgan_1b: Path
) -> None:
    """ImageUpscaleWithModel on a VAEDecode: the model runs paired with the upscaler, as
    the SDK's ``diffusion(upscale=...)`` (the session's model is paired with the same file)."""
    graph = default_graph(**{"9.images": ["14", 0]})
    graph["2"] = {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "esrgan-x4.pth"}}
    graph["14"] = {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["2", 0], "image": ["8", 0]}}
    accepted = client.post("/prompt", json={"prompt": graph})
    assert accepted.status_code == 200, accepted.text
    entry = wait_history(client, accepted.json()["prompt_id"])
    png = client.get("/view", params=entry["outputs"]["9"]["images"][0]).content
    [expected], _, _ = run(sd1_model, prompt="a lighthouse on a cliff", negative_prompt="text, watermark", steps=3,
                           cfg_scale=8.0, sampling_method="euler", scheduler="discrete", seed=156680208700286,
                           width=SIZE, height=SIZE, upscale=True)  # fmt: skip
    assert _pixels(png).shape == (4 * SIZE, 4 * SIZE, 3)
    assert np.array_equal(_pixels(png), _pixels(expected))
    # Twice is two passes of one upscaler; another upscaler on the same image is refused by name.
    graph["15"] = {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["2", 0], "image": ["14", 0]}}
    graph["9"]["inputs"]["images"] = ["15", 0]
    compiled = compile_prompt(client.app.state.sfumato, graph)  # type: ignore[attr-defined]
    plan = compiled.plan
    assert (plan.generation.upscale, plan.esrgan, compiled.upscaler) == ({"repeats": 2}, "esrgan-x4", "15")
    (settings.upscalers_dir / "other-x4.pth").symlink_to(esrgan_1b)
    graph["16"] = {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "other-x4.pth"}}
    graph["15"]["inputs"]["upscale_model"] = ["16", 0]
    [error] = _node_errors(client, graph)["15"]["errors"]
    assert error["extra_info"]["input_name"] == "upscale_model" and "esrgan-x4" in error["details"]


def test_flux_guidance_reaches_the_plan(client: TestClient) -> None:
    graph = default_graph(**{"3.positive": ["10", 0]})
    graph["10"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": ["6", 0], "guidance": 5.0}}
    compiled = compile_prompt(client.app.state.sfumato, graph)  # type: ignore[attr-defined]
    assert compiled.plan.generation.guidance == 5.0 and compiled.plan.generation.prompt == "a lighthouse on a cliff"
    assert (compiled.loader, compiled.sampler, compiled.decoder, compiled.outputs) == ("4", "3", "8", ("9",))


def _node_errors(client: TestClient, graph: Any, kind: str = "prompt_outputs_failed_validation") -> dict[str, Any]:
    response = client.post("/prompt", json={"prompt": graph})
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error"]["type"] == kind, body
    return dict(body["node_errors"])


@pytest.mark.parametrize(
    ("changes", "node", "error", "input_name"),
    [
        ({"3.sampler_name": "dpmpp_sde"}, "3", "value_not_in_list", "sampler_name"),  # no engine sampler
        ({"3.scheduler": "beta"}, "3", "value_not_in_list", "scheduler"),
        ({"4.ckpt_name": "missing.safetensors"}, "4", "value_not_in_list", "ckpt_name"),
        ({"3.steps": 0}, "3", "value_smaller_than_min", "steps"),
        ({"3.steps": 151}, "3", "exception_during_validation", "steps"),  # over the server's --max-steps
        ({"3.cfg": "lots"}, "3", "invalid_input_type", "cfg"),
        ({"3.seed": 2**64}, "3", "value_bigger_than_max", "seed"),
        ({"3.denoise": 0.5}, "3", "exception_during_validation", "denoise"),  # denoise of an empty latent
        ({"5.width": 100}, "5", "exception_during_validation", "width"),  # not a multiple of 64
        ({"3.positive": ["5", 0]}, "3", "return_type_mismatch", "positive"),
        ({"3.model": ["404", 0]}, "3", "bad_linked_input", "model"),
        ({"8.vae": "a vae"}, "8", "bad_linked_input", "vae"),
    ],
)
def test_what_cannot_run_gets_node_errors(
    client: TestClient, changes: dict[str, Any], node: str, error: str, input_name: str
) -> None:
    errors = _node_errors(client, default_graph(**changes))
    assert list(errors) == [node] and errors[node]["dependent_outputs"] == ["9"]
    [found] = errors[node]["errors"]
    assert (found["type"], found["extra_info"]["input_name"]) == (error, input_name), found
    assert errors[node]["class_type"] == default_graph()[node]["class_type"]


def test_unknown_nodes_and_bad_bodies(client: TestClient) -> None:
    graph = default_graph()
    graph["10"] = {"class_type": "FaceDetailer", "inputs": {"image": ["8", 0]}}
    errors = _node_errors(client, graph, "missing_node_type")
    assert errors["10"]["class_type"] == "FaceDetailer" and errors["10"]["errors"][0]["type"] == "missing_node_type"
    del graph["10"], graph["9"]
    assert _node_errors(client, graph, "prompt_no_outputs") == {}
    graph = default_graph()
    del graph["3"]["inputs"]["steps"]
    assert _node_errors(client, graph)["3"]["errors"][0]["type"] == "required_input_missing"
    for body in (b"{not json", b"[]", json.dumps({"prompt": []}).encode()):
        response = client.post("/prompt", content=body)
        assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_prompt"
    assert client.get("/history/not-a-prompt").json() == {}
    for params in ({"filename": "../jobs.sqlite3"}, {"filename": "x.png", "type": "input", "subfolder": "../.."}):
        assert client.get("/view", params=params).status_code == 422


def test_interrupt_stops_the_running_prompt_and_no_other_apis_job(client: TestClient) -> None:
    job_id = client.post("/txt2img", json=job_body(steps=40)).json()["job_id"]
    prompt_id = client.post("/prompt", json={"prompt": default_graph(**{"3.steps": 150})}).json()["prompt_id"]
    wait_job(client, job_id, ("processing",))
    pending = client.get("/api/queue").json()
    assert pending["queue_running"] == [] and [item[1] for item in pending["queue_pending"]] == [prompt_id]
    assert client.post("/interrupt").status_code == 200  # the job API's job runs: it goes on
    assert client.get(f"/queue/{job_id}").json()["state"] == "processing"
    assert wait_job(client, job_id)["state"] == "done"
    wait_job(client, prompt_id, ("processing",))
    assert [item[1] for item in client.get("/api/queue").json()["queue_running"]] == [prompt_id]
    assert client.post("/api/interrupt", json={"prompt_id": prompt_id}).status_code == 200
    entry = wait_history(client, prompt_id)
    assert entry["status"]["status_str"] == "error" and entry["outputs"] == {}
    assert entry["status"]["messages"][-1][0] == "execution_interrupted"
    assert client.get(f"/queue/{prompt_id}").json()["state"] == "cancelled"


def test_listing_routes(client: TestClient, settings: ServerSettings) -> None:
    info = client.get("/object_info").json()
    assert client.get("/api/object_info").json() == info
    sampler = info["KSampler"]["input"]["required"]
    # Only names the engine runs, each mapped to one of its samplers and schedulers.
    assert "euler" in sampler["sampler_name"][0] and "dpmpp_sde" not in sampler["sampler_name"][0]
    assert "normal" in sampler["scheduler"][0] and "beta" not in sampler["scheduler"][0]
    assert sampler["seed"][1]["max"] == 2**63 - 1 and sampler["steps"] == ["INT", {"default": 20, "min": 1,
                                                                                    "max": 10000}]  # fmt: skip
    assert info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] == [CKPT]
    assert info["UpscaleModelLoader"]["input"]["required"]["model_name"][0] == ["esrgan-x4.pth"]
    assert info["UNETLoader"]["input"]["required"]["unet_name"][0] == []  # no models config here
    assert info["SaveImage"]["output_node"] is True and info["CheckpointLoaderSimple"]["output"] == ["MODEL", "CLIP",
                                                                                                     "VAE"]  # fmt: skip
    assert client.get("/object_info/KSampler").json().keys() == {"KSampler"}
    assert client.get("/object_info/NoSuchNode").json() == {}
    stats = client.get("/system_stats").json()
    assert stats["system"]["ram_total"] > 0 and stats["devices"][0]["type"] == "cpu"
    # Then each GPU the engine has (lavapipe's Vulkan0 where the Vulkan module and Mesa are installed).
    gpus = [d for d in sfumato.list_devices() if d.type != "cpu"]
    listed = stats["devices"][1:]
    assert [d["name"].split(" : ")[0] for d in listed] == [d.name for d in gpus]
    assert [d["vram_total"] for d in listed] == [d.memory_total for d in gpus]
    assert client.get("/api/queue").json() == {"queue_running": [], "queue_pending": []}
    folders = ["checkpoints", "diffusion_models", "text_encoders", "vae", "loras", "upscale_models"]
    assert client.get("/api/models").json() == folders
    assert client.get("/api/models/checkpoints").json() == [CKPT]
    assert client.get("/embeddings").json() == []
    # The job-queue API keeps its own /queue and /models.
    assert "jobs" in client.get("/queue").json() and "models" in client.get("/models").json()


def test_comfy_names_map_to_engine_names() -> None:
    from sfumato.server.models.names import COMFY_SAMPLERS, COMFY_SCHEDULERS

    assert set(COMFY_SAMPLERS.values()) <= set(SAMPLING_METHODS)
    assert set(COMFY_SCHEDULERS.values()) <= set(SCHEDULER_NAMES)

"""Front ends that hold no model file: ``sfumato serve --workers 0`` started with no models
folder serves what live ``sfumato worker`` processes register, each worker with its own
folders (no shared disk, no path alike on two machines), on one PostgreSQL the suite starts.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any

import httpx
from fastapi.testclient import TestClient

from sfumato.server.app import create_app
from sfumato.server.settings import ServerSettings
from tests.support.farm import Farm, Process, ended, live_workers, submit, until

from .helpers import CKPT, MODEL, SIZE, default_graph, gradient, job_body, pixels, png_bytes


def _registered(client: httpx.Client, count: int, *keys: str) -> list[dict[str, Any]]:
    """The live workers, once ``count`` of them registered, with the sha256 of everything they hold."""
    workers = live_workers(client, count)
    hashed = all(len(w["identities"]) == len(w["models"]) + len(w["files"]) for w in workers)
    held = {key for w in workers for key in (*w["models"], *w["files"])}
    return workers if hashed and held >= set(keys) else []


def _models(client: httpx.Client) -> list[str]:
    return [m["model_name"] for m in client.get("/sdapi/v1/sd-models").json()]


def _ran_on(farm: Farm, job_id: str, worker: Process) -> bool:
    return f"-{worker.pid}-" in farm.row(job_id)["result"]["worker"]


def test_a_front_end_started_first_serves_every_api_once_workers_register(
    farm: Farm, sd1_tiny_lora: Path, esrgan_1b: Path
) -> None:
    _, api = farm.front_end("api")  # before any worker, with no models folder
    early = api.post("/txt2img", json=job_body())
    assert early.status_code == 503 and early.json()["code"] == "no_worker", early.text
    assert "no worker is registered" in early.json()["error"] and early.json()["field"] == "model"
    assert _models(api) == [] and api.get("/sdapi/v1/loras").json() == []
    files = {"loras/ink.safetensors": sd1_tiny_lora, "upscalers/esrgan-x4.pth": esrgan_1b}
    workers = [farm.worker("w1", (MODEL,), files=files), farm.worker("w2", ("other-sd1",))]
    until(lambda: _registered(api, 2, "lora:ink", "upscaler:esrgan-x4"), "two workers registered", *workers)
    # Every listing is the union of what the live workers hold.
    sha = hashlib.sha256(farm.model.read_bytes()).hexdigest()
    listed = {m["model_name"]: m["sha256"] for m in api.get("/sdapi/v1/sd-models").json()}
    assert listed == {"other-sd1": sha, MODEL: sha}
    assert [lora["name"] for lora in api.get("/sdapi/v1/loras").json()] == ["ink"]
    assert "esrgan-x4" in [u["name"] for u in api.get("/sdapi/v1/upscalers").json()]
    assert [m["name"] for m in api.get("/models").json()["models"]] == ["other-sd1", MODEL]
    checkpoints = api.get("/object_info/CheckpointLoaderSimple").json()["CheckpointLoaderSimple"]
    assert checkpoints["input"]["required"]["ckpt_name"][0] == ["other-sd1.gguf", CKPT]
    assert api.get("/api/models/checkpoints").json() == ["other-sd1.gguf", CKPT]
    assert api.get("/api/models/loras").json() == ["ink.safetensors"]
    # A job through each API family; the LoRA's go to the one worker that holds it.
    job_id = submit(api, model=MODEL, loras=[{"name": "ink", "scale": 0.5}], seed=1)
    assert until(lambda: ended(api, job_id), "the job-queue job")["state"] == "done"
    assert _ran_on(farm, job_id, workers[0])
    body = {"prompt": "a harbour", "steps": 2, "width": SIZE, "height": SIZE, "seed": 2,
            "override_settings": {"sd_model_checkpoint": "other-sd1"}}  # fmt: skip
    a1111 = api.post("/sdapi/v1/txt2img", json=body)
    assert a1111.status_code == 200 and pixels(base64.b64decode(a1111.json()["images"][0])).shape == (SIZE, SIZE, 3)
    openai = api.post("/v1/images/generations", json={"prompt": "a kite", "size": f"{SIZE}x{SIZE}", "steps": 2})
    assert openai.status_code == 200 and openai.json()["data"][0]["b64_json"], openai.text
    queued = api.post("/prompt", json={"prompt": default_graph(**{"3.steps": 2})})
    assert queued.status_code == 200, queued.text
    prompt_id = queued.json()["prompt_id"]
    history = until(lambda: api.get(f"/history/{prompt_id}").json(), "the ComfyUI prompt ended")
    assert history[prompt_id]["status"]["status_str"] == "success"
    upscaled = api.post("/sdapi/v1/extra-single-image", json={
        "image": a1111.json()["images"][0], "upscaler_1": "esrgan-x4", "upscaling_resize": 2})  # fmt: skip
    assert upscaled.status_code == 200 and pixels(base64.b64decode(upscaled.json()["image"])).shape[0] == 2 * SIZE
    # A job whose files no live worker holds together: refused, naming what is missing.
    apart = api.post("/txt2img", json=job_body(model="other-sd1", loras=["ink"]))
    assert apart.status_code == 503 and apart.json()["code"] == "no_worker", apart.text
    assert "together" in apart.json()["error"]


def test_models_leave_the_listings_with_their_worker_and_come_back_with_another(farm: Farm) -> None:
    _, api = farm.front_end("api")
    first = [farm.worker("w1", (MODEL,)), farm.worker("w2", ("other-sd1",))]
    until(lambda: _registered(api, 2) and _models(api) == ["other-sd1", MODEL], "both models listed", *first)
    first[1].stop()  # a clean stop: it leaves the registry at once
    until(lambda: _models(api) == [MODEL], "other-sd1 left the listings")
    refused = api.post("/txt2img", json=job_body(model="other-sd1"))
    assert refused.status_code == 503 and refused.json()["code"] == "no_worker", refused.text
    assert "no live worker holds model 'other-sd1'" in refused.json()["error"] and refused.json()["field"] == "model"
    unknown = api.post("/txt2img", json=job_body(model="never-seen"))  # no worker ever held it: a bad name
    assert unknown.status_code == 422 and "available: " + MODEL in unknown.json()["error"], unknown.text
    again = farm.worker("w3", ("other-sd1",))  # another machine brings it back; the front end is not restarted
    until(lambda: _models(api) == ["other-sd1", MODEL], "other-sd1 listed again", again)
    job_id = submit(api, model="other-sd1", seed=3)
    assert until(lambda: ended(api, job_id), "the job on the new worker")["state"] == "done"
    assert _ran_on(farm, job_id, again)
    first[0].signal(9)  # SIGKILL: its models leave the listings when its registration expires
    until(lambda: _models(api) == ["other-sd1"], "the killed worker's model left the listings")


def test_an_image_uploaded_through_one_front_end_runs_through_another(farm: Farm) -> None:
    """ComfyUI's uploads live in the job store: behind a load balancer, the upload and the
    prompt that loads it may reach different front ends."""
    worker = farm.worker("w1", (MODEL,))
    (_, first), (_, second) = farm.front_end("api-a"), farm.front_end("api-b")
    until(lambda: _registered(second, 1), "the worker registered", worker)
    picture = png_bytes(gradient(SIZE))
    sent = first.post("/upload/image", files={"image": ("source.png", picture, "image/png")}, data={"subfolder": "in"})
    assert sent.json() == {"name": "source.png", "subfolder": "in", "type": "input"}, sent.text
    listed = second.get("/object_info/LoadImage").json()["LoadImage"]["input"]["required"]["image"][0]
    assert listed == ["in/source.png"]
    shown = second.get("/view", params={"filename": "source.png", "subfolder": "in", "type": "input"})
    assert shown.content == picture
    graph = default_graph(**{"3.denoise": 0.6, "3.latent_image": ["11", 0], "3.steps": 2})
    graph["10"] = {"class_type": "LoadImage", "inputs": {"image": "in/source.png"}}
    graph["11"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
    queued = second.post("/prompt", json={"prompt": graph})
    assert queued.status_code == 200, queued.text
    prompt_id = queued.json()["prompt_id"]
    history = until(lambda: first.get(f"/history/{prompt_id}").json(), "the img2img prompt ended")
    assert history[prompt_id]["status"]["status_str"] == "success"
    assert not any((farm.root / "api-a" / "data").rglob("*"))  # the front ends kept no file
    assert not any((farm.root / "api-b" / "data").rglob("*"))


BAD_REQUESTS: list[tuple[str, str, dict[str, Any]]] = [
    ("post", "/txt2img", job_body(model="nope")),
    ("post", "/txt2img", job_body(loras=[{"name": "nope"}])),
    ("post", "/txt2img", job_body(steps=9999)),
    ("post", "/txt2img", job_body(sampler_name="nope")),
    ("post", "/txt2img", job_body(width=65)),
    ("post", "/txt2img", job_body(hires={"enabled": True, "scale": 2, "upscaler": "nope"})),
    ("post", "/txt2img", job_body(refiner_checkpoint="nope")),
    ("post", "/sdapi/v1/txt2img", {"prompt": "x", "sampler_name": "nope"}),
    ("post", "/sdapi/v1/txt2img", {"prompt": "x", "override_settings": {"sd_vae": "nope.safetensors"}}),
    ("post", "/sdapi/v1/txt2img", {"prompt": "x <lora:nope:1>"}),
    ("post", "/sdapi/v1/options", {"sd_model_checkpoint": "nope"}),
    ("post", "/sdapi/v1/extra-single-image", {"image": "", "upscaler_1": "nope"}),
    ("post", "/v1/images/generations", {"prompt": "x", "model": "nope"}),
    ("post", "/v1/images/generations", {"prompt": "x", "size": "96x64"}),
    ("post", "/prompt", {"prompt": default_graph(**{"4.ckpt_name": "nope.gguf"})}),
    ("post", "/prompt", {"prompt": default_graph(**{"3.sampler_name": "nope"})}),
    # Files whose headers refuse them: the front end has only the worker's facts.
    ("post", "/txt2img", job_body(model=MODEL, loras=["broken"])),
    ("post", "/sdapi/v1/txt2img", {"prompt": "x", "override_settings": {"sd_vae": "tiny.safetensors"}}),
]


def test_bad_requests_get_the_same_answer_as_from_a_single_server(
    farm: Farm, sd1_tiny_lora: Path, esrgan_1b: Path, taesd: Path, tmp_path: Path
) -> None:
    files = {"loras/ink.safetensors": sd1_tiny_lora, "upscalers/esrgan-x4.pth": esrgan_1b,
             "loras/broken.safetensors": taesd, "vaes/tiny.safetensors": taesd}  # fmt: skip
    workers = [farm.worker("w1", (MODEL,), files=files), farm.worker("w2", ("other-sd1",))]
    _, api = farm.front_end("api")
    until(lambda: _registered(api, 2, "lora:ink", "vae:tiny"), "two workers registered", *workers)
    home = farm.folder("single", (MODEL, "other-sd1"), files=files)
    single = ServerSettings(
        models_dir=home / "models", loras_dir=home / "loras", upscalers_dir=home / "upscalers",
        vaes_dir=home / "vaes", data_dir=tmp_path / "single-data", threads=1,
    )  # fmt: skip

    def answer(response: httpx.Response, machine: str) -> tuple[int, str]:
        """Its status and body, the machine's folder named alike (a message may name a file's path)."""
        return response.status_code, response.text.replace(str(farm.root / machine), "<home>")

    with TestClient(create_app(single)) as local:
        for method, path, body in BAD_REQUESTS:
            ours, theirs = getattr(api, method)(path, json=body), getattr(local, method)(path, json=body)
            assert 400 <= ours.status_code < 500, (path, body, ours.text)
            assert answer(ours, "w1") == answer(theirs, "single"), (path, body)

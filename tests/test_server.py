"""``sfumato serve``: the job API of seed 002 on the real engine, durable jobs,
auth, limits and the error shape."""

from __future__ import annotations

import base64
import io
import json
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import sfumato
from sfumato.server.app import create_app
from sfumato.server.settings import ServerSettings

from .conftest import SIZE
from .serving import serving

MODEL = "tiny-sd1"


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


def _request(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": "a lighthouse", "width": SIZE, "height": SIZE, "steps": 2, "seed": 4}
    body.update(fields)
    return body


def _wait(client: TestClient, job_id: str, states: tuple[str, ...] = ("done", "error", "cancelled")) -> dict[str, Any]:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        status: dict[str, Any] = client.get(f"/queue/{job_id}").json()
        if status["state"] in states:
            return status
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not reach {states}: {status}")


def _error(response: Any, status: int, field: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body["status"] == "error" and body["error"] and body["code"]
    if field is not None:
        assert body["field"] == field, body
    return body


def test_listing_routes(client: TestClient, settings: ServerSettings) -> None:
    assert client.get("/hello").json() == {"ok": True}
    models = client.get("/models").json()
    assert models["status"] == "success"
    assert [(m["name"], m["type"], m["family"]) for m in models["models"]] == [(MODEL, "standard", "SD 1.x")]
    upscalers = client.get("/upscalers").json()["upscalers"]
    assert upscalers[0] == {"name": "Latent", "path": "internal"}
    assert [u["name"] for u in upscalers[1:]] == ["esrgan-x4"]
    assert client.get("/loras").json() == {"status": "success", "loras": []}
    settings.loras_dir.mkdir()
    (settings.loras_dir / "ink-style.safetensors").write_bytes(b"{}")
    assert client.get("/loras").json()["loras"] == [{"name": "ink-style", "scale": 1.0}]


def test_models_that_need_companion_files_are_not_offered(
    settings: ServerSettings, flux2_headers: dict[str, Path], sdxl_parts: dict[str, Path]
) -> None:
    (settings.models_dir / "klein.gguf").symlink_to(flux2_headers["diffusion"])
    (settings.models_dir / "sdxl-unet.gguf").symlink_to(sdxl_parts["unet"])
    with TestClient(create_app(settings)) as client:
        assert [m["name"] for m in client.get("/models").json()["models"]] == [MODEL]
        _error(client.post("/txt2img", json=_request(model="klein")), 422, "model")


def test_txt2img_job_runs_to_done_with_every_field(client: TestClient) -> None:
    accepted = client.post("/txt2img", json=_request())
    assert accepted.status_code == 200, accepted.text
    job_id = accepted.json()["job_id"]
    assert accepted.json()["status"] == "queued"
    done = _wait(client, job_id)
    assert (done["state"], done["current_phase"], done["progress"], done["error"]) == ("done", "done", 100, None)
    assert done["payload"]["prompt"] == "a lighthouse" and done["payload"]["sampler_name"] == "DPM++ 2M Karras"
    jpeg = base64.b64decode(done["image"])
    with Image.open(io.BytesIO(jpeg)) as image:
        assert (image.format, image.size) == ("JPEG", (SIZE, SIZE))
    assert Path(done["output_path"]).read_bytes() == jpeg
    assert (done["width"], done["height"], done["file_type"], done["jpeg_quality"]) == (SIZE, SIZE, "jpg", 85)
    assert done["generation_time_sec"] > 0 and done["memory_before_mb"] > 0 and done["memory_after_mb"] > 0


def test_png_output_is_what_the_sdk_makes_with_the_mapped_sampler(client: TestClient, sd1_tiny_gguf: Path) -> None:
    job_id = client.post("/txt2img", json=_request(fileType="png", cfg_scale=5.0)).json()["job_id"]
    png = base64.b64decode(_wait(client, job_id)["image"])
    model_id = sfumato.load_model(sd1_tiny_gguf, model_config={"threads": 2})
    try:
        expected = sfumato.diffusion(
            model_id, prompt="a lighthouse", width=SIZE, height=SIZE, steps=2, seed=4, cfg_scale=5.0,
            sampling_method="dpm++2m", scheduler="karras",
        ).outputs.result()  # fmt: skip
    finally:
        sfumato.unload_model(model_id)
    assert [png] == expected


def test_refiner_checkpoint_refines_on_a_second_model(
    settings: ServerSettings, sd1_tiny_gguf: Path, sd2_gguf: Path
) -> None:
    (settings.models_dir / "tiny-sd2.gguf").symlink_to(sd2_gguf)
    body = _request(fileType="png", refiner_checkpoint="tiny-sd2", refiner_switch_at=0.5, steps=4)
    with TestClient(create_app(settings)) as client:
        _error(client.post("/txt2img", json={**body, "refiner_checkpoint": "nope"}), 422, "refiner_checkpoint")
        _error(client.post("/txt2img", json={**body, "refiner_switch_at": 1.5}), 422, "refiner_switch_at")
        job_id = client.post("/txt2img", json=body).json()["job_id"]
        phases = set()
        while (status := client.get(f"/queue/{job_id}").json())["state"] not in ("done", "error", "cancelled"):
            phases.add(status["current_phase"])
            time.sleep(0.05)
        assert status["state"] == "done", status
        png = base64.b64decode(status["image"])
        assert "refining" in phases, phases
    # The same job through the SDK: the base model, then the refiner from 0.5 on.
    base = sfumato.load_model(sd1_tiny_gguf, model_config={"threads": 2})
    refiner = sfumato.load_model(sd2_gguf, model_config={"threads": 2})
    try:
        expected = sfumato.diffusion(
            base, prompt="a lighthouse", width=SIZE, height=SIZE, steps=4, seed=4, sampling_method="dpm++2m",
            scheduler="karras", refiner={"model_id": refiner, "switch_at": 0.5},
        ).outputs.result()  # fmt: skip
    finally:
        sfumato.unload_model(base)
        sfumato.unload_model(refiner)
    assert [png] == expected


def test_img2img_job(client: TestClient, gradient_image: np.ndarray) -> None:
    buffer = io.BytesIO()
    Image.fromarray(gradient_image).save(buffer, format="PNG")
    body = _request(init_image=base64.b64encode(buffer.getvalue()).decode(), strength=0.5, fileType="png")
    done = _wait(client, client.post("/img2img", json=body).json()["job_id"])
    assert done["state"] == "done" and "init_image" not in done["payload"]
    assert done["payload"]["strength"] == 0.5
    _error(client.post("/img2img", json={**body, "init_image": "@@not base64@@"}), 422, "init_image")
    not_an_image = base64.b64encode(b"plain text").decode()
    _error(client.post("/img2img", json={**body, "init_image": not_an_image}), 422, "init_image")


@pytest.mark.parametrize(
    ("fields", "field", "says"),
    [
        ({"width": 96}, "width", "multiple of 64"),
        ({"width": 4096}, "width", "less than or equal to 2048"),
        ({"steps": 0}, "steps", "greater than or equal to 1"),
        ({"fileType": "gif"}, "fileType", "'jpg' or 'png'"),
        ({"model": "../models/tiny-sd1"}, "model", f"available: {MODEL}"),
        ({"model": "notes"}, "model", "no model named 'notes'"),
        ({"sampler_name": "Magic"}, "sampler_name", "DPM++ 2M Karras"),
        ({"scheduler_type": "wobbly"}, "scheduler_type", "karras"),
        ({"loras": ["ink-style"]}, "loras[0]", "no LoRA named 'ink-style'"),
        ({"prompt": ""}, "prompt", "at least 1 character"),
        ({"prompt": "x" * 4001}, "prompt", "the limit is 4000"),
        ({"colour": "red"}, "colour", "Extra inputs"),
        ({"jpeg_quality": 0}, "jpeg_quality", "greater than or equal to 1"),
    ],
)
def test_bad_requests_name_the_field(client: TestClient, fields: dict[str, Any], field: str, says: str) -> None:
    body = _error(client.post("/txt2img", json=_request(**fields)), 422, field)
    assert says in body["error"], body


def test_queue_full_cancel_and_events(settings: ServerSettings) -> None:
    with TestClient(create_app(replace(settings, queue_size=1))) as client:
        job_id = client.post("/txt2img", json=_request(steps=150)).json()["job_id"]
        body = _error(client.post("/txt2img", json=_request()), 409)
        assert body["code"] == "queue_full" and "limit is 1" in body["error"]
        _wait(client, job_id, ("processing",))
        with client.stream("GET", f"/queue/{job_id}/events") as events:
            first = next(line for line in events.iter_lines() if line.startswith("data: "))
            assert json.loads(first.removeprefix("data: "))["state"] == "processing"
        cancelled = client.delete(f"/queue/{job_id}").json()
        assert cancelled["state"] == "cancelled"
        assert _error(client.delete(f"/queue/{job_id}"), 409)["code"] == "job_ended"
        _error(client.get("/queue/no-such-job"), 404, "job_id")
        # The queue has room again; a new job runs on the reloaded model, and its
        # event stream ends with its final state.
        job_id = client.post("/txt2img", json=_request()).json()["job_id"]
        with client.stream("GET", f"/queue/{job_id}/events") as events:
            lines = [line.removeprefix("data: ") for line in events.iter_lines() if line.startswith("data: ")]
        states = [json.loads(line)["state"] for line in lines]
        assert states[-1] == "done" and "processing" in states


def test_jobs_survive_a_restart_of_the_server(settings: ServerSettings) -> None:
    with TestClient(create_app(settings)) as first:
        finished = first.post("/txt2img", json=_request(fileType="png")).json()["job_id"]
        _wait(first, finished)
        running = first.post("/txt2img", json=_request(steps=40, seed=1)).json()["job_id"]
        queued = first.post("/txt2img", json=_request(seed=2)).json()["job_id"]
        _wait(first, running, ("processing",))
    # The server stopped with one job running and one queued: the new one runs both.
    with TestClient(create_app(settings)) as second:
        assert _wait(second, finished)["image"]  # finished results are kept
        assert _wait(second, running)["state"] == "done"  # ran again from the start, first in line
        assert _wait(second, queued)["state"] == "done"


def test_api_key(settings: ServerSettings) -> None:
    with TestClient(create_app(replace(settings, api_key="s3cret"))) as client:
        assert client.get("/hello").status_code == 200
        assert _error(client.get("/models"), 401)["code"] == "unauthorized"
        _error(client.get("/models", headers={"Authorization": "Bearer wrong"}), 401)
        assert client.get("/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        _error(client.post("/txt2img", json=_request()), 401)


def test_body_limit(settings: ServerSettings) -> None:
    with TestClient(create_app(replace(settings, max_body_bytes=1000))) as client:
        body = _error(client.post("/txt2img", json=_request(prompt="x" * 2000)), 413)
        assert body["code"] == "body_too_large"


def test_openapi_lists_the_errors_of_every_route(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            codes = set(operation["responses"])
            assert {"401", "413", "422", "500"} <= codes, (method, path, codes)
    assert "409" in spec["paths"]["/txt2img"]["post"]["responses"]


def test_sfumato_serve_command(settings: ServerSettings) -> None:
    with serving(settings) as url, urllib.request.urlopen(f"{url}/models", timeout=5) as response:
        models = json.load(response)
    assert [m["name"] for m in models["models"]] == [MODEL]
    assert (settings.data_dir / "jobs.sqlite3").is_file()

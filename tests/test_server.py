"""``sfumato serve``: the job-queue API on the real engine, durable jobs,
auth, limits and the error shape."""

from __future__ import annotations

import base64
import io
import json
import time
import urllib.request
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

from .helpers import MODEL, SIZE, error_body, job_body, png_bytes, serving, sfumato_cli, wait_job


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


def test_limits_are_the_schemas_narrowed_by_the_servers(settings: ServerSettings) -> None:
    with TestClient(create_app(replace(settings, max_steps=40, max_pixels=256 * 256))) as client:
        limits = client.get("/limits").json()
    assert (limits["max_steps"], limits["max_pixels"], limits["side_multiple"]) == (40, 256 * 256, 64)
    # The request schema's bounds (the job-queue API's ranges), the steps narrowed to the server's;
    # a side may reach the pixels over the smallest other side, to a multiple of 64.
    assert limits["minimum"] == {"steps": 1, "cfg_scale": 0, "width": 64, "height": 64, "seed": -1, "strength": 0}
    assert limits["maximum"]["steps"] == 40 and limits["maximum"]["cfg_scale"] == 30
    assert limits["maximum"]["width"] == limits["maximum"]["height"] == 1024  # 1024 x 64 is 256 x 256 pixels
    seed_002 = {"steps": 30, "cfg_scale": 7.0, "width": 512, "height": 512, "seed": -1, "strength": 0.75,
                "sampler_name": "DPM++ 2M Karras", "scheduler_type": "karras"}  # fmt: skip
    assert limits["defaults"] == seed_002
    assert "Euler a" in limits["samplers"] and "karras" in limits["schedulers"]


def test_models_that_need_companion_files_are_not_offered(
    settings: ServerSettings, flux2_headers: dict[str, Path], sdxl_parts: dict[str, Path]
) -> None:
    (settings.models_dir / "klein.gguf").symlink_to(flux2_headers["diffusion"])
    (settings.models_dir / "sdxl-unet.gguf").symlink_to(sdxl_parts["unet"])
    with TestClient(create_app(settings)) as client:
        assert [m["name"] for m in client.get("/models").json()["models"]] == [MODEL]
        error_body(client.post("/txt2img", json=job_body(model="klein")), 422, "model")


def test_an_empty_models_folder_says_how_to_add_one(settings: ServerSettings, tmp_path: Path) -> None:
    with TestClient(create_app(replace(settings, models_dir=tmp_path / "nothing-here"))) as client:
        body = error_body(client.post("/txt2img", json=job_body()), 422, "model")
        assert body["error"].startswith("model: no model was named") and "--models DIR" in body["error"]
        named = error_body(client.post("/txt2img", json=job_body(model="sd15")), 422, "model")
        assert "no model named 'sd15'" in named["error"] and "is empty" in named["error"]


def test_txt2img_job_runs_to_done_with_every_field(client: TestClient) -> None:
    accepted = client.post("/txt2img", json=job_body())
    assert accepted.status_code == 200, accepted.text
    job_id = accepted.json()["job_id"]
    assert accepted.json()["status"] == "queued"
    done = wait_job(client, job_id)
    assert (done["state"], done["current_phase"], done["progress"], done["error"]) == ("done", "done", 100, None)
    assert done["payload"]["prompt"] == "a lighthouse" and done["payload"]["sampler_name"] == "DPM++ 2M Karras"
    jpeg = base64.b64decode(done["image"])
    with Image.open(io.BytesIO(jpeg)) as image:
        assert (image.format, image.size) == ("JPEG", (SIZE, SIZE))
    assert Path(done["output_path"]).read_bytes() == jpeg
    assert (done["width"], done["height"], done["file_type"], done["jpeg_quality"]) == (SIZE, SIZE, "jpg", 85)
    assert done["generation_time_sec"] > 0 and done["memory_before_mb"] > 0 and done["memory_after_mb"] > 0
    # The web page's thumbnail: a PNG of the image, at most the size asked for.
    thumbnail = client.get(f"/queue/{job_id}/thumbnail", params={"size": 32})
    assert thumbnail.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(thumbnail.content)) as image, Image.open(io.BytesIO(jpeg)) as full:
        assert image.size == (32, 32)
        small = np.asarray(full.convert("RGB").resize((32, 32), Image.Resampling.BOX), dtype=np.int16)
        assert np.abs(np.asarray(image.convert("RGB"), dtype=np.int16) - small).mean() < 8
    error_body(client.get(f"/queue/{job_id}/thumbnail", params={"size": 8}), 422, "size")
    listed = client.get("/queue", params={"limit": 1}).json()["jobs"][0]
    assert (listed["job_id"], listed["seed"], listed["payload"]) == (job_id, 4, done["payload"])


def test_png_output_is_what_the_sdk_makes_with_the_mapped_sampler(client: TestClient, sd1_tiny_gguf: Path) -> None:
    job_id = client.post("/txt2img", json=job_body(fileType="png", cfg_scale=5.0)).json()["job_id"]
    png = base64.b64decode(wait_job(client, job_id)["image"])
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
    body = job_body(fileType="png", refiner_checkpoint="tiny-sd2", refiner_switch_at=0.5, steps=4)
    with TestClient(create_app(settings)) as client:
        error_body(client.post("/txt2img", json={**body, "refiner_checkpoint": "nope"}), 422, "refiner_checkpoint")
        error_body(client.post("/txt2img", json={**body, "refiner_switch_at": 1.5}), 422, "refiner_switch_at")
        job_id = client.post("/txt2img", json=body).json()["job_id"]
        phases = set()
        while (status := client.get(f"/queue/{job_id}").json())["state"] not in ("done", "error", "cancelled"):
            phases.add(status["current_phase"])
            time.sleep(0.05)
        assert status["state"] == "done", status
        png = base64.b64decode(status["image"])
        assert "refining" in phases, phases
        # The same job through the SDK (on the server's workers, still loaded): the base model,
        # then the refiner from 0.5 on.
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
    body = job_body(init_image=base64.b64encode(buffer.getvalue()).decode(), strength=0.5, fileType="png")
    done = wait_job(client, client.post("/img2img", json=body).json()["job_id"])
    assert done["state"] == "done" and "init_image" not in done["payload"]
    assert done["payload"]["strength"] == 0.5
    error_body(client.post("/img2img", json={**body, "init_image": "@@not base64@@"}), 422, "init_image")
    not_an_image = base64.b64encode(b"plain text").decode()
    error_body(client.post("/img2img", json={**body, "init_image": not_an_image}), 422, "init_image")


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
    body = error_body(client.post("/txt2img", json=job_body(**fields)), 422, field)
    assert says in body["error"], body


def test_queue_full_cancel_and_events(settings: ServerSettings) -> None:
    with TestClient(create_app(replace(settings, queue_size=1))) as client:
        job_id = client.post("/txt2img", json=job_body(steps=150)).json()["job_id"]
        body = error_body(client.post("/txt2img", json=job_body()), 409)
        assert body["code"] == "queue_full" and "limit is 1" in body["error"]
        wait_job(client, job_id, ("processing",))
        with client.stream("GET", f"/queue/{job_id}/events") as events:
            first = next(line for line in events.iter_lines() if line.startswith("data: "))
            assert json.loads(first.removeprefix("data: "))["state"] == "processing"
        cancelled = client.delete(f"/queue/{job_id}").json()
        assert cancelled["state"] == "cancelled"
        assert error_body(client.get(f"/queue/{job_id}/thumbnail"), 409, "job_id")["code"] == "no_image"
        assert error_body(client.delete(f"/queue/{job_id}"), 409)["code"] == "job_ended"
        error_body(client.get("/queue/no-such-job"), 404, "job_id")
        # The queue has room again; a new job runs on the reloaded model, and its
        # event stream ends with its final state.
        job_id = client.post("/txt2img", json=job_body()).json()["job_id"]
        with client.stream("GET", f"/queue/{job_id}/events") as events:
            lines = [line.removeprefix("data: ") for line in events.iter_lines() if line.startswith("data: ")]
        states = [json.loads(line)["state"] for line in lines]
        assert states[-1] == "done" and "processing" in states


def test_a_cancel_mid_step_at_512_keeps_the_worker_and_its_model(settings: ServerSettings) -> None:
    with TestClient(create_app(settings)) as client:
        wait_job(client, client.post("/txt2img", json=job_body()).json()["job_id"])  # the model is loaded
        before = {s.model_id: (s.pid, s.restarts, s.resident) for s in sfumato.models_info()}
        job_id = client.post("/txt2img", json=job_body(width=512, height=512, steps=30)).json()["job_id"]
        deadline = time.monotonic() + 300
        while (status := client.get(f"/queue/{job_id}").json())["progress"] <= 0:  # in its sampling steps
            assert status["state"] in ("pending", "processing") and time.monotonic() < deadline, status
            time.sleep(0.05)
        asked = time.perf_counter()
        assert client.delete(f"/queue/{job_id}").json()["state"] == "cancelled"
        print(f"cancel at 512 took {(time.perf_counter() - asked) * 1000:.0f} ms")
        asked = time.perf_counter()
        assert wait_job(client, client.post("/txt2img", json=job_body()).json()["job_id"])["state"] == "done"
        print(f"from the cancel to the next job's end: {time.perf_counter() - asked:.2f} s")
        # The same worker ran the next job on the model it kept: no reload, no restart.
        assert {s.model_id: (s.pid, s.restarts, s.resident) for s in sfumato.models_info()} == before


def test_jobs_survive_a_restart_of_the_server(settings: ServerSettings) -> None:
    with TestClient(create_app(settings)) as first:
        finished = first.post("/txt2img", json=job_body(fileType="png")).json()["job_id"]
        wait_job(first, finished)
        running = first.post("/txt2img", json=job_body(steps=40, seed=1)).json()["job_id"]
        queued = first.post("/txt2img", json=job_body(seed=2)).json()["job_id"]
        wait_job(first, running, ("processing",))
    # The server stopped with one job running and one queued: the new one runs both.
    with TestClient(create_app(settings)) as second:
        assert wait_job(second, finished)["image"]  # finished results are kept
        assert wait_job(second, running)["state"] == "done"  # ran again from the start, first in line
        assert wait_job(second, queued)["state"] == "done"


def test_api_key(settings: ServerSettings) -> None:
    with TestClient(create_app(replace(settings, api_key="s3cret"))) as client:
        assert client.get("/hello").status_code == 200
        assert error_body(client.get("/models"), 401)["code"] == "unauthorized"
        error_body(client.get("/models", headers={"Authorization": "Bearer wrong"}), 401)
        assert client.get("/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        error_body(client.post("/txt2img", json=job_body()), 401)
        # HTTP Basic with the key as the password, as A1111 clients send it (any user name).
        assert client.get("/sdapi/v1/options", auth=("anyone", "s3cret")).status_code == 200
        assert error_body(client.get("/sdapi/v1/options", auth=("anyone", "wrong")), 401)["code"] == "unauthorized"
        error_body(client.get("/models", headers={"Authorization": "Basic not-base64!"}), 401)
        # Health probes need no key.
        assert client.get("/internal/ping").status_code == client.get("/queue/status").status_code == 200


def test_body_limit(settings: ServerSettings) -> None:
    with TestClient(create_app(replace(settings, max_body_bytes=1000))) as client:
        body = error_body(client.post("/txt2img", json=job_body(prompt="x" * 2000)), 413)
        assert body["code"] == "body_too_large"


def test_openapi_lists_the_errors_of_every_route(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            codes = set(operation["responses"])
            assert {"401", "413", "422", "500"} <= codes, (method, path, codes)
    assert "409" in spec["paths"]["/txt2img"]["post"]["responses"]


def test_sfumato_serve_command(settings: ServerSettings, tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    with serving(settings, log=log) as url, urllib.request.urlopen(f"{url}/models", timeout=5) as response:
        models = json.load(response)
    assert [m["name"] for m in models["models"]] == [MODEL]
    assert (settings.data_dir / "jobs.sqlite3").is_file()
    # It says where it listens and what it offers.
    said = log.read_text().splitlines()
    assert said[:2] == [f"sfumato serve: {url}/ (the web page; the APIs under it)",
                        f"1 model(s) in {settings.models_dir}: {MODEL} (SD 1.x)"]  # fmt: skip


# The store as the version before typed plans wrote it: the same table, no user_version,
# and each plan an untyped dict.
_STORE_BEFORE_VERSIONS = """
CREATE TABLE jobs (id TEXT PRIMARY KEY, kind TEXT NOT NULL, request TEXT NOT NULL, state TEXT NOT NULL,
    progress REAL NOT NULL DEFAULT 0, phase TEXT NOT NULL DEFAULT 'queued', error TEXT, result TEXT,
    created REAL NOT NULL, started REAL, finished REAL);
"""


def _old_plan(prompt: str, **params: Any) -> dict[str, Any]:
    sdk = {"prompt": prompt, "negative_prompt": "", "width": SIZE, "height": SIZE, "steps": 2, "cfg_scale": 7.0,
           "sampling_method": "dpm++2m", "scheduler": "karras", "seed": 4, "batch_count": 1, "strength": 0.75,
           "init_image": None, "mask": None, "hires": None, "loras": []}  # fmt: skip
    return {"model": MODEL, "params": {**sdk, **params}, "file_type": "png", "jpeg_quality": 85}


def _write_old_store(path: Path, plans: dict[str, dict[str, Any]]) -> None:
    import sqlite3

    path.parent.mkdir(parents=True)
    db = sqlite3.connect(str(path))
    db.executescript(_STORE_BEFORE_VERSIONS)
    for i, (job_id, plan) in enumerate(plans.items()):
        request = json.dumps({"payload": {"prompt": plan["params"]["prompt"]}, "plan": plan})
        db.execute("INSERT INTO jobs (id, kind, request, state, phase, created) VALUES (?, 'txt2img', ?, 'queued',"
                   " 'queued', ?)", (job_id, request, time.time() + i))  # fmt: skip
    db.commit()
    db.close()


def test_jobs_a_store_held_before_plans_had_a_version_run_after_the_upgrade(settings: ServerSettings) -> None:
    import sqlite3

    later = {**_old_plan("from the future"), "version": 99}
    _write_old_store(settings.db_path, {"old-1": _old_plan("an old lighthouse"), "later-1": later})
    with TestClient(create_app(settings)) as client:
        done = wait_job(client, "old-1")
        assert done["state"] == "done", done["error"]
        with Image.open(io.BytesIO(base64.b64decode(done["image"]))) as image:
            assert (image.format, image.size) == ("PNG", (SIZE, SIZE))
        refused = wait_job(client, "later-1")
        assert refused["state"] == "error" and "version 99" in refused["error"], refused
        listed = {j["job_id"]: j["prompt"] for j in client.get("/queue").json()["jobs"]}
        assert listed["old-1"] == "an old lighthouse"
    with sqlite3.connect(str(settings.db_path)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] >= 2


def test_a_store_of_a_later_schema_is_refused_by_name(settings: ServerSettings) -> None:
    import sqlite3

    from sfumato.server.jobs.schema import StoreVersionError

    _write_old_store(settings.db_path, {})
    with sqlite3.connect(str(settings.db_path)) as db:
        db.execute("PRAGMA user_version = 1000")
    with pytest.raises(StoreVersionError, match="schema version 1000"):
        create_app(settings)
    done = sfumato_cli("serve", "--data", str(settings.data_dir), "--models", str(settings.models_dir), timeout=120)
    assert done.returncode == 2 and "schema version 1000" in done.stderr, done.stderr


def test_a_plan_survives_its_json_round_trip(client: TestClient, settings: ServerSettings) -> None:
    from sfumato.server.jobs.plan import JobPlan

    body = job_body(init_image=base64.b64encode(png_bytes(np.zeros((SIZE, SIZE, 3), np.uint8))).decode())
    accepted = client.post("/img2img", json={**body, "hires": {"enabled": True, "scale": 2.0, "steps": 1}})
    assert accepted.status_code == 200, accepted.text
    client.delete(f"/queue/{accepted.json()['job_id']}")
    stored = client.app.state.sfumato.store.get(accepted.json()["job_id"]).request["plan"]  # type: ignore[attr-defined]
    plan = JobPlan.from_json(stored)
    assert plan.to_json() == stored and JobPlan.from_json(plan.to_json()) == plan
    assert plan.generation.init_image is not None and plan.generation.hires is not None


def test_a_version_2_plan_is_read_into_the_sdk_params() -> None:
    from sfumato.params import DiffusionParams, HiresConfig
    from sfumato.server.jobs.plan import JobPlan

    # As the version before stored a generation: its own field list, hires without tile_size.
    params = {**_old_plan("a harbour")["params"], "control_image": None, "control_strength": 0.9, "preview": None,
              "preview_interval": 1, "clip_skip": -1, "guidance": 3.5, "upscale": {"repeats": 1},
              "init_image": base64.b64encode(b"\x89PNG").decode(),
              "hires": {"scale": 2.0, "upscaler": "Latent", "steps": 3, "denoising_strength": 0.5},
              "loras": [{"path": "/loras/ink.safetensors", "scale": 0.8}]}  # fmt: skip
    plan = JobPlan.from_json({"version": 2, "model": MODEL, "params": params, "file_type": "png", "jpeg_quality": 85})
    work = plan.generation
    assert isinstance(work, DiffusionParams) and work.prompt == "a harbour" and work.init_image == b"\x89PNG"
    assert work.hires == HiresConfig(scale=2.0, upscaler="Latent", steps=3, denoising_strength=0.5)
    assert work.loras == ({"path": "/loras/ink.safetensors", "scale": 0.8},) and work.upscale == {"repeats": 1}
    assert JobPlan.from_json(plan.to_json()) == plan and plan.to_json()["version"] == JobPlan.VERSION


def test_metrics_count_the_queue_in_prometheus_format(client: TestClient) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        response = client.get("/metrics")
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(response.text) for s in family.samples}  # fmt: skip

    before = scrape()
    assert before[("sfumato_workers", ())] == 1 and before[("sfumato_queue_depth", ())] == 0
    done = wait_job(client, client.post("/txt2img", json=job_body()).json()["job_id"])
    assert done["state"] == "done"
    after = scrape()
    assert after[("sfumato_jobs", (("state", "done"),))] == before[("sfumato_jobs", (("state", "done"),))] + 1
    claims = ("sfumato_claim_latency_seconds_count", ())
    assert after[claims] == before[claims] + 1
    assert after[("sfumato_claim_latency_seconds_sum", ())] >= 0
    assert after[("sfumato_jobs", (("state", "queued"),))] == 0


def test_a_queued_job_whose_model_left_its_folder_fails_naming_it(settings: ServerSettings) -> None:
    """On one machine the server's worker takes every job, so a job whose model file was
    removed while it waited fails by name instead of waiting for ever."""
    second = settings.models_dir / "second.gguf"
    second.symlink_to((settings.models_dir / f"{MODEL}.gguf").resolve())
    with TestClient(create_app(settings)) as client:
        first = client.post("/txt2img", json=job_body(steps=12, model=MODEL)).json()["job_id"]
        orphan = client.post("/txt2img", json=job_body(model="second")).json()["job_id"]
        wait_job(client, first, states=("processing",))
        second.unlink()
        failed = wait_job(client, orphan)
        assert failed["state"] == "error" and failed["error"] == "model 'second' is no longer in its folder"
        done = wait_job(client, first)
        assert done["state"] == "done", done["error"]


def test_jobs_per_device_runs_two_models_at_once(settings: ServerSettings) -> None:
    """``jobs_per_device=2``: the server's worker runs a job of each model side by side
    (each model in its engine process); with the default, one waits for the other."""
    (settings.models_dir / "second.gguf").symlink_to((settings.models_dir / f"{MODEL}.gguf").resolve())
    for jobs, together in ((2, True), (1, False)):
        with TestClient(create_app(replace(settings, jobs_per_device=jobs))) as client:
            ids = [
                client.post("/txt2img", json=job_body(steps=16, model=m)).json()["job_id"] for m in (MODEL, "second")
            ]
            wait_job(client, ids[0], states=("processing",))
            states = {client.get(f"/queue/{i}").json()["state"] for i in ids}
            deadline = time.monotonic() + 60
            while together and states != {"processing"} and time.monotonic() < deadline:
                time.sleep(0.05)
                states = {client.get(f"/queue/{i}").json()["state"] for i in ids}
            assert (states == {"processing"}) is together, states
            [worker] = client.get("/workers").json()["workers"]
            assert worker["slots"] == jobs
            assert all(wait_job(client, i)["state"] == "done" for i in ids)

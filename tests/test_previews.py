"""Live previews on the real engine: the engine's preview callback puts the image
as it forms on the sampling ticks (SDK, CLI), and every HTTP API shows them as it
already shows progress: job-queue SSE ``preview`` events, A1111's
``progress.current_image``, OpenAI's ``partial_image`` stream events. Previews
never change the final image."""

from __future__ import annotations

import base64
import io
import threading
from typing import Any

import numpy as np
import openai
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import sfumato

from .helpers import SIZE, job_body, run, sfumato_cli, sse_events, wait_job


def _size(png: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG"
        return image.size


def test_sampling_ticks_carry_previews_and_the_image_does_not_change(sd1_model: str) -> None:
    plain, _, plain_ticks = run(sd1_model, steps=4, seed=6)
    shown, _, ticks = run(sd1_model, steps=4, seed=6, preview="proj")
    assert shown == plain
    assert all(t.preview is None for t in plain_ticks)
    sampling = [t for t in ticks if t.phase == "sampling"]
    assert [t.step for t in sampling] == [1, 2, 3, 4]
    previews = [t.preview for t in sampling]
    assert all(p is not None and _size(p) == (SIZE // 8, SIZE // 8) for p in previews)  # the latent, projected
    assert len(set(previews)) > 1  # the image forms step by step
    assert all(t.preview is None for t in ticks if t.phase != "sampling")


def test_preview_interval_and_the_vae_mode(sd1_model: str) -> None:
    _, _, ticks = run(sd1_model, steps=5, seed=6, preview="proj", preview_interval=2)
    assert [t.step for t in ticks if t.preview is not None] == [2, 4, 5]  # every second step, and the last
    _, _, decoded = run(sd1_model, steps=2, seed=6, preview="vae")
    assert [_size(t.preview) for t in decoded if t.preview is not None] == [(SIZE, SIZE)] * 2
    with pytest.raises(sfumato.InvalidParameterError) as caught:
        run(sd1_model, preview="fast")
    assert caught.value.field == "preview"


def test_the_cli_writes_the_latest_preview(sd1_tiny_gguf: Any, tmp_path: Any) -> None:
    done = sfumato_cli(
        "generate", "-m", str(sd1_tiny_gguf), "-p", "a boat", "-W", str(SIZE), "-H", str(SIZE), "--steps", "3",
        "--seed", "2", "--threads", "2", "-q", "--preview", "proj", "-o", str(tmp_path),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert _size((tmp_path / "sfumato_preview.png").read_bytes()) == (SIZE // 8, SIZE // 8)


def test_job_queue_events_carry_previews(client: TestClient) -> None:
    job_id = client.post("/txt2img", json=job_body(steps=6, preview=True, fileType="png")).json()["job_id"]
    events = sse_events(client, job_id)
    previews = [data for name, data in events if name == "preview"]
    assert previews and all(p["job_id"] == job_id and 1 <= p["step"] <= 6 for p in previews)
    assert [p["step"] for p in previews] == sorted({p["step"] for p in previews})
    assert _size(base64.b64decode(previews[-1]["image"])) == (SIZE // 8, SIZE // 8)
    assert events[-1][0] == "progress" and events[-1][1]["state"] == "done"
    plain = client.post("/txt2img", json=job_body(steps=6, fileType="png")).json()["job_id"]
    assert not [name for name, _ in sse_events(client, plain) if name == "preview"]
    assert wait_job(client, plain)["image"] == wait_job(client, job_id)["image"]


def test_a1111_progress_shows_the_current_image(client: TestClient) -> None:
    assert client.get("/sdapi/v1/options").json()["live_previews_enable"] is True  # A1111's default
    client.post("/sdapi/v1/options", json={"show_progress_every_n_steps": 1})
    body = {"prompt": "a red cube", "steps": 12, "width": SIZE, "height": SIZE, "seed": 3}
    answer: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: answer.update(client.post("/sdapi/v1/txt2img", json=body).json()))
    worker.start()
    seen = []
    while worker.is_alive():
        progress = client.get("/sdapi/v1/progress").json()
        if progress["current_image"]:
            seen.append(progress["current_image"])
        worker.join(0.02)
    assert seen and _size(base64.b64decode(seen[-1])) == (SIZE // 8, SIZE // 8)
    assert client.get("/sdapi/v1/progress", params={"skip_current_image": True}).json()["current_image"] is None
    client.post("/sdapi/v1/options", json={"live_previews_enable": False})
    off = client.post("/sdapi/v1/txt2img", json=body).json()
    assert off["images"] == answer["images"]
    bad = client.post("/sdapi/v1/options", json={"show_progress_every_n_steps": "often"})
    assert bad.status_code == 422 and bad.json()["field"] == "show_progress_every_n_steps"


def test_openai_stream_sends_partial_images(client: TestClient) -> None:
    oai = openai.OpenAI(base_url=f"{client.base_url}/v1", api_key="unused", http_client=client, max_retries=0)
    events = list(
        oai.images.generate(
            prompt="a kite", size=f"{SIZE}x{SIZE}", stream=True, partial_images=2, extra_body={"steps": 6, "seed": 1}
        )
    )
    kinds = [e.type for e in events]
    partial = [e for e in events if e.type == "image_generation.partial_image"]
    assert 1 <= len(partial) <= 2, kinds
    assert [getattr(e, "partial_image_index", None) for e in partial] == list(range(len(partial)))
    with Image.open(io.BytesIO(base64.b64decode(partial[0].b64_json))) as image:  # type: ignore[union-attr]
        assert np.asarray(image).shape == (SIZE // 8, SIZE // 8, 3)
    assert kinds[-1] == "image_generation.completed" and kinds.index("image_generation.partial_image") < len(kinds) - 1

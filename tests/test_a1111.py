"""The AUTOMATIC1111 API (``/sdapi/v1``) on the real engine, as its clients call it."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from typing import Any

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from .helpers import MODEL, SIZE, error_body

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
    assert [u["name"] for u in client.get(f"{API}/upscalers").json()] == ["None", "esrgan-x4"]
    assert client.get(f"{API}/loras").json() == []
    assert client.get(f"{API}/options").json()["sd_model_checkpoint"] == MODEL
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

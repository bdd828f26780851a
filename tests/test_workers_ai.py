"""The Workers-AI-style synchronous route: one request answered with
the PNG bytes, on the real engine."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from .helpers import MODEL, error_body, gradient, png_bytes

RUN = "/ai/run/@cf/bytedance/stable-diffusion-xl-lightning"


def test_workers_ai_answers_png_bytes_on_both_paths(client: TestClient) -> None:
    body = {"prompt": "cyberpunk cat", "width": 256, "height": 256, "num_steps": 1, "seed": 3}
    answer = client.post(RUN, json=body)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(answer.content)) as image:
        assert (image.format, image.size) == ("PNG", (256, 256))
    again = client.post(f"/client/v4/accounts/abc123/ai/run/{MODEL}", json=body)
    assert again.status_code == 200 and again.content == answer.content  # same seed, same model


def test_workers_ai_inpainting_with_byte_arrays(client: TestClient) -> None:
    source = gradient(256)
    mask = np.zeros((256, 256), dtype=np.uint8)
    mask[:, 128:] = 255
    body = {"prompt": "a door", "image": list(png_bytes(source)), "mask": list(png_bytes(mask)),
            "num_steps": 2, "seed": 5, "width": 256, "height": 256}  # fmt: skip
    answer = client.post(RUN, json=body)
    assert answer.status_code == 200, answer.text
    out = np.asarray(Image.open(io.BytesIO(answer.content)).convert("RGB")).astype(int)
    keep = mask == 0
    assert np.abs(out[keep] - source.astype(int)[keep]).max() <= 1
    assert np.abs(out[~keep] - source.astype(int)[~keep]).mean() > 10
    b64 = client.post(RUN, json={**{k: v for k, v in body.items() if k != "image"},
                                 "image_b64": base64.b64encode(png_bytes(source)).decode()})  # fmt: skip
    assert b64.status_code == 200 and b64.content == answer.content


@pytest.mark.parametrize(
    ("body", "field"),
    [({"prompt": ""}, "prompt"), ({"width": 255}, "width"), ({"height": 2049}, "height"),
     ({"num_steps": 21}, "num_steps"), ({"image": [1, 256]}, "image.1"), ({"mask": [0]}, "mask"),
     ({"width": 300}, "width"), ({"image": [1, 2, 3]}, "image"), ({"steps": 4}, "steps")],
)  # fmt: skip
def test_workers_ai_bad_requests_name_the_field(client: TestClient, body: dict[str, Any], field: str) -> None:
    error_body(client.post(RUN, json={"prompt": "x", **body}), 422, field)


def test_workers_ai_image_given_twice(client: TestClient) -> None:
    png = png_bytes(gradient(64))
    body = {"prompt": "x", "image": list(png), "image_b64": base64.b64encode(png).decode()}
    error_body(client.post(RUN, json=body), 422, "image_b64")

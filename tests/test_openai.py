"""The OpenAI images API, driven by the official ``openai`` client on the real engine."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import numpy as np
import openai
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from .helpers import SIZE, error_body

FAST = {"steps": 2, "seed": 11}


@pytest.fixture
def oai(client: TestClient) -> Iterator[openai.OpenAI]:
    yield openai.OpenAI(base_url=f"{client.base_url}/v1", api_key="unused", http_client=client, max_retries=0)


def _picture(b64: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB")).astype(np.int16)


def test_generate_returns_b64_images_of_the_requested_size(oai: openai.OpenAI) -> None:
    answer = oai.images.generate(prompt="a kite", n=2, size=f"{SIZE}x{SIZE}", model="dall-e-3", extra_body=FAST)
    assert answer.data is not None and len(answer.data) == 2
    first, second = (_picture(d.b64_json or "") for d in answer.data)
    assert first.shape == second.shape == (SIZE, SIZE, 3)
    assert np.abs(first - second).max() > 0  # seed and seed + 1
    assert (answer.size, answer.output_format, answer.quality) == (f"{SIZE}x{SIZE}", "png", "auto")
    again = oai.images.generate(prompt="a kite", n=1, size=f"{SIZE}x{SIZE}", extra_body=FAST)
    assert again.data is not None and again.data[0].b64_json == answer.data[0].b64_json


def test_generate_jpeg_output(oai: openai.OpenAI) -> None:
    answer = oai.images.generate(
        prompt="a kite", size=f"{SIZE}x{SIZE}", output_format="jpeg", output_compression=50, extra_body=FAST
    )
    assert answer.data is not None
    with Image.open(io.BytesIO(base64.b64decode(answer.data[0].b64_json or ""))) as image:
        assert image.format == "JPEG"


def test_stream_sends_progress_then_the_image(oai: openai.OpenAI) -> None:
    events = list(oai.images.generate(prompt="a kite", size=f"{SIZE}x{SIZE}", stream=True, extra_body=FAST))
    kinds = [e.type for e in events]
    assert kinds[-1] == "image_generation.completed"
    progress = [e for e in events if e.type == "image_generation.progress"]
    assert progress, kinds
    values = [getattr(e, "progress", None) for e in progress]
    assert values == sorted(values) and all(v is not None and 0 <= v <= 1 for v in values)
    assert _picture(events[-1].b64_json).shape == (SIZE, SIZE, 3)  # type: ignore[union-attr]


def test_edit_with_a_mask_keeps_the_opaque_pixels(oai: openai.OpenAI, gradient_image: np.ndarray) -> None:
    source = io.BytesIO()
    Image.fromarray(gradient_image).save(source, format="PNG")
    alpha = np.full((SIZE, SIZE), 255, dtype=np.uint8)
    alpha[:, SIZE // 2 :] = 0  # OpenAI's convention: transparent pixels are edited
    rgba = np.dstack([gradient_image, alpha])
    mask = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(mask, format="PNG")
    answer = oai.images.edit(
        image=("in.png", source.getvalue(), "image/png"), mask=("mask.png", mask.getvalue(), "image/png"),
        prompt="a window", extra_body=FAST,
    )  # fmt: skip
    assert answer.data is not None
    out = _picture(answer.data[0].b64_json or "")
    assert out.shape == (SIZE, SIZE, 3)  # size "auto": the image's own
    kept, edited = alpha == 255, alpha == 0
    assert np.abs(out[kept] - gradient_image[kept]).max() <= 1
    assert np.abs(out[edited] - gradient_image[edited]).mean() > 10


def test_edit_stream_uses_the_edit_event_names(oai: openai.OpenAI, gradient_image: np.ndarray) -> None:
    source = io.BytesIO()
    Image.fromarray(gradient_image).save(source, format="PNG")
    events = list(oai.images.edit(image=("in.png", source.getvalue(), "image/png"), prompt="x", stream=True,
                                  extra_body=FAST))  # fmt: skip
    assert {e.type for e in events} == {"image_edit.progress", "image_edit.completed"}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"size": "64"}, "size"),
        ({"size": "96x64"}, "size"),
        ({"response_format": "url"}, "response_format"),
        ({"model": "nope"}, "model"),
        ({"n": 11}, "n"),
        ({"prompt": ""}, "prompt"),
        ({"background": "transparent"}, "background"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_bad_generation_requests_name_the_field(client: TestClient, body: dict[str, object], field: str) -> None:
    error_body(client.post("/v1/images/generations", json={"prompt": "a kite", **body}), 422, field)


def test_bad_edit_requests_name_the_field(client: TestClient) -> None:
    error_body(client.post("/v1/images/edits", data={"prompt": "x"}), 422, "image")
    files = {"image": ("in.png", b"not a picture", "image/png")}
    error_body(client.post("/v1/images/edits", data={"prompt": "x"}, files=files), 422, "image")


def test_openai_client_sees_errors_as_api_errors(oai: openai.OpenAI) -> None:
    """The client raises its typed error; our ``error`` field (the message) is its ``body``."""
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        oai.images.generate(prompt="a kite", size="10x10")
    assert isinstance(caught.value.body, str) and caught.value.body.startswith("size:")

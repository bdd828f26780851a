"""Seed 003 (parameter-schema document, POST with url_upload and a samples
count) and seed 004 (one synchronous request answered with PNG bytes), on the
real engine."""

from __future__ import annotations

import base64
import http.server
import io
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from sfumato.server.app import create_app
from sfumato.server.settings import ServerSettings

from .test_server import MODEL, _error, _wait, client, settings  # noqa: F401 - shared fixtures

CONFIG = "/api/v1/public/config/diffusion"
POST = "/api/v1/private/client/ai/diffusion"
RUN = "/ai/run/@cf/bytedance/stable-diffusion-xl-lightning"


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _gradient(side: int) -> np.ndarray:
    y, x = np.mgrid[0:side, 0:side]
    return np.stack([x % 256, y % 256, (x + y) % 256], axis=2).astype(np.uint8)


@pytest.fixture(scope="module")
def image_site() -> Iterator[str]:
    """A web server on loopback: a PNG, a redirect to it, a large file, a slow answer, text."""
    picture = _png(_gradient(320))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the standard library's name
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "/picture.png")
                self.end_headers()
                return
            if self.path == "/slow.png":
                time.sleep(3)
            body = {"/picture.png": picture, "/slow.png": picture, "/big.png": b"\0" * 200_000}.get(self.path, b"text")
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server under test gave up on purpose (size or time limit)

        def log_message(self, *_args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_config_document_describes_every_parameter_as_seed_003_does(client: TestClient) -> None:  # noqa: F811
    data = client.get(CONFIG).json()["data"]
    params = {p["in"]: p for p in data["aParam"]}
    assert set(params) == {"word", "url_upload", "steps", "guidance", "strength", "width", "height", "cimg", "seed",
                           "model"}  # fmt: skip
    assert params["word"]["isMandatory"] and params["word"]["type"] == "string"
    assert not params["url_upload"]["isMandatory"]
    # The seed's documented defaults and ranges.
    assert (params["steps"]["type"], params["steps"]["default"], params["steps"]["ui"]["max"]) == ("int", 20, 200)
    assert (params["guidance"]["type"], params["guidance"]["default"]) == ("float", 7.5)
    assert (params["guidance"]["ui"]["min"], params["guidance"]["ui"]["max"]) == (0.1, 10)
    assert (params["strength"]["default"], params["strength"]["ui"]["min"], params["strength"]["ui"]["max"]) == (
        0.75,
        0,
        1,
    )
    assert params["width"]["accept"]["$in"] == [320, 384, 448, 512, 640, 768] and params["width"]["default"] == 320
    assert params["cimg"]["accept"]["$in"] == [1, 2, 3, 4] and params["cimg"]["default"] == 1
    assert params["seed"]["default"] == 1 and params["seed"]["ui"]["max"] == 1_000_000
    assert params["model"]["accept"]["$in"] == [MODEL]
    assert all(p["ui"]["title"] and p["ui"]["widget"] and p["out"] for p in params.values())


def test_txt2img_with_a_samples_count(client: TestClient) -> None:  # noqa: F811
    created = client.post(POST, json={"word": "a harbour", "steps": 1, "cimg": 2, "seed": 9})
    assert created.status_code == 201, created.text
    uid = created.json()["data"]["uid"]
    assert created.json()["data"]["created_at"].endswith("Z")
    done = _wait(client, uid)
    assert done["state"] == "done", done
    images = [np.asarray(Image.open(io.BytesIO(base64.b64decode(b)))) for b in done["images"]]
    assert len(images) == 2 and all(i.shape == (320, 320, 3) for i in images)
    assert np.abs(images[0].astype(int) - images[1].astype(int)).max() > 0


def test_img2img_from_a_url_following_a_redirect(settings: ServerSettings, image_site: str) -> None:  # noqa: F811
    with TestClient(create_app(replace(settings, allow_private_urls=True))) as allowed:
        created = allowed.post(POST, json={"word": "a harbour", "url_upload": f"{image_site}/redirect", "steps": 1,
                                           "strength": 1.0})  # fmt: skip
        assert created.status_code == 201, created.text
        done = _wait(allowed, created.json()["data"]["uid"])
        assert done["state"] == "done" and (done["width"], done["height"]) == (320, 320)
        assert done["payload"]["url_upload"] == f"{image_site}/redirect"


@pytest.mark.parametrize(
    ("path", "allow", "says"),
    [
        ("/picture.png", False, "loopback, private or reserved"),
        ("/text", True, "not a readable image"),
        ("/big.png", True, "the limit is 100000"),
        ("/slow.png", True, "timed out"),
        ("/missing-host", True, "cannot resolve"),
    ],
)
def test_url_upload_refusals_name_the_field(
    settings: ServerSettings,
    image_site: str,
    path: str,
    allow: bool,
    says: str,  # noqa: F811
) -> None:
    url = "http://no-such-host.invalid/x.png" if path == "/missing-host" else f"{image_site}{path}"
    local = replace(settings, allow_private_urls=allow, fetch_timeout_s=1.0, fetch_max_bytes=100_000)
    with TestClient(create_app(local)) as c:
        body = _error(c.post(POST, json={"word": "x", "url_upload": url}), 422, "url_upload")
        assert says in body["error"], body


@pytest.mark.parametrize("url", ["ftp://example.com/a.png", "file:///etc/passwd", "http://[::1]:1/a.png",
                                 "http://169.254.169.254/latest", "http://10.0.0.1/a.png"])  # fmt: skip
def test_url_upload_schemes_and_private_addresses_are_refused(client: TestClient, url: str) -> None:  # noqa: F811
    _error(client.post(POST, json={"word": "x", "url_upload": url}), 422, "url_upload")


@pytest.mark.parametrize(
    ("body", "field"),
    [({"word": ""}, "word"), ({"word": "x", "width": 256}, "width"), ({"word": "x", "cimg": 5}, "cimg"),
     ({"word": "x", "steps": 201}, "steps"), ({"word": "x", "guidance": 0}, "guidance"),
     ({"word": "x", "saveinterval": 2}, "saveinterval")],
)  # fmt: skip
def test_seed_003_bad_requests_name_the_field(client: TestClient, body: dict[str, Any], field: str) -> None:  # noqa: F811
    _error(client.post(POST, json=body), 422, field)


def test_seed_003_backlog_full_is_409(settings: ServerSettings) -> None:  # noqa: F811
    with TestClient(create_app(replace(settings, queue_size=1))) as small:
        first = small.post(POST, json={"word": "x", "steps": 1})
        assert first.status_code == 201
        assert _error(small.post(POST, json={"word": "y", "steps": 1}), 409)["code"] == "queue_full"
        small.delete(f"/queue/{first.json()['data']['uid']}")


def test_seed_004_answers_png_bytes_on_both_paths(client: TestClient) -> None:  # noqa: F811
    body = {"prompt": "cyberpunk cat", "width": 256, "height": 256, "num_steps": 1, "seed": 3}
    answer = client.post(RUN, json=body)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(answer.content)) as image:
        assert (image.format, image.size) == ("PNG", (256, 256))
    again = client.post(f"/client/v4/accounts/abc123/ai/run/{MODEL}", json=body)
    assert again.status_code == 200 and again.content == answer.content  # same seed, same model


def test_seed_004_inpainting_with_byte_arrays(client: TestClient) -> None:  # noqa: F811
    source = _gradient(256)
    mask = np.zeros((256, 256), dtype=np.uint8)
    mask[:, 128:] = 255
    body = {"prompt": "a door", "image": list(_png(source)), "mask": list(_png(mask)), "num_steps": 2, "seed": 5,
            "width": 256, "height": 256}  # fmt: skip
    answer = client.post(RUN, json=body)
    assert answer.status_code == 200, answer.text
    out = np.asarray(Image.open(io.BytesIO(answer.content)).convert("RGB")).astype(int)
    keep = mask == 0
    assert np.abs(out[keep] - source.astype(int)[keep]).max() <= 1
    assert np.abs(out[~keep] - source.astype(int)[~keep]).mean() > 10
    b64 = client.post(RUN, json={**{k: v for k, v in body.items() if k != "image"},
                                 "image_b64": base64.b64encode(_png(source)).decode()})  # fmt: skip
    assert b64.status_code == 200 and b64.content == answer.content


@pytest.mark.parametrize(
    ("body", "field"),
    [({"prompt": ""}, "prompt"), ({"width": 255}, "width"), ({"height": 2049}, "height"),
     ({"num_steps": 21}, "num_steps"), ({"image": [1, 256]}, "image.1"), ({"mask": [0]}, "mask"),
     ({"width": 300}, "width"), ({"image": [1, 2, 3]}, "image"), ({"steps": 4}, "steps")],
)  # fmt: skip
def test_seed_004_bad_requests_name_the_field(client: TestClient, body: dict[str, Any], field: str) -> None:  # noqa: F811
    _error(client.post(RUN, json={"prompt": "x", **body}), 422, field)


def test_seed_004_image_given_twice(client: TestClient) -> None:  # noqa: F811
    png = _png(_gradient(64))
    body = {"prompt": "x", "image": list(png), "image_b64": base64.b64encode(png).decode()}
    _error(client.post(RUN, json=body), 422, "image_b64")

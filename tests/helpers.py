"""What the tests share besides fixtures: the test size, the CLI and SDK runners,
the server's request helpers and a real ``sfumato serve`` on a free port."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

import sfumato
from sfumato.runtime.protocol import LoadSpec
from sfumato.server.settings import ServerSettings

ROOT = Path(__file__).resolve().parent.parent
SIZE = 64  # the smallest side an SD UNet takes (three 2x downsamples of an 8x latent grid)
MODEL = "tiny-sd1"  # the model's name in the server fixtures' folders


def png_bytes(array: np.ndarray) -> bytes:
    """The PNG file of a uint8 image array."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def pixels(image: bytes) -> np.ndarray:
    """An image file's RGB pixels (to compare images whose files differ in metadata)."""
    with Image.open(io.BytesIO(image)) as opened:
        return np.asarray(opened.convert("RGB"))


def gradient(side: int) -> np.ndarray:
    """A ``side`` x ``side`` RGB picture with structure in every channel."""
    y, x = np.mgrid[0:side, 0:side]
    return np.stack([x % 256, y % 256, (x + y) % 256], axis=2).astype(np.uint8)


CaptureSpec = Callable[..., LoadSpec]


def header_file(path: Path, shapes: Mapping[str, tuple[int, ...]]) -> Path:
    """A safetensors file with these tensor names and shapes (zeros): enough for checks that read headers."""
    from safetensors.numpy import save_file

    save_file({name: np.zeros(shape, np.float16) for name, shape in shapes.items()}, str(path))
    return path


def sfumato_cli(*args: str, cwd: Path | None = None, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """Run the ``sfumato`` command in a process of its own."""
    return subprocess.run(
        [sys.executable, "-m", "sfumato", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, check=False
    )


def run(model_id: str, **params: object) -> tuple[list[bytes], sfumato.DiffusionStats, list[sfumato.ProgressTick]]:
    """Run ``diffusion`` at test size and wait for it."""
    params.setdefault("prompt", "a red cube")
    params.setdefault("width", SIZE)
    params.setdefault("height", SIZE)
    params.setdefault("steps", 2)
    params.setdefault("seed", 42)
    result = sfumato.diffusion(model_id, **params)  # type: ignore[arg-type]
    ticks = list(result.progress_stream)
    return result.outputs.result(), result.stats.result(), ticks


def job_body(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": "a lighthouse", "width": SIZE, "height": SIZE, "steps": 2, "seed": 4}
    body.update(fields)
    return body


def wait_job(
    client: TestClient, job_id: str, states: tuple[str, ...] = ("done", "error", "cancelled")
) -> dict[str, Any]:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        status: dict[str, Any] = client.get(f"/queue/{job_id}").json()
        if status["state"] in states:
            return status
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not reach {states}: {status}")


def sse_events(client: httpx.Client, job_id: str) -> list[tuple[str, dict[str, Any]]]:
    """A job's server-sent events (``GET /queue/{id}/events``) to its end, as (event, data)."""
    out = []
    with client.stream("GET", f"/queue/{job_id}/events") as stream:
        name = ""
        for line in stream.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                out.append((name, json.loads(line.removeprefix("data: "))))
    return out


def error_body(response: Any, status: int, field: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body["status"] == "error" and body["error"] and body["code"]
    if field is not None:
        assert body["field"] == field, body
    return body


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serving(settings: ServerSettings, *flags: str, log: Path | None = None) -> Iterator[str]:
    """Run ``sfumato serve`` on ``settings``' folders until the block ends; yields its base URL."""
    port = free_port()
    out = open(log, "wb") if log else subprocess.DEVNULL
    server = subprocess.Popen(
        [sys.executable, "-m", "sfumato", "serve", "--port", str(port), "--models", str(settings.models_dir),
         "--upscalers", str(settings.upscalers_dir), "--loras", str(settings.loras_dir),
         "--data", str(settings.data_dir), "--threads", "2", *flags],
        stdout=out, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/hello", timeout=2) as response:
                    assert json.load(response) == {"ok": True}
                break
            except OSError:
                assert server.poll() is None, f"sfumato serve exited with {server.returncode}"
                assert time.monotonic() < deadline, "sfumato serve did not come up in 60 s"
                time.sleep(0.2)
        yield url
        assert server.poll() is None, f"sfumato serve died with {server.returncode}"
    finally:
        server.terminate()
        server.wait(60)
        if log:
            out.close()  # type: ignore[union-attr]


CKPT = f"{MODEL}.gguf"  # ComfyUI names checkpoints by file name


def default_graph(**changes: Any) -> dict[str, Any]:
    """ComfyUI's default text-to-image graph in API format, at the test size."""
    graph: dict[str, Any] = {
        "3": {"class_type": "KSampler", "inputs": {
            "seed": 156680208700286, "steps": 3, "cfg": 8.0, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse on a cliff", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "text, watermark", "clip": ["4", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
    }  # fmt: skip
    for key, value in changes.items():
        node, _, name = key.partition(".")
        graph[node]["inputs"][name] = value
    return graph


def wait_history(client: TestClient, prompt_id: str) -> dict[str, Any]:
    """A ComfyUI prompt's history entry, once it has ended."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        entry = client.get(f"/history/{prompt_id}").json()
        if entry:
            return dict(entry[prompt_id])
        time.sleep(0.1)
    raise AssertionError(f"prompt {prompt_id} did not end")

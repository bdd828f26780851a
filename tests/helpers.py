"""What the tests share besides fixtures: the test size, the CLI and SDK runners,
the server's request helpers and a real ``sfumato serve`` on a free port."""

from __future__ import annotations

import io
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
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


# Pixel parity, on the 0..255 image: at most 2 levels anywhere and a PSNR of at least
# 50 dB (tests/test_parity.py says where the thresholds come from).
MAX_ABS, MIN_PSNR = 2, 50.0


def difference(a: np.ndarray, b: np.ndarray) -> tuple[int, float]:
    """(max abs difference, PSNR in dB) of two uint8 images."""
    assert a.shape == b.shape, (a.shape, b.shape)
    delta = a.astype(np.float64) - b.astype(np.float64)
    mse = float(np.mean(delta**2))
    return int(np.abs(delta).max()), float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def assert_close(ours: np.ndarray, ref: np.ndarray, max_abs: int = MAX_ABS, min_psnr: float = MIN_PSNR) -> None:
    """Both parity thresholds met (SD's unless a family states its own)."""
    found, psnr = difference(ours, ref)
    print(f"parity: max abs {found}, PSNR {psnr:.2f} dB")
    assert found <= max_abs and psnr >= min_psnr, f"max abs {found} (<= {max_abs}), PSNR {psnr:.2f} dB"


def assert_far(ours: np.ndarray, ref: np.ndarray, max_abs: int = MAX_ABS, min_psnr: float = MIN_PSNR) -> None:
    """Both parity thresholds missed (a negative control)."""
    found, psnr = difference(ours, ref)
    print(f"apart: max abs {found}, PSNR {psnr:.2f} dB")
    assert found > max_abs and psnr < min_psnr, f"max abs {found}, PSNR {psnr:.2f} dB: indistinguishable"


def parity_picture(path: Path, params: Mapping[str, Any], threads: int, **config: Any) -> np.ndarray:
    """The one picture the engine makes of ``params`` (``sfumato.diffusion``'s keywords) on
    ``path``, loaded for this alone as the parity tests load a model: with the engine's
    ``cpu`` RNG (which imitates torch's), ``threads`` threads and ``config`` besides."""
    from sfumato.images import decode_png

    model_id = sfumato.load_model(path, model_config={"rng": "cpu", "threads": threads, **config})
    try:
        [png] = sfumato.diffusion(model_id, **params).outputs.result()
    finally:
        sfumato.unload_model(model_id)
    return decode_png(png)


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


def llm_header(folder: Path, width: int = 2560, layers: int = 36) -> Path:
    """A language model's header (Qwen3-4B's by default: 36 layers, 2560 wide) in Hugging Face's names."""
    return header_file(folder / f"llm-{layers}x{width}.safetensors", {
        "model.embed_tokens.weight": (8, width), f"model.layers.{layers - 1}.mlp.gate_proj.weight": (8, 8),
    })  # fmt: skip


def sfumato_cli(*args: str, cwd: Path | None = None, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """Run the ``sfumato`` command in a process of its own."""
    return subprocess.run(
        [sys.executable, "-m", "sfumato", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, check=False
    )


_SDK_PRELUDE = """
import json, logging, sys
from pathlib import Path
import sfumato
from sfumato import errors
from sfumato.images import decode_png
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
logging.getLogger("sfumato").setLevel(logging.DEBUG)  # the workers log at this level too
args = json.loads(sys.argv[1])
out = Path(args["out"])
def status(model_id):
    return next(s for s in sfumato.models_info() if s.model_id == model_id)
def unload(model_id):
    while model_id in sfumato.loaded_models():
        sfumato.unload_model(model_id)
"""


def sdk_script(script: str, tmp_path: Path, env: Mapping[str, str], **args: Any) -> tuple[Any, str]:
    """Run an SDK ``script`` in a process of its own, with ``env`` over this one's
    (``SFUMATO_BACKENDS``, ``GGML_VK_VISIBLE_DEVICES``, ``SFUMATO_CPU_VARIANT`` and
    ``SFUMATO_PRECISION`` from ``env`` only). The script sees ``args`` (with ``out``: ``tmp_path``), ``status`` and
    ``unload``; its workers log to stderr. Returns the JSON it prints last and its stderr
    (the engines' log)."""
    unset = ("SFUMATO_BACKENDS", "GGML_VK_VISIBLE_DEVICES", "SFUMATO_CPU_VARIANT", "SFUMATO_PRECISION")
    environ = {k: v for k, v in os.environ.items() if k not in unset}
    environ.update(env)
    done = subprocess.run(
        [sys.executable, "-c", _SDK_PRELUDE + script, json.dumps({**args, "out": str(tmp_path)})],
        env=environ, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"{done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


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


CLIENTS, REQUESTS = 20, 200


@dataclass
class LoadReport:
    """What a load test saw: responses by (kind, status), latencies, the jobs accepted and
    how each ended, the failures (5xx, or a 4xx other than 409/429), and its durations."""

    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    latencies: dict[str, list[float]] = field(default_factory=lambda: {"generate": [], "poll": [], "cancel": []})
    accepted: list[str] = field(default_factory=list)
    ended: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    sent_s: float = 0.0
    drained_s: float = 0.0

    def summary(self) -> str:
        def spread(values: list[float]) -> str:
            values = sorted(values)
            p95 = values[int(0.95 * (len(values) - 1))]
            median = statistics.median(values)
            return f"median {median * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, max {values[-1] * 1000:.0f} ms"

        outcomes = Counter(s["state"] for s in self.ended.values())
        return (
            f"\n{sum(self.statuses.values())} requests from {CLIENTS} clients in {self.sent_s:.1f} s; "
            f"all {len(self.accepted)} accepted jobs ended after {self.drained_s:.1f} s: {dict(outcomes)}\n"
            f"responses: {dict(sorted(self.statuses.items()))}\n"
            + "\n".join(f"{kind} latency: {spread(values)}" for kind, values in self.latencies.items() if values)
        )

    def check(self) -> None:
        """Every request answered without a 5xx, jobs were accepted and done, and every
        accepted job ended, with a reason when it did not finish."""
        assert sum(self.statuses.values()) == REQUESTS
        assert not self.failures, self.failures
        assert self.statuses[("generate", 200)] > 0
        assert Counter(s["state"] for s in self.ended.values())["done"] > 0
        for status in self.ended.values():
            assert status["state"] == "done" or status["error"], status


def load_test(urls: list[str]) -> LoadReport:
    """``CLIENTS`` clients on loopback, each sending its share of ``REQUESTS`` to one of
    ``urls`` (in turn) with pauses: generations (one step), polls and cancels of its own
    jobs; then every accepted job is followed to its end."""
    report = LoadReport()
    lock = threading.Lock()

    def client_loop(number: int) -> None:
        rng = random.Random(number)
        mine: list[str] = []
        with httpx.Client(base_url=urls[number % len(urls)], timeout=120) as http:
            for i in range(REQUESTS // CLIENTS):
                roll = rng.random()
                started = time.perf_counter()
                if not mine or roll < 0.45:
                    kind = "generate"
                    body = {"prompt": f"client {number} job {i}", "width": SIZE, "height": SIZE, "steps": 1,
                            "seed": number * 100 + i, "fileType": "png"}  # fmt: skip
                    response = http.post("/txt2img", json=body)
                    if response.status_code == 200:
                        mine.append(response.json()["job_id"])
                elif roll < 0.8:
                    kind = "poll"
                    response = http.get(f"/queue/{rng.choice(mine)}")
                else:
                    kind = "cancel"
                    response = http.delete(f"/queue/{rng.choice(mine)}")
                elapsed = time.perf_counter() - started
                with lock:
                    report.statuses[(kind, response.status_code)] += 1
                    report.latencies[kind].append(elapsed)
                    if response.status_code >= 500 or (
                        response.status_code >= 400 and response.status_code not in (409, 429)
                    ):
                        report.failures.append(f"{kind} {response.status_code} {response.text[:200]}")
                time.sleep(rng.uniform(0.0, 0.2))
        with lock:
            report.accepted.extend(mine)

    began = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(n,)) for n in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    report.sent_s = time.perf_counter() - began
    with httpx.Client(base_url=urls[0], timeout=30) as http:
        deadline = time.monotonic() + 600
        while len(report.ended) < len(report.accepted):
            assert time.monotonic() < deadline, f"{len(report.accepted) - len(report.ended)} jobs never ended"
            for job_id in report.accepted:
                if job_id not in report.ended:
                    status = http.get(f"/queue/{job_id}").json()
                    if status["state"] in ("done", "cancelled", "error"):
                        report.ended[job_id] = status
            time.sleep(0.5)
    report.drained_s = time.perf_counter() - began
    return report

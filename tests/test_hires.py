"""Hires fix on the real engine: SDK, CLI and the HTTP APIs (the job-queue API, A1111)."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

import sfumato

from .helpers import SIZE, error_body, job_body, run, sfumato_cli, wait_job


def _size(png: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(png)) as image:
        return image.size


@pytest.mark.parametrize(
    ("hires", "side"),
    [
        ({"scale": 2.0, "steps": 1, "denoising_strength": 0.5}, 2 * SIZE),
        ({"scale": 1.5, "steps": 1, "upscaler": "Lanczos"}, 2 * SIZE),  # 96 is rounded up to the multiple, 128
        (True, 2 * SIZE),
    ],
)
def test_hires_output_size_and_phases(sd1_model: str, hires: Any, side: int) -> None:
    outputs, stats, ticks = run(sd1_model, steps=2, seed=3, hires=hires)
    assert _size(outputs[0]) == (side, side)
    assert (stats.width, stats.height) == (side, side)
    phases = [t.phase for t in ticks]
    assert "hires" in phases and phases.index("hires") > phases.index("sampling")


def test_hires_with_an_esrgan_upscaler(sd1_model: str, esrgan_1b: Path) -> None:
    outputs, _, _ = run(sd1_model, steps=2, seed=3, hires={"scale": 2.0, "upscaler": esrgan_1b, "steps": 1})
    latent, _, _ = run(sd1_model, steps=2, seed=3, hires={"scale": 2.0, "steps": 1})
    assert _size(outputs[0]) == (2 * SIZE, 2 * SIZE)
    assert outputs != latent


def test_hires_changes_the_image_and_is_deterministic(sd1_model: str) -> None:
    plain, _, _ = run(sd1_model, steps=2, seed=3)
    first, _, _ = run(sd1_model, steps=2, seed=3, hires={"scale": 2.0, "steps": 1})
    again, _, _ = run(sd1_model, steps=2, seed=3, hires={"scale": 2.0, "steps": 1})
    assert first == again and _size(plain[0]) != _size(first[0])


@pytest.mark.parametrize(
    ("hires", "field"),
    [
        ({"scale": 1.0}, "hires.scale"),
        ({"scale": 5.0}, "hires.scale"),
        ({"steps": -1}, "hires.steps"),
        ({"denoising_strength": 1.5}, "hires.denoising_strength"),
        ({"upscaler": "Latent (blurry)"}, "hires.upscaler"),
        ({"upscaler": "/no/such/esrgan.pth"}, None),
        ({"sharpness": 1}, "hires"),
        ("yes", "hires"),
    ],
)
def test_bad_hires_names_the_field(sd1_model: str, hires: Any, field: str | None) -> None:
    with pytest.raises((sfumato.InvalidParameterError, sfumato.ModelNotFoundError)) as caught:
        sfumato.diffusion(sd1_model, prompt="x", width=SIZE, height=SIZE, hires=hires)
    if field is None:
        assert "hires.upscaler" in str(caught.value)
    else:
        assert caught.value.field == field  # type: ignore[union-attr]


def test_hires_upscaler_must_be_an_esrgan(sd1_model: str, sd1_gguf: Path) -> None:
    with pytest.raises(sfumato.InvalidModelError, match=r"hires\.upscaler"):
        sfumato.diffusion(sd1_model, prompt="x", width=SIZE, height=SIZE, hires={"upscaler": sd1_gguf})


def test_cli_hires(sd1_tiny_gguf: Path, tmp_path: Path) -> None:
    done = sfumato_cli(
        "generate", "--model", str(sd1_tiny_gguf), "--prompt", "a boat", "--width", str(SIZE), "--height", str(SIZE),
        "--steps", "2", "--seed", "5", "--threads", "2", "--hires", "--hires-scale", "2", "--hires-steps", "1",
        "--output", str(tmp_path),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    with Image.open(tmp_path / "sfumato_5_0.png") as image:
        assert image.size == (2 * SIZE, 2 * SIZE)


def test_seed_002_hires_reports_both_phases(client: TestClient) -> None:
    hires = {"enabled": True, "scale": 2.0, "upscaler": "esrgan-x4", "steps": 2, "denoising_strength": 0.5}
    job_id = client.post("/txt2img", json=job_body(steps=3, hires=hires, fileType="png")).json()["job_id"]
    seen: list[tuple[float, str]] = []
    with client.stream("GET", f"/queue/{job_id}/events") as events:
        for line in events.iter_lines():
            if line.startswith("data: "):
                event = __import__("json").loads(line[6:])
                seen.append((event["progress"], event["current_phase"]))
    done = wait_job(client, job_id)
    assert done["state"] == "done" and (done["width"], done["height"]) == (2 * SIZE, 2 * SIZE)
    assert _size(base64.b64decode(done["image"])) == (2 * SIZE, 2 * SIZE)
    initial = [p for p, phase in seen if phase == "initial generation"]
    upscaling = [p for p, phase in seen if phase == "upscaling"]
    assert initial and upscaling and max(initial) <= 50 <= min(upscaling)
    disabled = wait_job(
        client, client.post("/txt2img", json=job_body(hires={**hires, "enabled": False})).json()["job_id"]
    )
    assert (disabled["width"], disabled["height"]) == (SIZE, SIZE)
    error_body(client.post("/txt2img", json=job_body(hires={**hires, "upscaler": "nope"})), 422, "hires.upscaler")
    error_body(client.post("/txt2img", json=job_body(hires={**hires, "scale": 64.0})), 422, "hires.scale")


def test_a1111_enable_hr(client: TestClient) -> None:
    body = {"prompt": "a boat", "width": SIZE, "height": SIZE, "steps": 2, "seed": 2, "enable_hr": True,
            "hr_scale": 2, "hr_second_pass_steps": 1, "denoising_strength": 0.5}  # fmt: skip
    out = client.post("/sdapi/v1/txt2img", json=body)
    assert out.status_code == 200, out.text
    assert _size(base64.b64decode(out.json()["images"][0])) == (2 * SIZE, 2 * SIZE)
    error_body(client.post("/sdapi/v1/txt2img", json={**body, "hr_upscaler": "nope"}), 422, "hr_upscaler")

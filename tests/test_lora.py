"""LoRA on the real engine: SDK, CLI and the HTTP APIs, with a self-made
kohya-layout LoRA for the SD 1.x UNet."""

from __future__ import annotations

import base64
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

import sfumato
from sfumato.server.app import create_app
from sfumato.server.settings import ServerSettings

from .helpers import MODEL, SIZE, default_graph, error_body, job_body, pixels, sfumato_cli, wait_history, wait_job


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory, sd1_lora: Path) -> Path:
    folder = tmp_path_factory.mktemp("loras")
    shutil.copy(sd1_lora, folder / "ink.safetensors")
    (folder / "notes.txt").write_text("not a LoRA")
    return folder


@pytest.fixture(scope="module")
def lora_model(sd1_gguf: Path, lora_dir: Path) -> Iterator[str]:
    model_id = sfumato.load_model(sd1_gguf, model_config={"threads": 2, "lora_dir": lora_dir})
    yield model_id
    sfumato.unload_model(model_id)


def _png(model_id: str, **params: Any) -> bytes:
    params = {"prompt": "a boat", "width": SIZE, "height": SIZE, "steps": 2, "seed": 6, **params}
    return sfumato.diffusion(model_id, **params).outputs.result()[0]


def test_scale_zero_is_no_lora_and_a_scale_changes_the_image(lora_model: str, lora_dir: Path) -> None:
    plain = _png(lora_model)
    assert _png(lora_model, loras=[{"name": "ink", "scale": 0.0}]) == plain
    full = _png(lora_model, loras=["ink"])  # a plain name: scale 1.0
    assert full != plain
    assert _png(lora_model, loras=[{"name": "ink", "scale": 1.0}]) == full
    assert _png(lora_model, loras=[{"path": lora_dir / "ink.safetensors"}]) == full
    assert _png(lora_model, loras=[{"name": "ink", "scale": -1.0}]) not in (plain, full)
    # The weights are never changed in place: no LoRA afterwards is the first image again.
    assert _png(lora_model) == plain


@pytest.mark.parametrize(
    ("loras", "field", "says"),
    [
        (["nope"], "loras[0]", "available: ink"),
        (["../ink"], "loras[0]", "no LoRA named '../ink'"),
        (["notes"], "loras[0]", "no LoRA named 'notes'"),
        ([{"name": "ink", "scale": "big"}], "loras[0].scale", "finite number"),
        ([{"name": "ink", "path": "/x"}], "loras[0]", "'name' or 'path'"),
        ("ink", "loras", "must be a list"),
        ([{"path": "/no/such/lora.safetensors"}], "loras[0]", "no LoRA file"),
    ],
)
def test_bad_loras_name_the_field(lora_model: str, loras: Any, field: str, says: str) -> None:
    with pytest.raises(sfumato.InvalidParameterError) as caught:
        sfumato.diffusion(lora_model, prompt="x", width=SIZE, height=SIZE, loras=loras)
    assert caught.value.field == field and says in str(caught.value)


def test_a_file_without_lora_tensors_is_refused(lora_model: str, sd1_gguf: Path, sd1_model: str) -> None:
    with pytest.raises(sfumato.InvalidParameterError, match="holds no LoRA tensors"):
        sfumato.diffusion(lora_model, prompt="x", width=SIZE, height=SIZE, loras=[{"path": sd1_gguf}])
    with pytest.raises(sfumato.InvalidParameterError, match=r"model_config\.lora_dir"):  # a name needs the folder
        sfumato.diffusion(sd1_model, prompt="x", width=SIZE, height=SIZE, loras=["ink"])
    with pytest.raises(sfumato.InvalidParameterError) as caught:
        sfumato.load_model(sd1_gguf, model_config={"lora_dir": "/no/such/folder"})
    assert caught.value.field == "model_config.lora_dir"


def test_cli_lora(sd1_gguf: Path, lora_dir: Path, tmp_path: Path) -> None:
    outputs = {}
    for label, flags in (("plain", []), ("zero", ["--lora", "ink:0"]), ("ink", ["--lora", "ink"])):
        out = tmp_path / label
        done = sfumato_cli(
            "generate", "--model", str(sd1_gguf), "--prompt", "a boat", "--width", str(SIZE), "--height", str(SIZE),
            "--steps", "2", "--seed", "6", "--threads", "2", "--lora-dir", str(lora_dir), *flags, "--output", str(out),
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        outputs[label] = (out / "sfumato_6_0.png").read_bytes()
    assert outputs["zero"] == outputs["plain"] != outputs["ink"]


def test_server_loras(settings: ServerSettings, sd1_gguf: Path, lora_dir: Path) -> None:
    # This LoRA's blocks are those of SD 1.x's full UNet, which the server's folder then holds.
    (settings.models_dir / f"{MODEL}.gguf").unlink()
    (settings.models_dir / f"{MODEL}.gguf").symlink_to(sd1_gguf)
    with TestClient(create_app(ServerSettings(**{**settings.__dict__, "loras_dir": lora_dir}))) as client:
        assert client.get("/loras").json()["loras"] == [{"name": "ink", "scale": 1.0}]

        def image(**fields: Any) -> bytes:
            done = wait_job(client, client.post("/txt2img", json=job_body(fileType="png", **fields)).json()["job_id"])
            assert done["state"] == "done", done
            return base64.b64decode(done["image"])

        plain = image()
        assert image(loras=[{"name": "ink", "scale": 0.0}]) == plain
        inked = image(loras=["ink"])
        assert inked != plain
        error_body(client.post("/txt2img", json=job_body(loras=["../ink"])), 422, "loras[0]")
        error_body(client.post("/txt2img", json=job_body(loras=["notes"])), 422, "loras[0]")
        # A1111 clients put LoRAs in the prompt.
        a1111 = {"prompt": "a lighthouse <lora:ink:1>", "width": SIZE, "height": SIZE, "steps": 2, "seed": 4,
                 "sampler_name": "DPM++ 2M Karras", "cfg_scale": 7}  # fmt: skip
        answer = client.post("/sdapi/v1/txt2img", json=a1111)
        assert answer.status_code == 200, answer.text
        assert np.array_equal(pixels(base64.b64decode(answer.json()["images"][0])), pixels(inked))
        error_body(client.post("/sdapi/v1/txt2img", json={**a1111, "prompt": "x <lora:ink:lots>"}), 422, "prompt")
        # ComfyUI's LoraLoader between the checkpoint and the sampler and prompts: the same image.
        graph = default_graph(**{"3.seed": 4, "3.steps": 2, "3.cfg": 7.0, "3.sampler_name": "dpmpp_2m",
                                 "3.scheduler": "karras", "6.text": "a lighthouse", "7.text": "",
                                 "3.model": ["10", 0], "6.clip": ["10", 1], "7.clip": ["10", 1]})  # fmt: skip
        graph["10"] = {"class_type": "LoraLoader", "inputs": {"model": ["4", 0], "clip": ["4", 1],
                       "lora_name": "ink.safetensors", "strength_model": 1.0, "strength_clip": 1.0}}  # fmt: skip
        entry = wait_history(client, client.post("/prompt", json={"prompt": graph}).json()["prompt_id"])
        assert client.get("/view", params=entry["outputs"]["9"]["images"][0]).content == inked

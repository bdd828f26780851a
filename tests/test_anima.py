"""Anima: detection and the companion checks before any engine call (Qwen3-0.6B's depth and
width, the Wan 2.1 VAE), then real engine runs from the SDK and the job-queue API, on the
DiT at its real widths with one block (the engine reads the depth from the file) and its
LLM adapter whole, Qwen3-0.6B whole and the Wan 2.1 VAE, all written by the suite."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

import sfumato
from sfumato import errors
from sfumato.families.detect import FAMILY_ANIMA, detect
from sfumato.images import decode_png
from sfumato.server.app import create_app
from sfumato.server.settings import ServerSettings

from .helpers import SIZE, llm_header, pixels, run, wait_job


def test_anima_is_detected_from_its_header(anima_gguf: Path) -> None:
    info = detect(anima_gguf)
    assert (info.family, info.split, info.has_vae, info.text_width) == (FAMILY_ANIMA, True, False, 1024)


@pytest.mark.usefixtures("no_engine_calls")
def test_anima_names_its_qwen3_and_its_vae(
    anima_gguf: Path, qwen3_0_6b_gguf: Path, wan_vae: Path, flux1_parts: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(errors.InvalidParameterError, match="pass its Qwen3 text encoder") as caught:
        sfumato.load_model(anima_gguf, model_config={"vae_model_src": wan_vae})
    assert caught.value.field == "model_config.llm_model_src"
    qwen3_4b = llm_header(tmp_path)
    with pytest.raises(errors.InvalidParameterError, match=r"36-layer .*Anima reads Qwen3-0\.6B \(28 layers, 1024"):
        sfumato.load_model(anima_gguf, model_config={"llm_model_src": qwen3_4b, "vae_model_src": wan_vae})
    config = {"llm_model_src": qwen3_0_6b_gguf, "vae_model_src": flux1_parts["vae"]}
    with pytest.raises(errors.InvalidParameterError, match=r"is a 2-D VAE; Anima decodes with the Wan") as caught:
        sfumato.load_model(anima_gguf, model_config=config)
    assert caught.value.field == "model_config.vae_model_src"


@pytest.mark.slow
def test_anima_generates_from_the_sdk_and_the_job_queue(
    anima_gguf: Path, qwen3_0_6b_gguf: Path, wan_vae: Path, tmp_path: Path
) -> None:
    config = {"llm_model_src": qwen3_0_6b_gguf, "vae_model_src": wan_vae, "threads": 2}
    model_id = sfumato.load_model(anima_gguf, model_config=config)
    try:
        cat, stats, _ = run(model_id, prompt="a cat", steps=1, seed=3)
        dog, _, _ = run(model_id, prompt="a dog", steps=1, seed=3)
        # flow_shift: the engine's own for Anima is 3; another moves the sigmas of 2 steps.
        own, _, _ = run(model_id, prompt="a cat", steps=2, seed=3)
        three, _, _ = run(model_id, prompt="a cat", steps=2, seed=3, flow_shift=3.0)
        six, _, _ = run(model_id, prompt="a cat", steps=2, seed=3, flow_shift=6.0)
    finally:
        sfumato.unload_model(model_id)
    picture = decode_png(cat[0])
    assert picture.shape == (SIZE, SIZE, 3) and picture.std() > 0 and stats.total_steps == 1
    assert not np.array_equal(picture, decode_png(dog[0]))  # the prompt reaches the DiT
    shifted = decode_png(six[0])
    assert np.array_equal(decode_png(own[0]), decode_png(three[0])) and not np.array_equal(shifted, decode_png(own[0]))

    models = tmp_path / "models"
    models.mkdir()
    for name, target in (("anima.gguf", anima_gguf), ("qwen3-0.6b.gguf", qwen3_0_6b_gguf),
                         ("wan-vae.safetensors", wan_vae)):  # fmt: skip
        (models / name).symlink_to(target)
    files = 'file = "anima.gguf"\nllm = "qwen3-0.6b.gguf"\nvae = "wan-vae.safetensors"\n'
    (models / "models.toml").write_text(
        f"[models.anima]\n{files}steps = 1\n[models.anima-shifted]\n{files}steps = 2\nflow_shift = 6.0\n"
    )
    settings = ServerSettings(models_dir=models, loras_dir=tmp_path / "loras", upscalers_dir=tmp_path / "upscalers",
                              data_dir=tmp_path / "data", threads=2)  # fmt: skip
    with TestClient(create_app(settings)) as client:
        assert {m["name"]: m["family"] for m in client.get("/models").json()["models"]}["anima"] == "Anima"
        # The sampler, schedule and CFG left out: the engine's and the family's, as in the SDK.
        body = {"prompt": "a cat", "model": "anima", "seed": 3, "width": SIZE, "height": SIZE, "fileType": "png"}
        jobs = [client.post("/txt2img", json=body).json()["job_id"]]
        # flow_shift: sent, or the models config's default.
        jobs.append(client.post("/txt2img", json={**body, "steps": 2, "flow_shift": 6.0}).json()["job_id"])
        jobs.append(client.post("/txt2img", json={**body, "model": "anima-shifted"}).json()["job_id"])
        done = [wait_job(client, job_id) for job_id in jobs]
    assert [d["state"] for d in done] == ["done"] * 3, done
    made = [pixels(base64.b64decode(d["image"])) for d in done]
    assert np.array_equal(made[0], picture) and np.array_equal(made[1], shifted) and np.array_equal(made[2], shifted)

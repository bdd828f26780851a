"""The tiny autoencoder (``model_config.taesd_src``) on the real engine: it decodes
and encodes in the VAE's place, the engine's own report says so, and a file that
does not fit the model's latents is refused by name. SDK, CLI and server."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from unittest.mock import ANY

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import sfumato
from sfumato.server.app import create_app
from sfumato.server.settings import ServerSettings
from tests.support import layouts, models

from .helpers import MODEL, SIZE, default_graph, job_body, run, sfumato_cli, wait_job


@pytest.fixture(scope="module")
def tiny_decoded(sd1_tiny_gguf: Path, taesd: Path) -> Iterator[str]:
    """The suite's SD 1.x model decoding with TAESD."""
    model_id = sfumato.load_model(sd1_tiny_gguf, model_config={"threads": 2, "taesd_src": taesd})
    yield model_id
    sfumato.unload_model(model_id)


def _status(model_id: str) -> sfumato.ModelStatus:
    return next(s for s in sfumato.models_info() if s.model_id == model_id)


def test_taesd_decodes_in_the_vaes_place(tiny_decoded: str, sd1_model: str) -> None:
    tiny, tiny_stats, ticks = run(tiny_decoded, seed=5)
    full, full_stats, _ = run(sd1_model, seed=5)
    # The engine's load log names the decoder it built; the stats and the model status carry it.
    assert (tiny_stats.decoder, full_stats.decoder) == ("taesd", "vae")
    assert (_status(tiny_decoded).decoder, _status(sd1_model).decoder) == ("taesd", "vae")
    # Same model, seed and latents; another decoder gives other pixels, in the same phase.
    assert tiny != full
    assert [(t.step, t.total_steps) for t in ticks if t.phase == "vae"] == [(1, 1)]
    assert tiny_stats.vae_decode_ms is not None and tiny_stats.vae_decode_ms > 0
    again, _, _ = run(tiny_decoded, seed=5)
    assert again == tiny


def test_taesd_encodes_img2img_sources(tiny_decoded: str, gradient_image: np.ndarray) -> None:
    first, stats, _ = run(tiny_decoded, init_image=gradient_image, strength=0.5, seed=2)
    other, _, _ = run(tiny_decoded, init_image=255 - gradient_image, strength=0.5, seed=2)
    assert stats.decoder == "taesd" and (stats.width, stats.height) == (SIZE, SIZE)
    assert first != other  # the source, encoded by TAESD, shapes the result


def test_a_tiny_autoencoder_for_previews_only(sd1_tiny_gguf: Path, taesd: Path, sd1_model: str) -> None:
    """``taesd_preview_only``: the VAE decodes the image, the tiny autoencoder draws each preview."""
    config = {"threads": 2, "taesd_src": taesd, "taesd_preview_only": True}
    model_id = sfumato.load_model(sd1_tiny_gguf, model_config=config)
    try:
        image, stats, ticks = run(model_id, seed=5, steps=2, preview="tae")
    finally:
        sfumato.unload_model(model_id)
    plain, _, decoded = run(sd1_model, seed=5, steps=2, preview="vae")
    assert image == plain and stats.decoder == "vae"
    tiny = [t.preview for t in ticks if t.preview is not None]
    full = [t.preview for t in decoded if t.preview is not None]
    assert len(tiny) == len(full) == 2 and tiny != full  # the same latents, decoded by another decoder
    for png in tiny:
        assert Image.open(io.BytesIO(png)).size == (SIZE, SIZE)
    with pytest.raises(sfumato.InvalidParameterError) as caught:
        run(sd1_model, preview="tae")
    assert caught.value.field == "preview"
    with pytest.raises(sfumato.InvalidParameterError) as caught:
        sfumato.load_model(sd1_tiny_gguf, model_config={"taesd_preview_only": True})
    assert caught.value.field == "model_config.taesd_preview_only"


def test_a_tiny_autoencoder_of_other_latents_or_no_tiny_autoencoder_is_refused(
    sd1_tiny_gguf: Path, sd1_lora: Path, tmp_path: Path
) -> None:
    transformer_tae = models.write_safetensors(
        tmp_path / "taef1.safetensors", models.random_tensors(layouts.taesd_layout(z_channels=16), seed=1)
    )
    cases = [
        (transformer_tae, "16 latent channels; SD 1.x decodes 4-channel latents"),
        (sd1_lora, r"holds no tiny autoencoder \(TAESD\) decoder"),
    ]
    for source, message in cases:
        with pytest.raises(sfumato.InvalidParameterError, match=message) as caught:
            sfumato.load_model(sd1_tiny_gguf, model_config={"taesd_src": source})
        assert caught.value.field == "model_config.taesd_src"


def test_the_cli_decodes_with_taesd(sd1_tiny_gguf: Path, taesd: Path, tmp_path: Path) -> None:
    done = sfumato_cli(
        "generate", "-m", str(sd1_tiny_gguf), "--taesd", str(taesd), "-p", "a boat", "-W", str(SIZE), "-H", str(SIZE),
        "--steps", "2", "--seed", "4", "--threads", "2", "-q", "-o", str(tmp_path),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout[done.stdout.index("{") :])
    assert stats["decoder"] == "taesd"
    assert (tmp_path / "sfumato_4_0.png").is_file()


def test_the_server_pairs_a_models_taesd_sidecar(settings: ServerSettings, taesd: Path) -> None:
    (settings.models_dir / f"{MODEL}.taesd.safetensors").symlink_to(taesd)
    with TestClient(create_app(replace(settings, preview_method="taesd"))) as client:
        listed = [m["name"] for m in client.get("/models").json()["models"]]
        assert listed == [MODEL]  # the sidecar is not offered as a model
        job_id = client.post("/txt2img", json=job_body(model=MODEL)).json()["job_id"]
        done = wait_job(client, job_id)
        assert (done["state"], done["decoder"]) == ("done", "taesd")
        # ComfyUI's --preview-method taesd: the websocket's previews are the tiny autoencoder's, full size.
        with client.websocket_connect("/ws?clientId=tae") as socket:
            assert socket.receive_json()["type"] == "status"
            client.post("/prompt", json={"prompt": default_graph(), "client_id": "tae"})
            frames: list[bytes] = []
            while True:
                message = socket.receive()
                if message.get("bytes"):
                    frames.append(message["bytes"])
                elif json.loads(message["text"]) == {"type": "executing", "data": {"node": None,
                                                     "display_node": None, "prompt_id": ANY}}:  # fmt: skip
                    break
        assert frames and all(Image.open(io.BytesIO(f[8:])).size == (SIZE, SIZE) for f in frames)
    (settings.models_dir / f"{MODEL}.taesd.safetensors").unlink()
    with TestClient(create_app(settings)) as client:  # without the sidecar, its VAE decodes
        job_id = client.post("/txt2img", json=job_body(model=MODEL)).json()["job_id"]
        assert wait_job(client, job_id)["decoder"] == "vae"

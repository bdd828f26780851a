"""Textual-inversion embeddings on the real engine: a prompt that says a file's
name takes its vectors (``.pt`` and ``.safetensors`` alike), a file the model's
text encoders cannot take is skipped and refused by name when a prompt uses it.
SDK, CLI and server (job queue, A1111's ``/sdapi/v1/embeddings``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

import sfumato
from sfumato.server.app import create_app
from sfumato.server.settings import ServerSettings
from tests.support import models

from .helpers import MODEL, SIZE, error_body, job_body, run, sfumato_cli, wait_job

PROMPT = "a lighthouse in the style of inkwash"


def _vectors(seed: int, width: int = 768, count: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, width)).astype(np.float32)


def _safetensors(path: Path, vectors: np.ndarray) -> Path:
    return models.write_safetensors(path, [("emb_params", vectors)])


def _a1111_pt(path: Path, vectors: np.ndarray) -> Path:
    """A1111's own format: a pickled dict whose ``string_to_param["*"]`` holds the vectors."""
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.from_numpy(vectors)}, "step": 0}, path)
    return path


def _folder(tmp_path: Path, name: str, *files: tuple[str, np.ndarray]) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    for file, vectors in files:
        (_a1111_pt if file.endswith(".pt") else _safetensors)(folder / file, vectors)
    return folder


def _image(model_src: Path, embedding_dir: Path | None, prompt: str = PROMPT) -> bytes:
    config: dict[str, object] = {"threads": 2}
    if embedding_dir is not None:
        config["embedding_dir"] = embedding_dir
    model_id = sfumato.load_model(model_src, model_config=config)
    try:
        (png,), _, _ = run(model_id, prompt=prompt, seed=11)
    finally:
        sfumato.unload_model(model_id)
    return png


def test_a_prompt_word_takes_the_embeddings_vectors(sd1_tiny_gguf: Path, tmp_path: Path) -> None:
    first = _folder(tmp_path, "first", ("inkwash.safetensors", _vectors(1)))
    same_as_pt = _folder(tmp_path, "pt", ("inkwash.pt", _vectors(1)))
    other = _folder(tmp_path, "other", ("inkwash.safetensors", _vectors(2)))
    image = _image(sd1_tiny_gguf, first)
    # The same vectors from A1111's .pt give the same pixels; other vectors under the same name do not,
    # and without the folder the word is plain text.
    assert _image(sd1_tiny_gguf, same_as_pt) == image
    assert _image(sd1_tiny_gguf, other) != image
    assert _image(sd1_tiny_gguf, None) != image


def test_an_embedding_the_text_encoder_cannot_take_is_refused_by_name(
    sd1_tiny_gguf: Path, sd1_lora: Path, tmp_path: Path
) -> None:
    folder = _folder(tmp_path, "mixed", ("inkwash.safetensors", _vectors(1)))
    models.write_safetensors(folder / "xlstyle.safetensors", [("clip_l", _vectors(3)), ("clip_g", _vectors(3, 1280))])
    (folder / "notone.safetensors").symlink_to(sd1_lora)
    model_id = sfumato.load_model(sd1_tiny_gguf, model_config={"threads": 2, "embedding_dir": folder})
    try:
        with pytest.raises(sfumato.InvalidParameterError, match=r"768 and 1280 wide; SD 1\.x's text encoders take 768"):
            run(model_id, prompt="a boat, XLstyle")
        with pytest.raises(sfumato.InvalidParameterError, match="not a textual-inversion embedding") as caught:
            run(model_id, negative_prompt="notone")
        assert caught.value.field == "negative_prompt"
        (png,), _, _ = run(model_id, prompt=PROMPT)  # the usable one still works
        assert png
    finally:
        sfumato.unload_model(model_id)
    with pytest.raises(sfumato.InvalidParameterError, match="must be an existing folder") as caught:
        sfumato.load_model(sd1_tiny_gguf, model_config={"embedding_dir": tmp_path / "missing"})
    assert caught.value.field == "model_config.embedding_dir"


def test_the_cli_takes_an_embeddings_folder(sd1_tiny_gguf: Path, tmp_path: Path) -> None:
    folder = _folder(tmp_path, "emb", ("inkwash.pt", _vectors(1)))
    common = ("generate", "-m", str(sd1_tiny_gguf), "-p", PROMPT, "-W", str(SIZE), "-H", str(SIZE), "--steps", "2",
              "--seed", "11", "--threads", "2", "-q")  # fmt: skip
    done = sfumato_cli(*common, "--embedding-dir", str(folder), "-o", str(tmp_path / "with"))
    plain = sfumato_cli(*common, "-o", str(tmp_path / "without"))
    assert done.returncode == 0 and plain.returncode == 0, done.stderr + plain.stderr
    with_png = (tmp_path / "with" / "sfumato_11_0.png").read_bytes()
    assert with_png != (tmp_path / "without" / "sfumato_11_0.png").read_bytes()
    assert with_png == _image(sd1_tiny_gguf, folder)


def test_the_server_lists_and_uses_its_embeddings_folder(settings: ServerSettings, tmp_path: Path) -> None:
    folder = _folder(tmp_path, "embeddings", ("inkwash.pt", _vectors(1, count=3)))
    models.write_safetensors(folder / "xlstyle.safetensors", [("clip_l", _vectors(3)), ("clip_g", _vectors(3, 1280))])
    settings = ServerSettings(**{**settings.__dict__, "embeddings_dir": folder})
    with TestClient(create_app(settings)) as client:
        listed = client.get("/sdapi/v1/embeddings").json()
        assert listed["loaded"] == {
            "inkwash": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 768, "vectors": 3}
        }
        assert list(listed["skipped"]) == ["xlstyle"] and listed["skipped"]["xlstyle"]["shape"] == 1280
        refused = client.post("/txt2img", json=job_body(prompt="a boat, xlstyle", model=MODEL))
        assert "xlstyle" in error_body(refused, 422, "prompt")["error"]
        job_id = client.post("/txt2img", json=job_body(prompt=PROMPT, model=MODEL)).json()["job_id"]
        assert wait_job(client, job_id)["state"] == "done"

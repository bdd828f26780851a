"""Qwen-Image and Qwen-Image-Edit: detection and the companion checks before any engine
call (Qwen2.5-VL's width, the Wan 2.1 VAE and no 2-D one), then real engine runs from the
SDK (text to image, and editing by reference images) and from ComfyUI (split loaders and
``TextEncodeQwenImageEdit``), on the transformer at its real widths with one block,
Qwen2.5-VL 7B's language model with one layer (the engine reads both depths from the
files) and the whole Wan 2.1 VAE, all written by the suite."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

import sfumato
from sfumato import errors
from sfumato.families.detect import FAMILY_QWEN_IMAGE, detect
from sfumato.images import decode_png
from sfumato.server.app import create_app
from sfumato.server.settings import ServerSettings

from .helpers import SIZE, CaptureSpec, gradient, header_file, llm_header, pixels, png_bytes, run, wait_history


def test_qwen_image_is_detected_from_its_header(qwen_image_gguf: Path) -> None:
    info = detect(qwen_image_gguf)
    assert (info.family, info.split, info.has_vae, info.text_width) == (FAMILY_QWEN_IMAGE, True, False, 3584)


@pytest.mark.usefixtures("no_engine_calls")
def test_qwen_image_names_its_text_encoder_and_its_wan_vae(
    qwen_image_gguf: Path, qwen25_vl_gguf: Path, wan_vae: Path, flux1_parts: dict[str, Path], sd1_tiny_gguf: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    with pytest.raises(errors.InvalidParameterError, match=r"pass its Qwen2\.5-VL text encoder") as caught:
        sfumato.load_model(qwen_image_gguf, model_config={"vae_model_src": wan_vae})
    assert caught.value.field == "model_config.llm_model_src"
    qwen3 = llm_header(tmp_path)
    with pytest.raises(errors.InvalidParameterError, match=r"2560 wide; Qwen-Image reads Qwen2.5-VL 7B \(3584 wide"):
        sfumato.load_model(qwen_image_gguf, model_config={"llm_model_src": qwen3, "vae_model_src": wan_vae})
    config = {"llm_model_src": qwen25_vl_gguf, "vae_model_src": flux1_parts["vae"]}
    with pytest.raises(errors.InvalidParameterError, match=r"is a 2-D VAE; Qwen-Image decodes with the Wan") as caught:
        sfumato.load_model(qwen_image_gguf, model_config=config)
    assert caught.value.field == "model_config.vae_model_src"
    # ... and the other way round: the Wan VAE decodes no SD latents.
    with pytest.raises(errors.InvalidParameterError, match=r"is the Wan 2\.1 VAE \(3-D\); SD 1\.x decodes with a 2-D"):
        sfumato.load_model(sd1_tiny_gguf, model_config={"vae_model_src": wan_vae})


def test_qwen2_5_vl_in_hugging_face_s_names_passes_the_companion_check(
    qwen_image_gguf: Path, wan_vae: Path, load_spec: CaptureSpec, tmp_path: Path
) -> None:
    """``QWEN_2_5_VL_7B`` (Comfy-Org's file) names its tensors as transformers does: the
    language model's 28 layers, 3584 wide, under ``model.``, beside its vision tower."""
    whole = header_file(tmp_path / "qwen_2.5_vl_7b.safetensors", {
        "model.embed_tokens.weight": (8, 3584), "model.layers.27.mlp.gate_proj.weight": (8, 8),
        "visual.blocks.31.attn.qkv.weight": (8, 8),
    })  # fmt: skip
    spec = load_spec(qwen_image_gguf, {"llm_model_src": whole, "vae_model_src": wan_vae})
    assert spec.context is not None and spec.context.llm_path == str(whole.resolve())


@pytest.mark.slow
def test_qwen_image_generates_and_edits_from_the_sdk_and_comfyui(
    qwen_image_gguf: Path, qwen25_vl_gguf: Path, wan_vae: Path, tmp_path: Path
) -> None:
    picture = png_bytes(gradient(SIZE))
    config = {"llm_model_src": qwen25_vl_gguf, "vae_model_src": wan_vae, "threads": 2}
    model_id = sfumato.load_model(qwen_image_gguf, model_config=config)
    same = {"steps": 1, "seed": 3, "cfg_scale": 2.0, "sampling_method": "euler", "scheduler": "simple"}
    try:
        cat, stats, _ = run(model_id, prompt="a cat", **same)
        dog, _, _ = run(model_id, prompt="a dog", **same)
        edited, _, _ = run(model_id, prompt="a cat", init_images=[picture], **same)  # Qwen-Image-Edit's way
        shifted, _, _ = run(model_id, prompt="a cat", init_images=[picture], **{**same, "steps": 2}, flow_shift=3.1)
        other, _, _ = run(model_id, prompt="a cat", init_images=[png_bytes(gradient(SIZE)[::-1].copy())], **same)
    finally:
        sfumato.unload_model(model_id)
    image = decode_png(cat[0])
    assert image.shape == (SIZE, SIZE, 3) and image.std() > 0 and stats.total_steps == 1
    assert not np.array_equal(image, decode_png(dog[0]))  # the prompt reaches the transformer
    assert not np.array_equal(image, decode_png(edited[0]))  # and the reference image does
    assert not np.array_equal(decode_png(edited[0]), decode_png(other[0]))

    # ComfyUI: the split loaders, and the edit node's reference; the same picture as the SDK's.
    models = tmp_path / "models"
    models.mkdir()
    for name, target in (("qwen-image.gguf", qwen_image_gguf), ("qwen2.5-vl.gguf", qwen25_vl_gguf),
                         ("wan-vae.safetensors", wan_vae)):  # fmt: skip
        (models / name).symlink_to(target)
    (models / "models.toml").write_text(
        '[models.qwen]\nfile = "qwen-image.gguf"\nllm = "qwen2.5-vl.gguf"\nvae = "wan-vae.safetensors"\n'
    )
    settings = ServerSettings(models_dir=models, loras_dir=tmp_path / "loras", upscalers_dir=tmp_path / "upscalers",
                              data_dir=tmp_path / "data", threads=2)  # fmt: skip
    with TestClient(create_app(settings)) as client:
        assert {m["name"]: m["family"] for m in client.get("/models").json()["models"]}["qwen"] == "Qwen-Image"
        assert (
            "qwen_image" in client.get("/object_info/CLIPLoader").json()["CLIPLoader"]["input"]["required"]["type"][0]
        )
        upload = client.post("/upload/image", files={"image": ("source.png", picture, "image/png")})
        assert upload.status_code == 200, upload.text
        comfy = []
        for graph in (_edit_graph("source.png"), _edit_graph("source.png", shift=3.1)):
            accepted = client.post("/prompt", json={"prompt": graph})
            assert accepted.status_code == 200, accepted.text
            entry = wait_history(client, accepted.json()["prompt_id"])
            assert entry["status"]["status_str"] == "success", entry
            comfy.append(pixels(client.get("/view", params=entry["outputs"]["9"]["images"][0]).content))
    assert np.array_equal(comfy[0], decode_png(edited[0]))
    assert np.array_equal(comfy[1], decode_png(shifted[0]))  # ModelSamplingAuraFlow's shift is flow_shift


def _edit_graph(image: str, shift: float | None = None) -> dict[str, Any]:
    """ComfyUI's Qwen-Image-Edit graph: UNETLoader, CLIPLoader (qwen_image), VAELoader,
    TextEncodeQwenImageEdit with a loaded image, a KSampler, VAEDecode; with ``shift``,
    ModelSamplingAuraFlow before the KSampler, which then samples 2 steps."""
    graph: dict[str, Any] = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "qwen", "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": "qwen2.5-vl.gguf", "type": "qwen_image"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "wan-vae.safetensors"}},
        "4": {"class_type": "LoadImage", "inputs": {"image": image}},
        "5": {"class_type": "TextEncodeQwenImageEdit", "inputs": {
            "clip": ["2", 0], "prompt": "a cat", "vae": ["3", 0], "image": ["4", 0]}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 0]}},
        "7": {"class_type": "EmptySD3LatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "8": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["5", 0], "negative": ["6", 0], "latent_image": ["7", 0], "seed": 3,
            "steps": 1, "cfg": 2.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "10": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["3", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": "qwen"}},
    }  # fmt: skip
    if shift is not None:
        graph["11"] = {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["1", 0], "shift": shift}}
        graph["8"]["inputs"].update(model=["11", 0], steps=2)
    return graph

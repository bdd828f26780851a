"""Every error path of the SDK: precise messages, the right class, no engine call
with a bad file, and nothing already loaded disturbed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

import sfumato
from sfumato import errors
from sfumato.families.detect import detect, read_tensor_table

from .helpers import SIZE, run


@pytest.mark.parametrize(
    ("cls", "bases"),
    [
        (errors.ModelNotFoundError, (FileNotFoundError,)),
        (errors.InvalidParameterError, (ValueError,)),
        (errors.InvalidModelError, (ValueError,)),
        (errors.UnsupportedModelError, (errors.InvalidModelError, ValueError)),
        (errors.UnknownModelIdError, (KeyError,)),
        (errors.EngineNotFoundError, (ImportError,)),
        (errors.EngineABIError, (ImportError,)),
        (errors.EngineError, (RuntimeError,)),
        (errors.ClosedError, (RuntimeError,)),
        (errors.NoUpscalerError, (RuntimeError,)),
    ],
)
def test_error_hierarchy(cls: type[Exception], bases: tuple[type[Exception], ...]) -> None:
    assert issubclass(cls, errors.SfumatoError)
    for base in bases:
        assert issubclass(cls, base)


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("prompt", 3, "string"),
        ("negative_prompt", None, "string"),
        ("width", 65, "multiple of 8"),
        ("width", 0, "between"),
        ("height", "512", "integer"),
        ("height", 72, "multiple of 64"),
        ("steps", 0, "between 1 and 1000"),
        ("steps", 2.5, "integer"),
        ("cfg_scale", -1.0, "between 0.0 and 50.0"),
        ("cfg_scale", float("nan"), "finite"),
        ("guidance", "high", "number"),
        ("sampling_method", "dpm++ 2m karras", "one of"),
        ("scheduler", "Karras", "one of"),
        ("seed", -2, "between -1"),
        ("batch_count", 0, "between 1 and 16"),
        ("vae_tiling", "yes", "true or false"),
        ("cache_preset", "turbo", "one of ['slow', 'medium', 'fast', 'ultra']"),
        ("strength", 1.5, "between 0.0 and 1.0"),
        ("init_image", b"not an image", "not a readable image"),
        ("init_image", 12, "PNG/JPEG bytes"),
        ("upscale", "yes", "true, false or"),
        ("upscale.repeats", {"repeats": 0}, "between 1 and 4"),
        ("clip_skip", 13, "between -1 and 12"),
        ("eta", -0.5, "between 0.0 and 10.0"),
        ("img_cfg_scale", "high", "a finite number"),
        ("init_images", b"one image", "a list of images"),
        ("cfg_scale", 51, "between 0.0 and 50.0"),
    ],
)
def test_invalid_fields_are_named(sd1_model: str, field: str, value: Any, allowed: str) -> None:
    param = field.split(".")[0]
    kwargs: dict[str, Any] = {"prompt": "x", "width": SIZE, "height": SIZE}
    kwargs[param] = value
    with pytest.raises(errors.InvalidParameterError) as info:
        sfumato.diffusion(sd1_model, **kwargs)
    assert info.value.field == field
    assert allowed in str(info.value)
    assert str(info.value).startswith(f"{field}:")


def test_unknown_model_id() -> None:
    with pytest.raises(errors.UnknownModelIdError, match="no loaded model has id 'missing'"):
        sfumato.diffusion("missing", prompt="x")
    with pytest.raises(errors.UnknownModelIdError):
        sfumato.upscale("missing", image=np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(errors.UnknownModelIdError):
        sfumato.unload_model("missing")


def test_calls_after_unload_are_refused(esrgan_1b: Path, gradient_image: np.ndarray) -> None:
    model_id = sfumato.load_model(esrgan_1b, model_config={"mode": "upscale"})
    sfumato.unload_model(model_id)
    with pytest.raises(errors.UnknownModelIdError, match="unloaded"):
        sfumato.upscale(model_id, image=gradient_image)
    with pytest.raises(errors.UnknownModelIdError):
        sfumato.unload_model(model_id)


def test_unload_cancels_the_running_and_the_queued_jobs(sd1_tiny_gguf: Path) -> None:
    model_id = sfumato.load_model(sd1_tiny_gguf, model_config={"threads": 2})
    running = sfumato.diffusion(model_id, prompt="a", width=SIZE, height=SIZE, steps=30, seed=1)
    queued = sfumato.diffusion(model_id, prompt="b", width=SIZE, height=SIZE, steps=2, seed=2)
    next(iter(running.progress_stream))  # the first job is running now
    sfumato.unload_model(model_id)
    for result in (running, queued):
        with pytest.raises(errors.JobCancelledError, match=r"cancelled \(unloaded\)") as caught:
            result.outputs.result()
        assert caught.value.reason == "unloaded"
        assert result.state == "cancelled"
    assert list(queued.progress_stream) == []
    assert model_id not in sfumato.loaded_models()


def test_upscale_on_a_model_without_upscaler(sd1_tiny_gguf: Path, gradient_image: np.ndarray) -> None:
    model_id = sfumato.load_model(sd1_tiny_gguf, model_config={"threads": 2})
    try:
        with pytest.raises(errors.NoUpscalerError, match="has no upscaler"):
            sfumato.upscale(model_id, image=gradient_image)
        with pytest.raises(errors.NoUpscalerError, match=r"upscale: .*model_config.upscaler"):
            sfumato.diffusion(model_id, prompt="x", width=SIZE, height=SIZE, upscale=True)
    finally:
        sfumato.unload_model(model_id)


def test_diffusion_on_a_standalone_upscaler(upscaler_model: str) -> None:
    with pytest.raises(errors.InvalidParameterError, match=r"model_id: .*mode='upscale'"):
        sfumato.diffusion(upscaler_model, prompt="x")


def test_upscale_repeats_is_checked(upscaler_model: str, gradient_image: np.ndarray) -> None:
    with pytest.raises(errors.InvalidParameterError, match="repeats: must be between 1 and 4"):
        sfumato.upscale(upscaler_model, image=gradient_image, repeats=0)
    with pytest.raises(errors.InvalidParameterError, match=r"^image:"):
        sfumato.upscale(upscaler_model, image=b"\x89PNG broken")


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"thread": 2}, "model_config.thread"),
        ({"threads": 0}, "model_config.threads"),
        ({"mode": "edit"}, "model_config.mode"),
        ({"prediction": "x0"}, "model_config.prediction"),
        ({"weight_type": "q3_0"}, "model_config.weight_type"),
        ({"flash_attn": "on"}, "model_config.flash_attn"),
        ({"conv_direct": 1}, "model_config.conv_direct"),
        ({"rng": "philox"}, "model_config.rng"),
        ({"device": "gpu"}, "model_config.device"),
        ({"device": "CUDA0"}, "model_config.device"),
        ({"upscaler": {"model_src": "x", "tile": 64}}, "model_config.upscaler.tile"),
        ({"upscaler": {"tile_size": 64}}, "model_config.upscaler.model_src"),
        ({"upscaler": {"model_src": "x", "type": "swinir"}}, "model_config.upscaler.type"),
        ({"clip_l_model_src": "x"}, "model_config.clip_l_model_src"),
    ],
)
def test_invalid_model_config(sd1_gguf: Path, config: dict[str, Any], field: str) -> None:
    with pytest.raises(errors.InvalidParameterError) as info:
        sfumato.load_model(sd1_gguf, model_config=config)
    assert info.value.field == field


def test_gpu_without_a_gpu_names_the_devices_there_are(sd1_gguf: Path) -> None:
    with pytest.raises(
        errors.InvalidParameterError,
        match=r"'gpu' asks for a hardware GPU and there is none; the engine at .* has: CPU",
    ):
        sfumato.load_model(sd1_gguf, model_config={"device": "gpu"})


def test_model_type_must_be_diffusion(sd1_gguf: Path) -> None:
    with pytest.raises(errors.InvalidParameterError, match="model_type"):
        sfumato.load_model(sd1_gguf, model_type="llm")


def _truncated(source: Path, target: Path, keep: float) -> Path:
    """``keep`` of ``source``'s length: its first 4 MiB (the header and more), then a
    sparse hole, so that a cut 2 GB model takes 4 MiB of disk."""
    length = int(source.stat().st_size * keep)
    with source.open("rb") as f, target.open("wb") as out:
        out.write(f.read(min(length, 4 << 20)))
        out.truncate(length)
    return target


@pytest.mark.usefixtures("no_engine_calls")
@pytest.mark.parametrize("suffix", [".gguf", ".safetensors", ".pth"])
def test_truncated_files_are_refused_before_the_engine(
    suffix: str, sd1_gguf: Path, sd1_safetensors: Path, esrgan_6b: Path, tmp_path: Path
) -> None:
    source = {".gguf": sd1_gguf, ".safetensors": sd1_safetensors, ".pth": esrgan_6b}[suffix]
    bad = _truncated(source, tmp_path / f"model{suffix}", 0.6)
    with pytest.raises(errors.InvalidModelError, match=r"truncated|not a readable"):
        sfumato.load_model(bad, model_config={"mode": "upscale"} if suffix == ".pth" else None)


def test_a_safetensors_header_of_any_length_is_read(tmp_path: Path) -> None:
    """The header's length is a little-endian u64: one in 32 real files has a zero first byte."""
    for name_length in range(180, 212, 4):
        path = tmp_path / f"{name_length}.safetensors"
        save_file({"x" * name_length: np.zeros(2, np.float32)}, path)
        table = read_tensor_table(path)
        assert table.find("x" * name_length) == (2,), path.read_bytes()[:8]
    assert any(path.read_bytes()[0] == 0 for path in tmp_path.iterdir())


@pytest.mark.usefixtures("no_engine_calls")
def test_a_file_that_is_not_a_model_is_refused(tmp_path: Path) -> None:
    text = tmp_path / "notes.gguf"
    text.write_text("these are not weights\n" * 10)
    with pytest.raises(errors.InvalidModelError, match="not a model file"):
        sfumato.load_model(text)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(errors.InvalidModelError):
        sfumato.load_model(empty)


@pytest.mark.usefixtures("no_engine_calls")
@pytest.mark.parametrize(
    ("names", "family"),
    [
        (["double_stream_modulation_img.lin.weight", "single_blocks.47.linear1.weight"], r"FLUX.2 \[dev\]"),
        (["model.diffusion_model.img_in.weight", "model.diffusion_model.double_blocks.0.x.weight"], "taking 2 input"),
        (["some.other.network.weight"], "no model family"),
        # Each video version of the engine, named by the tensor only it has.
        (["model.diffusion_model.blocks.0.cross_attn.norm_k.weight"], "Wan 2.x video model; sfumato makes images"),
        (
            [
                "model.diffusion_model.input_blocks.8.0.time_mixer.mix_factor",
                "model.diffusion_model.input_blocks.0.0.w",
            ],
            "Stable Video Diffusion video model",
        ),
    ],
)
def test_unsupported_families_are_refused_before_the_engine(tmp_path: Path, names: list[str], family: str) -> None:
    path = tmp_path / "model.safetensors"
    save_file({name: np.zeros((2, 2), np.float16) for name in names}, str(path))
    with pytest.raises(errors.UnsupportedModelError, match=family):
        sfumato.load_model(path)


@pytest.mark.usefixtures("no_engine_calls")
def test_a_unet_without_text_encoder_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "unet.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": np.zeros((320, 4, 3, 3), np.float16)}, str(path))
    with pytest.raises(errors.InvalidModelError, match="without its text encoder"):
        sfumato.load_model(path)


@pytest.mark.usefixtures("no_engine_calls")
def test_wrong_mode_for_the_family(sd1_gguf: Path, esrgan_6b: Path) -> None:
    with pytest.raises(
        errors.InvalidModelError, match=r"is an ESRGAN model; load ESRGAN upscalers with .*'mode': 'upscale'"
    ):
        sfumato.load_model(esrgan_6b)
    with pytest.raises(errors.InvalidModelError, match="needs an ESRGAN"):
        sfumato.load_model(sd1_gguf, model_config={"mode": "upscale"})


@pytest.mark.usefixtures("no_engine_calls")
def test_missing_paths_and_registry_constants(tmp_path: Path) -> None:
    with pytest.raises(errors.ModelNotFoundError, match="model_src: no file or folder"):
        sfumato.load_model(tmp_path / "absent.gguf")
    for constant in (sfumato.SD_V2_1_1B_Q8_0, "SD_V2_1_1B_Q4_0", sfumato.REALESRGAN_X4PLUS_ANIME_6B):
        name = str(constant)
        with pytest.raises(errors.ModelNotFoundError, match=f"^{name} is not in the model cache.*download https://"):
            sfumato.load_model(constant)  # type: ignore[arg-type]
    # A file inside a hub repository's folders is fetched from that path.
    for model in (
        sfumato.OVIS_IMAGE_BF16, sfumato.ERNIE_IMAGE_TURBO, sfumato.QWEN_2_5_VL_7B, sfumato.ANIMA_BASE_V1_0,
        sfumato.QWEN_3_06B_BASE,
    ):  # fmt: skip
        with pytest.raises(errors.ModelNotFoundError, match=f"^{model.name} is not in the model cache") as caught:
            sfumato.load_model(model.name)
        assert f"https://huggingface.co/{model.hf_repo}/resolve/main/{model.hf_path}" in str(caught.value)
    # Each constant says what its file is: a family detection names, or the companion role it plays.
    from sfumato.families.companions import ROLES
    from sfumato.families.detect import FAMILY_NAMES

    known = {*FAMILY_NAMES, *ROLES, "esrgan"}
    assert {m.name: m.family for m in sfumato.REGISTRY.values() if m.family not in known} == {}


def test_an_unreachable_download_host_fails_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No retries for half a minute: the host is tried once, and the error says why and what to do."""
    from sfumato.registry import RegistryModel, resolve

    for switch in ("HF_HUB_OFFLINE", "SFUMATO_OFFLINE"):  # the suite keeps downloads off; this test needs them on
        monkeypatch.delenv(switch, raising=False)
    monkeypatch.setenv("SFUMATO_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.sfumato-test.invalid")  # .invalid never resolves (RFC 2606)
    hub = RegistryModel(name="HUB_FILE", filename="x.gguf", family="sd1", hf_repo="someone/x")
    direct = RegistryModel(
        name="DIRECT_FILE", filename="y.pth", family="esrgan", url="https://files.sfumato-test.invalid/y.pth"
    )
    for model, host in ((hub, "hub.sfumato-test.invalid"), (direct, "files.sfumato-test.invalid")):
        with pytest.raises(errors.ModelNotFoundError, match=f"cannot be downloaded: no connection to {host}") as caught:
            resolve(model)
        assert f"save it as {tmp_path / model.filename}" in str(caught.value)
    env = {**os.environ, "SFUMATO_CACHE": str(tmp_path), "HF_ENDPOINT": "https://hub.sfumato-test.invalid"}
    done = subprocess.run(
        [sys.executable, "-m", "sfumato", "generate", "--model", "SD_V2_1_1B_Q4_0", "-p", "x", "-o", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode != 0 and "no connection to hub.sfumato-test.invalid" in done.stderr, done.stderr
    assert "Retrying" not in done.stderr


def test_registry_constant_resolves_from_the_cache(esrgan_6b: Path, gradient_image: np.ndarray) -> None:
    from sfumato.registry import cached_path

    target = cached_path(sfumato.REALESRGAN_X4PLUS_ANIME_6B)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(esrgan_6b)
    try:
        model_id = sfumato.load_model(sfumato.REALESRGAN_X4PLUS_ANIME_6B, model_config={"mode": "upscale"})
        result = sfumato.upscale(model_id, image=gradient_image[:8, :8])
        assert len(result.outputs.result()) == 1
        sfumato.unload_model(model_id)
    finally:
        target.unlink()


def test_diffusers_folder_without_text_model_prefix_is_explained(sd1_diffusers: Path, tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    folder = tmp_path / "model"
    for part in ("unet", "vae"):
        (folder / part).mkdir(parents=True)
        (folder / part / "diffusion_pytorch_model.safetensors").symlink_to(
            sd1_diffusers / part / "diffusion_pytorch_model.safetensors"
        )
    (folder / "text_encoder").mkdir()
    tensors = load_file(str(sd1_diffusers / "text_encoder" / "model.safetensors"))
    save_file(
        {k.removeprefix("text_model."): v for k, v in tensors.items()},
        str(folder / "text_encoder" / "model.safetensors"),
    )
    with pytest.raises(errors.InvalidModelError, match=r"without the 'text_model\.' prefix"):
        detect(folder)


def test_a_bad_request_leaves_the_loaded_model_working(sd1_model: str) -> None:
    with pytest.raises(errors.InvalidParameterError):
        sfumato.diffusion(sd1_model, prompt="x", steps=-5)
    outputs, _, _ = run(sd1_model, steps=1)
    assert len(outputs) == 1

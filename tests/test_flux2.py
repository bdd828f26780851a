"""FLUX.2 [klein], the split layout of the QVAC image-generation guide: detection and companion
checks before any engine call, the mapping onto the engine's context, and
real engine runs (txt2img, and image-to-image by in-context conditioning with
one or several references) from the SDK and the CLI, on self-made random
weights at klein 4B's real widths (one transformer block of each kind; Qwen3-4B
as deep as the engine reads it)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sfumato
from sfumato import errors
from sfumato.families.detect import FAMILY_FLUX2, detect
from sfumato.images import decode_png

from .helpers import CaptureSpec, header_file, run, sfumato_cli

SIZE = 64


def _config(parts: dict[str, Path], **overrides: object) -> dict[str, object]:
    config: dict[str, object] = {"llm_model_src": parts["llm"], "vae_model_src": parts["vae"], "threads": 2}
    config.update(overrides)
    return config


def _llm_names(layers: int, width: int) -> dict[str, tuple[int, ...]]:
    names: dict[str, tuple[int, ...]] = {"token_embd.weight": (8, width)}
    names.update({f"blk.{i}.attn_norm.weight": (width,) for i in range(layers)})
    return names


@pytest.fixture(scope="module")
def flux2_model(flux2_parts: dict[str, Path]) -> Iterator[str]:
    model_id = sfumato.load_model(flux2_parts["diffusion"], model_config=_config(flux2_parts, prediction="flux2_flow"))
    yield model_id
    sfumato.unload_model(model_id)


# --- detection and companions (no engine call) ------------------------------


def test_the_transformer_is_detected_as_split(flux2_headers: dict[str, Path]) -> None:
    info = detect(flux2_headers["diffusion"])
    assert (info.family, info.split, info.has_vae, info.text_width) == (FAMILY_FLUX2, True, False, 3 * 2560)


@pytest.mark.usefixtures("no_engine_calls")
@pytest.mark.parametrize(("key", "label"), [("llm_model_src", "Qwen3"), ("vae_model_src", "VAE")])
def test_a_missing_companion_names_its_role_and_key(flux2_headers: dict[str, Path], key: str, label: str) -> None:
    config = _config(flux2_headers)
    del config[key]
    with pytest.raises(errors.InvalidParameterError, match=f"pass its {label}") as caught:
        sfumato.load_model(flux2_headers["diffusion"], model_config=config)
    assert caught.value.field == f"model_config.{key}"


@pytest.mark.usefixtures("no_engine_calls")
def test_mismatched_companions_are_refused(flux2_headers: dict[str, Path], sd1_gguf: Path, tmp_path: Path) -> None:
    diffusion = flux2_headers["diffusion"]
    shallow = header_file(tmp_path / "q.safetensors", _llm_names(9, 2560))
    wide = header_file(tmp_path / "w.safetensors", _llm_names(36, 4096))
    cases = [
        ({"vae_model_src": sd1_gguf}, "vae_model_src", "4 latent channels; FLUX.2 \\[klein\\] decodes 32"),
        ({"llm_model_src": shallow}, "llm_model_src", "has 9 layers"),
        ({"llm_model_src": wide}, "llm_model_src", "4096 wide"),
        ({"llm_model_src": flux2_headers["vae"]}, "llm_model_src", "not a language model"),
        ({"clip_l_model_src": flux2_headers["vae"]}, "clip_l_model_src", "not used"),
    ]
    for overrides, key, says in cases:
        with pytest.raises(errors.InvalidParameterError, match=says) as caught:
            sfumato.load_model(diffusion, model_config=_config(flux2_headers, **overrides))
        assert caught.value.field == f"model_config.{key}"


@pytest.mark.usefixtures("no_engine_calls")
def test_flux2_dev_is_refused_by_name(tmp_path: Path) -> None:
    dev = header_file(
        tmp_path / "flux2-dev.safetensors",
        {"double_stream_modulation_img.lin.weight": (2, 2), "single_blocks.47.linear1.weight": (2, 2)},
    )
    with pytest.raises(errors.UnsupportedModelError, match=r"FLUX.2 \[dev\]"):
        sfumato.load_model(dev)


def test_the_split_layout_maps_onto_the_context(flux2_headers: dict[str, Path], load_spec: CaptureSpec) -> None:
    context = load_spec(flux2_headers["diffusion"], _config(flux2_headers, prediction="flux2_flow")).context
    assert context is not None
    assert (context.model_path, context.clip_l_path, context.clip_g_path, context.t5xxl_path) == (None,) * 4
    assert context.diffusion_model_path == str(flux2_headers["diffusion"].resolve())
    assert (context.llm_path, context.vae_path) == (
        str(flux2_headers["llm"].resolve()),
        str(flux2_headers["vae"].resolve()),
    )
    assert context.prediction == "flux2_flow"


# --- the engine -------------------------------------------------------------


@pytest.mark.heavy
def test_img2img_is_in_context_conditioning(flux2_model: str, gradient_image: np.ndarray) -> None:
    plain, _, _ = run(flux2_model, width=SIZE, height=SIZE, steps=1, seed=22)
    low, _, _ = run(flux2_model, steps=1, seed=22, init_image=gradient_image, strength=0.2)
    high, _, _ = run(flux2_model, steps=1, seed=22, init_image=gradient_image, strength=0.9)
    mirrored = np.ascontiguousarray(gradient_image[:, ::-1])
    several, _, _ = run(flux2_model, steps=1, seed=22, init_image=gradient_image, init_images=[mirrored])
    one = decode_png(low[0])
    assert one.shape == (SIZE, SIZE, 3)  # the size of the reference
    assert not np.array_equal(one, decode_png(plain[0]))  # the reference conditions the picture
    assert np.array_equal(one, decode_png(high[0]))  # strength is ignored on this path
    assert not np.array_equal(one, decode_png(several[0]))  # and so does a second one


@pytest.mark.heavy
def test_image_inputs_need_flux2_flow_and_no_mask(flux2_parts: dict[str, Path], flux2_model: str) -> None:
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    with pytest.raises(errors.InvalidParameterError, match="mask") as caught:
        sfumato.diffusion(flux2_model, prompt="x", init_image=image, mask=image)
    assert caught.value.field == "mask"
    plain = sfumato.load_model(flux2_parts["diffusion"], model_config=_config(flux2_parts))
    try:
        for kwargs, field in (({"init_image": image}, "init_image"), ({"init_images": [image]}, "init_images")):
            with pytest.raises(errors.InvalidParameterError, match="prediction='flux2_flow'") as caught:
                sfumato.diffusion(plain, prompt="x", **kwargs)  # type: ignore[arg-type]
            assert caught.value.field == field
    finally:
        sfumato.unload_model(plain)


@pytest.mark.heavy
def test_the_cli_runs_the_split_layout(flux2_parts: dict[str, Path], tmp_path: Path) -> None:
    done = sfumato_cli(
        "generate", "--model", str(flux2_parts["diffusion"]), "--llm", str(flux2_parts["llm"]),
        "--vae", str(flux2_parts["vae"]), "--threads", "2", "-W", str(SIZE), "-H", "128", "--steps", "1",
        "--seed", "6", "-q", "-o", str(tmp_path),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    with Image.open(tmp_path / "sfumato_6_0.png") as picture:
        assert picture.size == (SIZE, 128)

"""SD3 and FLUX.1, the two families on T5-XXL: detection and companion checks
before any engine call, the mapping onto the engine's context, and real engine
runs from the SDK and the CLI on self-made random weights. SD3 is SD3 Medium
at full depth (the engine builds no shallower MMDiT); FLUX.1 [dev] has its
real widths and one transformer block of each kind. Both take the CLIP-L (and
SD3 the CLIP-G) files of SDXL's split layout, which are the same files.

T5-XXL has 24 layers whatever the file says (4.7B parameters): writing it
takes minutes, and so does each run that encodes a prompt with it. The engine
runs are therefore ``heavy`` (``python -m pytest -m heavy``); the checks before
the engine run by default, on a T5 header of the real names and widths."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sfumato
from sfumato import errors
from sfumato.families.detect import FAMILY_FLUX1, FAMILY_SD3, detect
from sfumato.images import decode_png

from .helpers import CaptureSpec, run, sfumato_cli

SIZE = 64


def _sd3_config(sdxl_parts: dict[str, Path], t5: Path, **overrides: object) -> dict[str, object]:
    config: dict[str, object] = {
        "clip_l_model_src": sdxl_parts["clip_l"], "clip_g_model_src": sdxl_parts["clip_g"],
        "t5xxl_model_src": t5, "threads": 2,
    }  # fmt: skip
    config.update(overrides)
    return config


def _flux1_config(
    sdxl_parts: dict[str, Path], t5: Path, flux1_parts: dict[str, Path], **overrides: object
) -> dict[str, object]:
    config: dict[str, object] = {
        "clip_l_model_src": sdxl_parts["clip_l"], "t5xxl_model_src": t5,
        "vae_model_src": flux1_parts["vae"], "threads": 2,
    }  # fmt: skip
    config.update(overrides)
    return config


# --- SD3 --------------------------------------------------------------------


def test_sd3_is_detected_with_its_vae_and_without_text_encoders(sd3_gguf: Path) -> None:
    info = detect(sd3_gguf)
    assert (info.family, info.has_vae, info.split, info.carries) == (FAMILY_SD3, True, False, frozenset())


@pytest.mark.usefixtures("no_engine_calls")
@pytest.mark.parametrize(
    ("key", "label"),
    [("clip_l_model_src", "CLIP-L"), ("clip_g_model_src", "CLIP-G"), ("t5xxl_model_src", "T5-XXL")],
)
def test_sd3_names_each_missing_text_encoder(
    sd3_gguf: Path, sdxl_parts: dict[str, Path], t5_header: Path, key: str, label: str
) -> None:
    config = _sd3_config(sdxl_parts, t5_header)
    del config[key]
    with pytest.raises(errors.InvalidParameterError, match=f"pass its {label}") as caught:
        sfumato.load_model(sd3_gguf, model_config=config)
    assert caught.value.field == f"model_config.{key}"


@pytest.mark.usefixtures("no_engine_calls")
def test_sd3_refuses_a_t5_that_is_not_one(sd3_gguf: Path, sdxl_parts: dict[str, Path], t5_header: Path) -> None:
    config = _sd3_config(sdxl_parts, t5_header, t5xxl_model_src=sdxl_parts["clip_l"])
    with pytest.raises(errors.InvalidParameterError, match="not a T5 encoder") as caught:
        sfumato.load_model(sd3_gguf, model_config=config)
    assert caught.value.field == "model_config.t5xxl_model_src"


def test_sd3_maps_onto_the_context(
    sd3_gguf: Path, sdxl_parts: dict[str, Path], t5_header: Path, load_spec: CaptureSpec
) -> None:
    context = load_spec(sd3_gguf, _sd3_config(sdxl_parts, t5_header)).context
    assert context is not None
    assert (context.model_path, context.diffusion_model_path) == (str(sd3_gguf.resolve()), None)
    assert (context.clip_l_path, context.clip_g_path, context.t5xxl_path, context.vae_path, context.llm_path) == (
        str(sdxl_parts["clip_l"].resolve()), str(sdxl_parts["clip_g"].resolve()), str(t5_header.resolve()),
        None, None,
    )  # fmt: skip


@pytest.fixture(scope="module")
def sd3_model(sd3_gguf: Path, sdxl_parts: dict[str, Path], t5xxl_gguf: Path) -> Iterator[str]:
    model_id = sfumato.load_model(sd3_gguf, model_config=_sd3_config(sdxl_parts, t5xxl_gguf))
    yield model_id
    sfumato.unload_model(model_id)


@pytest.mark.heavy
def test_sd3_generates_from_the_sdk(sd3_model: str) -> None:
    outputs, stats, ticks = run(sd3_model, width=SIZE, height=96, steps=2, cfg_scale=4.5, seed=31)
    picture = decode_png(outputs[0])
    assert picture.shape == (96, SIZE, 3) and picture.std() > 0
    assert stats.total_steps == 2 and [t.step for t in ticks if t.phase == "sampling"][-1] == 2
    with pytest.raises(errors.InvalidParameterError, match="multiple of 16"):
        sfumato.diffusion(sd3_model, prompt="x", width=72, height=SIZE)


# --- FLUX.1 -----------------------------------------------------------------


def test_flux1_is_detected_as_a_split_dev_transformer(flux1_parts: dict[str, Path]) -> None:
    info = detect(flux1_parts["diffusion"])
    assert (info.family, info.variant, info.split, info.has_vae, info.text_width) == (
        FAMILY_FLUX1, "dev", True, False, 4096,
    )  # fmt: skip


@pytest.mark.usefixtures("no_engine_calls")
@pytest.mark.parametrize(
    ("key", "label"), [("clip_l_model_src", "CLIP-L"), ("t5xxl_model_src", "T5-XXL"), ("vae_model_src", "VAE")]
)
def test_flux1_names_each_missing_companion(
    flux1_parts: dict[str, Path], sdxl_parts: dict[str, Path], t5_header: Path, key: str, label: str
) -> None:
    config = _flux1_config(sdxl_parts, t5_header, flux1_parts)
    del config[key]
    with pytest.raises(errors.InvalidParameterError, match=f"pass its {label}") as caught:
        sfumato.load_model(flux1_parts["diffusion"], model_config=config)
    assert caught.value.field == f"model_config.{key}"


@pytest.mark.usefixtures("no_engine_calls")
def test_flux1_refuses_sdxls_vae_and_a_clip_g(
    flux1_parts: dict[str, Path], sdxl_parts: dict[str, Path], t5_header: Path
) -> None:
    config = _flux1_config(sdxl_parts, t5_header, flux1_parts, vae_model_src=sdxl_parts["vae"])
    with pytest.raises(errors.InvalidParameterError, match=r"4 latent channels; FLUX\.1 decodes 16"):
        sfumato.load_model(flux1_parts["diffusion"], model_config=config)
    config = _flux1_config(sdxl_parts, t5_header, flux1_parts, clip_g_model_src=sdxl_parts["clip_g"])
    with pytest.raises(errors.InvalidParameterError, match=r"not used: FLUX\.1 takes") as caught:
        sfumato.load_model(flux1_parts["diffusion"], model_config=config)
    assert caught.value.field == "model_config.clip_g_model_src"


def test_flux1_maps_onto_the_context(
    flux1_parts: dict[str, Path], sdxl_parts: dict[str, Path], t5_header: Path, load_spec: CaptureSpec
) -> None:
    context = load_spec(flux1_parts["diffusion"], _flux1_config(sdxl_parts, t5_header, flux1_parts)).context
    assert context is not None
    assert (context.model_path, context.diffusion_model_path) == (None, str(flux1_parts["diffusion"].resolve()))
    assert (context.clip_l_path, context.t5xxl_path, context.vae_path, context.clip_g_path) == (
        str(sdxl_parts["clip_l"].resolve()), str(t5_header.resolve()), str(flux1_parts["vae"].resolve()), None,
    )  # fmt: skip


@pytest.mark.heavy
def test_flux1_generates_with_distilled_guidance_and_kontext_references(
    flux1_parts: dict[str, Path], sdxl_parts: dict[str, Path], t5xxl_gguf: Path, gradient_image: np.ndarray
) -> None:
    model_id = sfumato.load_model(
        flux1_parts["diffusion"], model_config=_flux1_config(sdxl_parts, t5xxl_gguf, flux1_parts)
    )
    try:
        default, _, _ = run(model_id, width=SIZE, height=SIZE, steps=1, seed=41)
        explicit, _, _ = run(model_id, width=SIZE, height=SIZE, steps=1, seed=41, cfg_scale=1.0, guidance=3.5)
        strong, _, _ = run(model_id, width=SIZE, height=SIZE, steps=1, seed=41, guidance=8.0)
        # Kontext's layout is [dev]'s: init_images are reference images, as Kontext edits them.
        edited, _, _ = run(model_id, width=SIZE, height=SIZE, steps=1, seed=41, init_images=[gradient_image])
    finally:
        sfumato.unload_model(model_id)
    picture = decode_png(default[0])
    assert picture.shape == (SIZE, SIZE, 3) and picture.std() > 0
    assert np.array_equal(picture, decode_png(explicit[0]))  # cfg_scale defaults to 1 for FLUX.1
    assert not np.array_equal(picture, decode_png(strong[0]))  # [dev]'s guidance embedder takes `guidance`
    assert not np.array_equal(picture, decode_png(edited[0]))  # the reference joins the transformer's tokens


@pytest.mark.heavy
def test_the_cli_runs_sd3_and_flux1(
    sd3_gguf: Path, flux1_parts: dict[str, Path], sdxl_parts: dict[str, Path], t5xxl_gguf: Path, tmp_path: Path
) -> None:
    runs = {
        "sd3": [str(sd3_gguf), "--clip-l", str(sdxl_parts["clip_l"]), "--clip-g", str(sdxl_parts["clip_g"]),
                "--t5xxl", str(t5xxl_gguf)],
        "flux1": [str(flux1_parts["diffusion"]), "--clip-l", str(sdxl_parts["clip_l"]), "--t5xxl", str(t5xxl_gguf),
                  "--vae", str(flux1_parts["vae"])],
    }  # fmt: skip
    for name, args in runs.items():
        done = sfumato_cli(
            "generate", "--model", *args, "--threads", "2", "-W", str(SIZE), "-H", str(SIZE), "--steps", "1",
            "--seed", "9", "-q", "-o", str(tmp_path / name),
        )  # fmt: skip
        assert done.returncode == 0, (name, done.stderr[-3000:])
        with Image.open(tmp_path / name / "sfumato_9_0.png") as picture:
            assert picture.size == (SIZE, SIZE)

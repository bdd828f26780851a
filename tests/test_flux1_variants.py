"""The FLUX.1 architecture beyond [dev] and [schnell]: Chroma (its own family: T5-XXL
alone, a distilled modulation network, classifier-free guidance), Ovis-Image (its own
family: gated MLPs, Ovis 2.5's Qwen3 as text encoder), FLUX.1 Fill (inpainting
inside a mask) and Depth/Canny (a control image in the transformer's input), each
detected from its header and run on the real engine from self-made files at their real
widths with one block of each kind; Flex.2 is refused by name (the pinned engine aborts
on it). Kontext has [dev]'s layout: its reference-image
run is in ``test_sd3_flux1.py``, on the [dev] file.

The engine runs encode a prompt with T5-XXL (24 layers whatever the file says), so they
are ``heavy``; the checks before the engine run by default on a T5 header."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import sfumato
from sfumato import errors
from sfumato.families.detect import FAMILY_CHROMA, FAMILY_FLUX1, FAMILY_OVIS, detect
from sfumato.images import decode_png

from .helpers import SIZE, CaptureSpec, header_file, llm_header, run


def _config(t5: Path, vae: Path, clip_l: Path | None = None, **overrides: object) -> dict[str, object]:
    config: dict[str, object] = {"t5xxl_model_src": t5, "vae_model_src": vae, "threads": 2}
    if clip_l is not None:
        config["clip_l_model_src"] = clip_l
    config.update(overrides)
    return config


def _flux1_header(path: Path, img_in: int) -> Path:
    """A FLUX.1 transformer as far as detection reads it: the names and the input widths."""
    return header_file(path, {
        "img_in.weight": (3072, img_in), "txt_in.weight": (3072, 4096), "guidance_in.in_layer.weight": (3072, 256),
        "double_blocks.0.img_attn.proj.weight": (8, 8),
    })  # fmt: skip


def test_each_flux1_architecture_is_detected_from_its_header(
    chroma_gguf: Path, chroma_radiance_gguf: Path, ovis_gguf: Path, flux1_fill_gguf: Path, flux1_depth_gguf: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    files = (chroma_gguf, chroma_radiance_gguf, ovis_gguf, flux1_fill_gguf, flux1_depth_gguf)
    found = {path.name: detect(path) for path in files}
    assert {name: (i.family, i.variant, i.split, i.text_width) for name, i in found.items()} == {
        chroma_gguf.name: (FAMILY_CHROMA, None, True, 4096),
        chroma_radiance_gguf.name: (FAMILY_CHROMA, "radiance", True, 4096),
        ovis_gguf.name: (FAMILY_OVIS, None, True, 2048),
        flux1_fill_gguf.name: (FAMILY_FLUX1, "fill", True, 4096),
        flux1_depth_gguf.name: (FAMILY_FLUX1, "controls", True, 4096),
    }
    with pytest.raises(errors.UnsupportedModelError, match=r"a Flex\.2 transformer .* the pinned engine cannot run"):
        detect(_flux1_header(tmp_path / "flex2.safetensors", 196))
    with pytest.raises(errors.UnsupportedModelError, match=r"taking 100 input channels.*384 \(fill\)"):
        detect(_flux1_header(tmp_path / "odd.safetensors", 100))


@pytest.mark.usefixtures("no_engine_calls")
@pytest.mark.parametrize(("key", "label"), [("t5xxl_model_src", "T5-XXL"), ("vae_model_src", "VAE")])
def test_chroma_names_each_missing_companion(
    chroma_gguf: Path, flux1_parts: dict[str, Path], t5_header: Path, key: str, label: str
) -> None:
    config = _config(t5_header, flux1_parts["vae"])
    del config[key]
    with pytest.raises(errors.InvalidParameterError, match=f"pass its {label}") as caught:
        sfumato.load_model(chroma_gguf, model_config=config)
    assert caught.value.field == f"model_config.{key}"


@pytest.mark.usefixtures("no_engine_calls")
def test_chroma_refuses_a_clip_l_an_sdxl_vae_and_a_controlnet(
    chroma_gguf: Path, flux1_parts: dict[str, Path], sdxl_parts: dict[str, Path], t5_header: Path
) -> None:
    refusals = {
        "clip_l_model_src": (sdxl_parts["clip_l"], r"not used: Chroma takes"),
        "vae_model_src": (sdxl_parts["vae"], r"4 latent channels; Chroma decodes 16"),
        "control_net_src": (sdxl_parts["clip_l"], r"not used: Chroma takes"),
    }
    for key, (file, message) in refusals.items():
        config = _config(t5_header, flux1_parts["vae"], **{key: file})
        with pytest.raises(errors.InvalidParameterError, match=message) as caught:
            sfumato.load_model(chroma_gguf, model_config=config)
        assert caught.value.field == f"model_config.{key}"


def test_chroma_maps_onto_the_context_without_flash_attention_over_its_mask(
    chroma_gguf: Path, flux1_parts: dict[str, Path], t5_header: Path, load_spec: CaptureSpec
) -> None:
    context = load_spec(chroma_gguf, _config(t5_header, flux1_parts["vae"])).context
    assert context is not None
    assert (context.diffusion_model_path, context.t5xxl_path, context.vae_path, context.clip_l_path) == (
        str(chroma_gguf.resolve()), str(t5_header.resolve()), str(flux1_parts["vae"].resolve()), None,
    )  # fmt: skip
    # The engine's flash attention saturates Chroma's pictures while the mask is on.
    assert (context.fused_attention, context.diffusion_flash_attn, context.chroma_use_dit_mask) == (False, False, True)
    asked = load_spec(chroma_gguf, _config(t5_header, flux1_parts["vae"], flash_attn=True)).context
    assert asked is not None
    assert (asked.diffusion_flash_attn, asked.chroma_use_dit_mask) == (True, False)


@pytest.mark.usefixtures("no_engine_calls")
def test_chroma_radiance_takes_t5_alone(
    chroma_radiance_gguf: Path, flux1_parts: dict[str, Path], t5_header: Path
) -> None:
    with pytest.raises(errors.InvalidParameterError, match="pass its T5-XXL") as caught:
        sfumato.load_model(chroma_radiance_gguf, model_config={})
    assert caught.value.field == "model_config.t5xxl_model_src"
    for key, file in (("vae_model_src", flux1_parts["vae"]), ("taesd_src", flux1_parts["vae"])):
        config = {"t5xxl_model_src": t5_header, key: file}
        with pytest.raises(errors.InvalidParameterError, match=r"not used: .* denoises pixels, not latents") as caught:
            sfumato.load_model(chroma_radiance_gguf, model_config=config)
        assert caught.value.field == f"model_config.{key}"


@pytest.mark.heavy
def test_chroma_radiance_generates_pixels_from_the_sdk(chroma_radiance_gguf: Path, t5xxl_gguf: Path) -> None:
    model_id = sfumato.load_model(chroma_radiance_gguf, model_config={"t5xxl_model_src": t5xxl_gguf, "threads": 2})
    try:
        outputs, stats, _ = run(model_id, steps=1, seed=9, cfg_scale=1.0)  # one prompt to encode, not two
    finally:
        sfumato.unload_model(model_id)
    picture = decode_png(outputs[0])
    assert picture.shape == (SIZE, SIZE, 3) and picture.std() > 0 and stats.total_steps == 1


@pytest.mark.usefixtures("no_engine_calls")
def test_ovis_needs_ovis_2_5_s_qwen3(ovis_gguf: Path, flux1_parts: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(errors.InvalidParameterError, match="pass its Qwen3 text encoder") as caught:
        sfumato.load_model(ovis_gguf, model_config={"vae_model_src": flux1_parts["vae"]})
    assert caught.value.field == "model_config.llm_model_src"
    klein_s = llm_header(tmp_path, layers=27)
    config = {"llm_model_src": klein_s, "vae_model_src": flux1_parts["vae"]}
    with pytest.raises(errors.InvalidParameterError, match=r"27-layer .* 2560 wide; Ovis-Image reads") as caught:
        sfumato.load_model(ovis_gguf, model_config=config)
    assert caught.value.field == "model_config.llm_model_src"


@pytest.mark.heavy
def test_ovis_generates_from_the_sdk(ovis_gguf: Path, ovis_llm: Path, flux1_parts: dict[str, Path]) -> None:
    config = {"llm_model_src": ovis_llm, "vae_model_src": flux1_parts["vae"], "threads": 2}
    model_id = sfumato.load_model(ovis_gguf, model_config=config)
    try:
        default, stats, _ = run(model_id, steps=1, seed=5)  # cfg_scale 5, the family's: two passes a step
        explicit, _, _ = run(model_id, steps=1, seed=5, cfg_scale=5.0)
    finally:
        sfumato.unload_model(model_id)
    picture = decode_png(default[0])
    assert picture.shape == (SIZE, SIZE, 3) and picture.std() > 0 and stats.total_steps == 1
    assert np.array_equal(picture, decode_png(explicit[0]))


@pytest.fixture(scope="module")
def chroma_model(chroma_gguf: Path, flux1_parts: dict[str, Path], t5xxl_gguf: Path) -> Iterator[str]:
    model_id = sfumato.load_model(chroma_gguf, model_config=_config(t5xxl_gguf, flux1_parts["vae"]))
    yield model_id
    sfumato.unload_model(model_id)


@pytest.mark.heavy
def test_chroma_generates_from_the_sdk(chroma_model: str) -> None:
    outputs, stats, _ = run(chroma_model, steps=1, seed=7, cfg_scale=1.0)  # one prompt for T5 to encode, not two
    picture = decode_png(outputs[0])
    assert picture.shape == (SIZE, SIZE, 3) and stats.total_steps == 1
    assert picture.std() > 5  # flash attention over its mask gave one flat colour
    with pytest.raises(errors.InvalidParameterError, match=r"FLUX\.1 Kontext") as caught:
        sfumato.diffusion(chroma_model, prompt="x", init_images=[picture])
    assert caught.value.field == "init_images"


@pytest.mark.heavy
def test_flux1_fill_paints_inside_its_mask(
    flux1_fill_gguf: Path, flux1_parts: dict[str, Path], sdxl_parts: dict[str, Path], t5xxl_gguf: Path,
    gradient_image: np.ndarray,
) -> None:  # fmt: skip
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[16:48, 16:48] = 255
    model_id = sfumato.load_model(
        flux1_fill_gguf, model_config=_config(t5xxl_gguf, flux1_parts["vae"], sdxl_parts["clip_l"])
    )
    try:
        for given, field in (({}, "init_image"), ({"init_image": gradient_image}, "mask")):
            with pytest.raises(errors.InvalidParameterError, match="Fill paints inside a mask") as caught:
                sfumato.diffusion(model_id, prompt="x", width=SIZE, height=SIZE, **given)  # type: ignore[arg-type]
            assert caught.value.field == field
        painted, _, _ = run(model_id, steps=1, init_image=gradient_image, mask=mask)
        other, _, _ = run(model_id, steps=1, init_image=255 - gradient_image, mask=mask)
    finally:
        sfumato.unload_model(model_id)
    picture = decode_png(painted[0])
    assert picture.shape == (SIZE, SIZE, 3) and picture.std() > 0
    assert not np.array_equal(picture, decode_png(other[0]))  # the masked image reaches the transformer


@pytest.mark.heavy
def test_flux1_depth_takes_its_control_image_without_a_controlnet(
    flux1_depth_gguf: Path, flux1_parts: dict[str, Path], sdxl_parts: dict[str, Path], t5xxl_gguf: Path,
    gradient_image: np.ndarray,
) -> None:  # fmt: skip
    model_id = sfumato.load_model(
        flux1_depth_gguf, model_config=_config(t5xxl_gguf, flux1_parts["vae"], sdxl_parts["clip_l"])
    )
    try:
        with pytest.raises(errors.InvalidParameterError, match="steered by a control image") as caught:
            sfumato.diffusion(model_id, prompt="x", width=SIZE, height=SIZE)
        assert caught.value.field == "control_image"
        steered, _, _ = run(model_id, steps=1, control_image=gradient_image)
        other, _, _ = run(model_id, steps=1, control_image=255 - gradient_image)
    finally:
        sfumato.unload_model(model_id)
    picture = decode_png(steered[0])
    assert picture.shape == (SIZE, SIZE, 3) and picture.std() > 0
    assert not np.array_equal(picture, decode_png(other[0]))  # the control image reaches the transformer

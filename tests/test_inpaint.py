"""Inpainting on the real engine: masked img2img with an ordinary SD 1.x
model, and a dedicated inpainting model (its UNet takes 9 channels: the noisy
latent, the masked image's latent and the mask)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sfumato
from sfumato.families.detect import detect

from .helpers import SIZE, run


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)


@pytest.fixture(scope="module")
def half_mask() -> np.ndarray:
    """White (regenerate) on the right half, black (keep) on the left."""
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[:, SIZE // 2 :] = 255
    return mask


def test_pixels_outside_the_mask_keep_the_source(
    sd1_model: str, gradient_image: np.ndarray, half_mask: np.ndarray
) -> None:
    outputs, _, _ = run(sd1_model, init_image=gradient_image, mask=half_mask, strength=1.0, steps=3)
    out, source = _pixels(outputs[0]), gradient_image.astype(np.int16)
    keep, change = half_mask == 0, half_mask == 255
    assert np.abs(out[keep] - source[keep]).max() <= 1
    # Inside the mask the model painted something else.
    assert np.abs(out[change] - source[change]).mean() > 10


def test_masked_and_unmasked_img2img_differ_inside_the_mask(
    sd1_model: str, gradient_image: np.ndarray, half_mask: np.ndarray
) -> None:
    """The mask reaches the sampler (latent blending), not only the final composite."""
    masked, _, _ = run(sd1_model, init_image=gradient_image, mask=half_mask, strength=0.8, steps=3)
    plain, _, _ = run(sd1_model, init_image=gradient_image, strength=0.8, steps=3)
    change = half_mask == 255
    assert np.abs(_pixels(masked[0])[change] - _pixels(plain[0])[change]).max() > 0


@pytest.mark.parametrize("kind", ["bytes", "path", "pil"])
def test_mask_accepts_every_input_kind_identically(
    sd1_model: str, gradient_image: np.ndarray, half_mask: np.ndarray, kind: str, tmp_path: Path
) -> None:
    reference, _, _ = run(sd1_model, init_image=gradient_image, mask=half_mask, strength=0.6, steps=2)
    buffer = io.BytesIO()
    Image.fromarray(half_mask).save(buffer, format="PNG")
    given: object = buffer.getvalue()
    if kind == "path":
        given = tmp_path / "mask.png"
        given.write_bytes(buffer.getvalue())
    elif kind == "pil":
        given = Image.fromarray(half_mask).convert("RGB")  # any mode is read as grey levels
    outputs, _, _ = run(sd1_model, init_image=gradient_image, mask=given, strength=0.6, steps=2)
    assert outputs == reference


def test_mask_is_resized_with_the_init_image(sd1_model: str, gradient_image: np.ndarray) -> None:
    small = np.zeros((16, 16), dtype=np.uint8)
    small[:, 8:] = 255
    outputs, stats, _ = run(sd1_model, init_image=gradient_image, mask=small, width=128, height=64, steps=1)
    assert (stats.width, stats.height) == (128, 64)
    source = np.asarray(Image.fromarray(gradient_image).resize((128, 64), Image.Resampling.LANCZOS)).astype(np.int16)
    assert np.abs(_pixels(outputs[0])[:, :48] - source[:, :48]).max() <= 1


def test_mask_without_init_image_names_the_field(sd1_model: str, half_mask: np.ndarray) -> None:
    with pytest.raises(sfumato.InvalidParameterError) as caught:
        sfumato.diffusion(sd1_model, prompt="x", mask=half_mask, width=SIZE, height=SIZE)
    assert caught.value.field == "mask"


def test_unreadable_mask_names_the_field(sd1_model: str, gradient_image: np.ndarray) -> None:
    with pytest.raises(sfumato.InvalidParameterError) as caught:
        sfumato.diffusion(sd1_model, prompt="x", init_image=gradient_image, mask=b"not an image")
    assert caught.value.field == "mask"


def test_a_dedicated_inpainting_model(
    sd1_inpaint_gguf: Path, gradient_image: np.ndarray, half_mask: np.ndarray
) -> None:
    assert detect(sd1_inpaint_gguf).variant == "inpaint"
    model_id = sfumato.load_model(sd1_inpaint_gguf, model_config={"threads": 2})
    try:
        outputs, _, _ = run(model_id, init_image=gradient_image, mask=half_mask, strength=1.0, steps=3)
        out, source = _pixels(outputs[0]), gradient_image.astype(np.int16)
        keep, change = half_mask == 0, half_mask == 255
        assert np.abs(out[keep] - source[keep]).max() <= 1
        assert np.abs(out[change] - source[change]).mean() > 10
        # The mask and the masked image reach the UNet itself: another mask, another picture inside it.
        other = np.zeros_like(half_mask)
        other[: SIZE // 2, :] = 255
        moved, _, _ = run(model_id, init_image=gradient_image, mask=other, strength=1.0, steps=3)
        both = change & (other == 255)
        assert np.abs(_pixels(moved[0])[both] - out[both]).max() > 0
    finally:
        sfumato.unload_model(model_id)

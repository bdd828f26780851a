"""The self-made models have the published sizes of the real ones."""

from __future__ import annotations

import math

import pytest

from tests.support.layouts import (
    SD1_UNET,
    SD2_UNET,
    clip_text_layout,
    esrgan_layout,
    open_clip_text_layout,
    unet_layout,
    vae_layout,
)


@pytest.mark.parametrize(
    ("layout", "params"),
    [
        # Published parameter counts of the released checkpoints.
        pytest.param(lambda: unet_layout(SD1_UNET), 859_520_964, id="sd1-unet"),
        pytest.param(lambda: unet_layout(SD2_UNET), 865_910_724, id="sd2-unet"),
        pytest.param(vae_layout, 83_653_863, id="kl-f8-vae"),
        pytest.param(clip_text_layout, 123_060_480, id="clip-vit-l-text"),
        pytest.param(lambda: esrgan_layout(num_block=23), 16_697_987, id="realesrgan-x4plus"),
    ],
)
def test_parameter_counts(layout: object, params: int) -> None:
    specs = layout()  # type: ignore[operator]
    assert sum(math.prod(s.shape) for s in specs) == params


def test_layouts_have_unique_names() -> None:
    for specs in (unet_layout(SD1_UNET), vae_layout(), clip_text_layout(), open_clip_text_layout(), esrgan_layout()):
        names = [s.name for s in specs]
        assert len(names) == len(set(names))
        diffusers = [s.diffusers for s in specs if s.diffusers is not None]
        assert len(diffusers) == len(set(diffusers))

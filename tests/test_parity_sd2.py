"""Reference parity for SD 2.x: the engine, driven through sfumato's SDK, computes what
diffusers (PyTorch, CPU, fp32) computes from the same random SD 2.x weights.

As for SD 1.x (``test_parity.py``, whose helpers and thresholds this reuses): both sides
load one fp32 diffusers folder (SD 2.x's UNet, with its 1024-wide cross-attention and
linear projections; OpenCLIP-H's text tower as diffusers keeps it, 23 of its 24 layers,
since SD 2.x reads the next to last; SD's VAE), the engine with
``model_config={"rng": "cpu", "prediction": ...}`` (random weights leave the engine's
own eps / v detection a guess). Prompts go to diffusers as token ids padded as OpenCLIP
pads them (token 0 after the end token, where SD 1.x repeats the end token).

Thresholds: those of SD 1.x (at most 2 levels anywhere, at least 50 dB), measured here
at 64x64 with 10 euler steps: see the figures in ``docs/families.md`` (parity). Each mapping
covered (the prompt's token ids and padding, cfg_scale, the prediction type), once
broken, misses them by a wide margin (tests at the end).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

import sfumato
from sfumato.images import decode_png
from tests.helpers import assert_close, assert_far
from tests.support.reference import EOS, SD2_PAD, SDReference, cached_reference_folder, sd_token_ids

THREADS = 2
PROMPT = "a photo of a cat"
RUN: dict[str, Any] = {"width": 64, "height": 64, "steps": 10, "cfg_scale": 7.0, "seed": 42}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def weights(model_dir: Path) -> Path:
    return cached_reference_folder(model_dir, version="sd2")


@pytest.fixture(scope="module")
def reference(weights: Path) -> SDReference:
    return SDReference(weights, threads=THREADS)


def _loaded(path: Path, prediction: str) -> Iterator[str]:
    model_id = sfumato.load_model(path, model_config={"rng": "cpu", "threads": THREADS, "prediction": prediction})
    yield model_id
    sfumato.unload_model(model_id)


@pytest.fixture(scope="module")
def eps_model(weights: Path) -> Iterator[str]:
    yield from _loaded(weights, "eps")


@pytest.fixture(scope="module")
def v_model(weights: Path) -> Iterator[str]:
    yield from _loaded(weights, "v")


def sdk_image(model_id: str, **params: Any) -> npt.NDArray[np.uint8]:
    settings = {**RUN, "prompt": PROMPT, "sampling_method": "euler", "scheduler": "discrete", **params}
    [png] = sfumato.diffusion(model_id, **settings).outputs.result()
    return decode_png(png)


def reference_image(reference: SDReference, pad: int = SD2_PAD, **params: Any) -> npt.NDArray[np.uint8]:
    settings = {**RUN, **params}
    prompt = settings.pop("prompt", PROMPT)
    return reference.txt2img(sd_token_ids(prompt, pad), sd_token_ids("", pad), **settings)


@pytest.fixture(scope="module")
def ours(eps_model: str) -> npt.NDArray[np.uint8]:
    """The engine's picture of :data:`RUN` with :data:`PROMPT` (euler, discrete)."""
    return sdk_image(eps_model)


def test_sd2_txt2img_matches_diffusers(ours: npt.NDArray[np.uint8], reference: SDReference) -> None:
    """A whole euler txt2img run with a prompt, from the same initial noise; another prompt's
    conditioning is far from it."""
    assert_close(ours, reference_image(reference))
    assert_far(ours, reference_image(reference, prompt="a photo of a dog"))


def test_sd2_empty_prompt_and_karras_match_diffusers(eps_model: str, reference: SDReference) -> None:
    params = {"prompt": "", "scheduler": "karras", "cfg_scale": 4.0}
    assert_close(sdk_image(eps_model, **params), reference_image(reference, **params))


def test_sd2_v_prediction_matches_diffusers(v_model: str, reference: SDReference) -> None:
    """SD 2.x's 768 models predict v: the same weights read as v-prediction on both sides."""
    assert_close(sdk_image(v_model), reference_image(reference, prediction="v"))


# Each mapping deliberately broken: sfumato's side runs as it does, the reference otherwise.
BROKEN: dict[str, dict[str, Any]] = {
    "padding": {"pad": EOS},  # SD 1.x's padding on SD 2.x's encoder
    "cfg_scale": {"cfg_scale": 5.0},
    "prediction": {"prediction": "v"},
}


@pytest.mark.parametrize("mapping", list(BROKEN))
def test_a_broken_sd2_mapping_fails_parity(ours: npt.NDArray[np.uint8], reference: SDReference, mapping: str) -> None:
    assert_far(ours, reference_image(reference, **BROKEN[mapping]))

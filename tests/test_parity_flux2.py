"""Reference parity for FLUX.2 [klein]: the engine, driven through sfumato's SDK, computes what
diffusers' ``Flux2KleinPipeline`` (PyTorch, CPU, fp32) computes from the same random weights.

The weights are the suite's own FLUX.2 [klein] files, which its behaviour tests load too:
klein 4B's transformer at its real widths with one block of each kind (both the engine and
diffusers read the depth from the file), Qwen3-4B to layer 27 (the deepest klein reads),
both q4_0, and the 32-channel VAE. diffusers gets the same tensors in fp32: the transformer
through diffusers' own single-file converter, Qwen3 dequantized exactly and run one layer at
a time (:class:`tests.support.reference_flux2.StreamedQwen3`), all in a process of its own.

Both sides: the same prompt in Qwen3's chat template (ids from transformers' Qwen2 tokenizer
on the engine's own merges, padded to 512 under an attention mask), the outputs of Qwen3's
layers 9, 18 and 27 side by side, the same initial noise (the engine's ``cpu`` RNG), no
classifier-free guidance (on the engine's side by klein's default ``cfg_scale``, which these
pictures pin at 1: SD's 7 would mix in the empty prompt's prediction), and euler on the
``discrete`` timesteps time-shifted by the ``mu`` both compute from the size and the number
of steps; 4 steps, klein's own.

The VAE: the engine normalises klein's latents by the released VAE's batch-norm statistics
whatever the file holds, so the reference's VAE is given those
(:data:`tests.support.reference_flux2.FLUX2_LATENT_MEAN` and ``..._STD``).

Thresholds: at most :data:`MAX_ABS` levels anywhere and at least :data:`MIN_PSNR` dB, as
FLUX.1's, for the rounding of a quantized text encoder: ggml multiplies a q4_0 matrix by its
input rounded to q8_0, and the same rounding put into every linear layer of the reference
(Qwen3 and the transformer) changes the text context by 2.2% and moves the picture by 3
levels, 53.0 dB. The engine lands 2 levels, 55.7 dB, from the fp32 picture. Each mapping
covered, once broken on the reference's side, misses by far (tests at the end): another
prompt, Qwen3's layers 8, 17 and 26 stacked instead (14 levels, 39.2 dB, the closest), two
Qwen3 layers swapped, the VAE's latent statistics left out, the sigmas left unshifted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from tests.helpers import assert_close, assert_far, parity_picture
from tests.support.reference import LONG_OTHER, LONG_PROMPT, reference_images

THREADS = 2
MAX_ABS, MIN_PSNR = 4, 45.0
RUN: dict[str, Any] = {"prompt": LONG_PROMPT, "width": 64, "height": 64, "steps": 4, "seed": 42}

# What diffusers runs besides RUN: one mapping broken each.
BROKEN: dict[str, dict[str, Any]] = {
    "prompt": {"prompt": LONG_OTHER},
    "text_layers": {"layers": (8, 17, 26)},
    "qwen_layer_order": {"qwen_swapped": (1, 2)},
    "latent_statistics": {"latent_statistics": False},
    "time_shift": {"shift": False},
}

pytestmark = pytest.mark.heavy


@pytest.fixture(scope="module")
def reference(
    flux2_parts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, npt.NDArray[np.uint8]]:
    """diffusers' pictures, by name: ``matched`` and one for each of :data:`BROKEN`."""
    runs = {"matched": RUN, **{name: {**RUN, **change} for name, change in BROKEN.items()}}
    out = tmp_path_factory.mktemp("flux2-reference") / "images.npz"
    return reference_images("flux2", flux2_parts, runs, out, threads=THREADS)


@pytest.fixture(scope="module")
def ours(flux2_parts: dict[str, Path], reference: dict[str, Any]) -> npt.NDArray[np.uint8]:
    """The engine's picture of :data:`RUN`."""
    companions = {"llm_model_src": flux2_parts["llm"], "vae_model_src": flux2_parts["vae"]}
    params = {**RUN, "sampling_method": "euler", "scheduler": "discrete"}  # cfg_scale: the family's default
    return parity_picture(flux2_parts["diffusion"], params, THREADS, **companions)


def test_flux2_klein_matches_diffusers(ours: npt.NDArray[np.uint8], reference: dict[str, Any]) -> None:
    assert_close(ours, reference["matched"], MAX_ABS, MIN_PSNR)


@pytest.mark.parametrize("mapping", list(BROKEN))
def test_a_broken_flux2_klein_mapping_fails_parity(
    ours: npt.NDArray[np.uint8], reference: dict[str, Any], mapping: str
) -> None:
    assert_far(ours, reference[mapping], MAX_ABS, MIN_PSNR)

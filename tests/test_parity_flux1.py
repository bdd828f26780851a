"""Reference parity for FLUX.1 [dev] and [schnell]: the engine, driven through sfumato's SDK,
computes what diffusers' ``FluxPipeline`` (PyTorch, CPU, fp32) computes from the same random
weights.

The weights: [dev]'s and [schnell]'s transformers at their real widths with one block of
each kind (both the engine and diffusers read the depth from the file), fp16 with drawn
biases and norm scales, and the 16-channel VAE
(:func:`tests.support.reference_t5.cached_flux1_parity_files`); CLIP-L from the SDXL parity
files; T5-XXL whole (the engine builds 24 blocks at full width whatever the file holds),
the suite's own q4_0 file that SD3's and FLUX.1's other tests load. The engine loads them
as a transformer file with ``clip_l_model_src``, ``t5xxl_model_src`` and ``vae_model_src``.
diffusers gets the same tensors in fp32: each transformer through diffusers' own
single-file converter, T5 dequantized exactly and run one block at a time
(:class:`tests.support.reference_t5.StreamedT5`: 19 GB in fp32), all in a process of its own.

Both sides: the same prompt (CLIP BPE ids as in the SD parity tests, padded with the end
token; T5 ids from ``tokenizers`` on the engine's own T5 vocabulary, 256 of them, padded
with 0, no mask), the same initial noise (the engine's ``cpu`` RNG), no classifier-free
guidance, and euler on the ``discrete`` timesteps time-shifted as the engine shifts each
variant's (``mu`` 1.15 for [dev], 1 for [schnell]): [dev] 2 steps at distilled guidance
3.5, [schnell] its own 4.

Thresholds: at most :data:`MAX_ABS` levels anywhere and at least :data:`MIN_PSNR` dB,
wider than SD's (2 levels, 50 dB) for the rounding of a quantized T5. ggml multiplies a
q4_0 matrix by its input rounded to q8_0 (8 bits per value, a scale per 32 values); the
same rounding put into every linear layer of the reference's T5 changes its encoding by
1.8% and moves its picture by 2 levels, 55.5 dB (3 levels, 53.3 dB with a four-word
prompt). The engine lands 2 levels, 54.6-54.9 dB, from the fp32 pictures. Each mapping
covered, once broken on the reference's side, misses both by far (tests at the end): T5
given another prompt (16 levels, 38.4 dB, the closest), CLIP-L given another prompt, two
T5 blocks swapped, the guidance, the VAE's latent scale and shift left out, and
[schnell]'s sigmas left unshifted as diffusers samples it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from tests.helpers import assert_close, assert_far, parity_picture
from tests.support.reference import LONG_OTHER, LONG_PROMPT, cached_sdxl_parity_files, reference_images
from tests.support.reference_t5 import cached_flux1_parity_files

THREADS = 2
MAX_ABS, MIN_PSNR = 4, 45.0
RUNS: dict[str, dict[str, Any]] = {
    "dev": {"prompt": LONG_PROMPT, "width": 64, "height": 64, "steps": 2, "guidance": 3.5, "seed": 42},
    # [schnell] at its own 4 steps: its time shift then moves the middle sigmas by far.
    "schnell": {"prompt": LONG_PROMPT, "width": 64, "height": 64, "steps": 4, "guidance": 3.5, "seed": 42},
}

# What diffusers runs besides each variant's RUNS entry: one mapping broken each.
BROKEN: dict[str, dict[str, dict[str, Any]]] = {
    "dev": {
        "t5_prompt": {"t5_prompt": LONG_OTHER},
        "clip_prompt": {"clip_prompt": LONG_OTHER},
        "t5_block_order": {"t5_swapped": (1, 2)},
        "guidance": {"guidance": 4.0},
        "latent_scale": {"latent_scale": False},
    },
    # diffusers' own [schnell] schedule: its sigmas unshifted (the engine shifts them as ComfyUI does).
    "schnell": {"diffusers_schedule": {"shift": 0.0}},
}

pytestmark = pytest.mark.heavy


@pytest.fixture(scope="module")
def files(model_dir: Path, t5xxl_gguf: Path) -> dict[str, Path]:
    return {
        **cached_flux1_parity_files(model_dir),
        "clip_l": cached_sdxl_parity_files(model_dir, roles=("clip_l",))["clip_l"],
        "t5xxl": t5xxl_gguf,
    }


@pytest.fixture(scope="module")
def reference(files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, npt.NDArray[np.uint8]]:
    """diffusers' pictures, by name: ``<variant>`` and ``<variant>-<mapping>`` for each of
    :data:`BROKEN`."""
    runs = {variant: {"variant": variant, **run} for variant, run in RUNS.items()}
    for variant, broken in BROKEN.items():
        runs.update({f"{variant}-{name}": {**runs[variant], **change} for name, change in broken.items()})
    out = tmp_path_factory.mktemp("flux1-reference") / "images.npz"
    return reference_images("flux1", files, runs, out, threads=THREADS)


@pytest.fixture(scope="module")
def ours(files: dict[str, Path], reference: dict[str, Any]) -> dict[str, npt.NDArray[np.uint8]]:
    """The engine's pictures of :data:`RUNS`, by variant."""
    companions = {f"{role}_model_src": files[role] for role in ("clip_l", "t5xxl", "vae")}
    settings = {"cfg_scale": 1.0, "sampling_method": "euler", "scheduler": "discrete"}
    return {
        variant: parity_picture(files[variant], {**run, **settings}, THREADS, **companions)
        for variant, run in RUNS.items()
    }


@pytest.mark.parametrize("variant", list(RUNS))
def test_flux1_matches_diffusers(ours: dict[str, Any], reference: dict[str, Any], variant: str) -> None:
    assert_close(ours[variant], reference[variant], MAX_ABS, MIN_PSNR)


@pytest.mark.parametrize(
    ("variant", "mapping"), [(variant, name) for variant, broken in BROKEN.items() for name in broken]
)
def test_a_broken_flux1_mapping_fails_parity(
    ours: dict[str, Any], reference: dict[str, Any], variant: str, mapping: str
) -> None:
    assert_far(ours[variant], reference[f"{variant}-{mapping}"], MAX_ABS, MIN_PSNR)

"""Reference parity for SD3 Medium: the engine, driven through sfumato's SDK, computes what
diffusers' ``StableDiffusion3Pipeline`` (PyTorch, CPU, fp32) computes from the same random
weights.

The weights: SD3 Medium whole (the engine builds no shallower MMDiT than its 24 joint
blocks), as ``sd3_medium.safetensors`` holds it without text encoders, q4_0 as the suite's
other SD3 file, with drawn biases and norm scales
(:func:`tests.support.reference_t5.cached_sd3_parity_file`); CLIP-L and CLIP-G from the SDXL
parity files; the suite's q4_0 T5-XXL. diffusers gets the same tensors in fp32 (every q4_0
value dequantized exactly), the MMDiT through diffusers' own single-file converter, T5 one
block at a time, in a process of its own.

Both sides: the same prompt and negative prompt (CLIP-L padded with its end token and
CLIP-G with 0, T5 to 77 tokens with 0), the same initial noise (the engine's ``cpu`` RNG),
cfg 5, and 2 euler steps on the ``discrete`` timesteps (1 and 1/1000) shifted by SD3's 3.

Thresholds: at most :data:`MAX_ABS` levels anywhere and at least :data:`MIN_PSNR` dB. They
are wider than FLUX.1's because this MMDiT is quantized: ggml multiplies each q4_0 matrix by
its input rounded to q8_0 (8 bits per value, a scale per 32 values). That rounding, put into
every such linear layer of the reference's MMDiT, moves its picture by 10 levels, 41.9 dB;
the engine lands 8 levels, 43.1 dB, from the fp32 picture. (An fp16 MMDiT would narrow them
but takes 4.2 GB of disk.) Each mapping covered, once broken on the reference's side,
misses both by far (tests at the end): T5 given another prompt, both CLIPs given another
prompt, cfg_scale, the first two joint blocks swapped, and the VAE's latent scale and shift
left out (the closest: cfg 4 instead of 5, 56 levels, 26.9 dB).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from tests.helpers import assert_close, assert_far, parity_picture
from tests.support.reference import LONG_OTHER, LONG_PROMPT, cached_sdxl_parity_files, reference_images
from tests.support.reference_t5 import cached_sd3_parity_file

THREADS = 2
MAX_ABS, MIN_PSNR = 16, 36.0
RUN: dict[str, Any] = {
    "prompt": LONG_PROMPT, "negative_prompt": "blurry", "width": 64, "height": 64, "steps": 2, "cfg_scale": 5.0,
    "seed": 42,
}  # fmt: skip

# What diffusers runs besides RUN: one mapping broken each.
BROKEN: dict[str, dict[str, Any]] = {
    "t5_prompt": {"t5_prompt": LONG_OTHER},
    "clip_prompt": {"clip_prompt": LONG_OTHER},
    "cfg_scale": {"cfg_scale": 4.0},
    "block_order": {"swap_blocks": True},
    "latent_scale": {"latent_scale": False},
}

pytestmark = pytest.mark.heavy


@pytest.fixture(scope="module")
def files(model_dir: Path, t5xxl_gguf: Path) -> dict[str, Path]:
    return {
        "diffusion": cached_sd3_parity_file(model_dir),
        **cached_sdxl_parity_files(model_dir, roles=("clip_l", "clip_g")),
        "t5xxl": t5xxl_gguf,
    }


@pytest.fixture(scope="module")
def reference(files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, npt.NDArray[np.uint8]]:
    """diffusers' pictures, by name: ``matched`` and each of :data:`BROKEN`."""
    runs = {"matched": RUN, **{name: {**RUN, **change} for name, change in BROKEN.items()}}
    out = tmp_path_factory.mktemp("sd3-reference") / "images.npz"
    return reference_images("sd3", files, runs, out, threads=THREADS)


@pytest.fixture(scope="module")
def ours(files: dict[str, Path], reference: dict[str, Any]) -> npt.NDArray[np.uint8]:
    """The engine's picture of :data:`RUN`."""
    companions = {f"{role}_model_src": files[role] for role in ("clip_l", "clip_g", "t5xxl")}
    params = {**RUN, "sampling_method": "euler", "scheduler": "discrete"}
    return parity_picture(files["diffusion"], params, THREADS, **companions)


def test_sd3_matches_diffusers(ours: npt.NDArray[np.uint8], reference: dict[str, Any]) -> None:
    assert_close(ours, reference["matched"], MAX_ABS, MIN_PSNR)


@pytest.mark.parametrize("mapping", list(BROKEN))
def test_a_broken_sd3_mapping_fails_parity(
    ours: npt.NDArray[np.uint8], reference: dict[str, Any], mapping: str
) -> None:
    assert_far(ours, reference[mapping], MAX_ABS, MIN_PSNR)

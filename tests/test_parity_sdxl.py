"""Reference parity for SDXL: the engine, driven through sfumato's SDK, computes what
diffusers' ``StableDiffusionXLPipeline`` (PyTorch, CPU, fp32) computes from the same random
SDXL weights, in both layouts sfumato loads.

The weights: SDXL's split layout at full size (the 2.6B UNet with its 1, 2 and 10
transformer blocks per level, which the engine does not read from the file; CLIP-L;
OpenCLIP-bigG as ``CLIPTextModelWithProjection``; the VAE), fp16, with drawn biases and
norm scales so that a bias or norm in the wrong place shows
(:func:`tests.support.reference.cached_sdxl_parity_files`). The engine loads them as a
UNet file with ``clip_l_model_src``, ``clip_g_model_src`` and ``vae_model_src``, and as the
all-in-one checkpoint holding the very same tensors under SDXL base's own names, CLIP-G in
OpenCLIP's layout (:func:`tests.support.reference.write_sdxl_checkpoint`). diffusers gets
them widened to fp32 (exactly), in a process of its own (:func:`reference_images`):
the fp32 UNet alone takes 10 GB.

Both sides: the same prompts (CLIP BPE ids from ``instant-clip-tokenizer``, CLIP-L padded
with its end token and CLIP-G with 0, as the engine pads them), the same initial noise
(the engine's ``cpu`` RNG), 2 euler steps on the ``discrete`` timesteps 999 and 0 (each
step two full UNet evaluations: few steps keep the fp32 reference's minutes down),
and the size conditioning of a 64x64 picture.

Thresholds: those of SD 1.x (at most 2 levels anywhere, at least 50 dB). Measured here:
1 level and 64.5-66.5 dB for both layouts, in fp32 on both sides over fp16 weights. Each
mapping covered, once broken on the reference's side, misses both by far (tests at the
end): the prompt, cfg_scale, CLIP-G's padding, the size conditioning, two transformer
blocks swapped, and CLIP-G's pooled projection transposed (the engine's own reading of an
all-in-one checkpoint, which sfumato corrects: see
:func:`sfumato.families.companions.sdxl_projection_hint`).
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
from tests.support.reference import EOS, cached_sdxl_parity_files, reference_images, write_sdxl_checkpoint

THREADS = 2
RUN: dict[str, Any] = {
    "prompt": "a photo of a cat", "negative_prompt": "blurry", "width": 64, "height": 64, "steps": 2,
    "cfg_scale": 5.0, "seed": 42,
}  # fmt: skip

# What diffusers runs: RUN as it is, with an empty negative prompt, and with one mapping broken.
EMPTY_NEGATIVE: dict[str, dict[str, Any]] = {
    # The engine zeroes an empty negative prompt's hidden states (not its pooled text) on SDXL.
    "engine": {"negative_prompt": "", "zero_negative": "hidden"},
    # diffusers' SDXL pipelines zero both (force_zeros_for_empty_prompt, as SDXL base ships).
    "diffusers": {"negative_prompt": "", "zero_negative": "both"},
}
BROKEN: dict[str, dict[str, Any]] = {
    "prompt": {"prompt": "a photo of a dog"},
    "cfg_scale": {"cfg_scale": 4.0},
    "clip_g_padding": {"g_pad": EOS},
    "size_conditioning": {"original_size": (128, 128)},
    "block_order": {"swap_blocks": True},
    "pooled_projection": {"transposed_projection": True},
}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def parts(model_dir: Path) -> dict[str, Path]:
    return cached_sdxl_parity_files(model_dir)


@pytest.fixture(scope="module")
def reference(parts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, npt.NDArray[np.uint8]]:
    """diffusers' pictures, by name: ``matched``, ``empty-negative-*`` and each of :data:`BROKEN`
    (run before the engine loads anything of this module)."""
    runs = {"matched": RUN}
    runs.update({f"empty-negative-{k}": {**RUN, **v} for k, v in EMPTY_NEGATIVE.items()})
    runs.update({name: {**RUN, **v} for name, v in BROKEN.items()})
    out = tmp_path_factory.mktemp("sdxl-reference") / "images.npz"
    return reference_images("sdxl", parts, runs, out, threads=THREADS)


def _loaded(path: Path, **config: Any) -> Iterator[str]:
    model_id = sfumato.load_model(path, model_config={"rng": "cpu", "threads": THREADS, **config})
    yield model_id
    sfumato.unload_model(model_id)


@pytest.fixture(scope="module")
def split_model(parts: dict[str, Path], reference: dict[str, Any]) -> Iterator[str]:
    companions = {f"{role}_model_src": parts[role] for role in ("clip_l", "clip_g", "vae")}
    yield from _loaded(parts["unet"], **companions)


@pytest.fixture(scope="module")
def checkpoint(
    parts: dict[str, Path], reference: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """The all-in-one checkpoint of the same tensors (7 GB, removed when the module ends)."""
    path = write_sdxl_checkpoint(parts, tmp_path_factory.mktemp("sdxl-checkpoint") / "sdxl.safetensors")
    yield path
    path.unlink()


def sdk_image(model_id: str, **params: Any) -> npt.NDArray[np.uint8]:
    settings = {**RUN, "sampling_method": "euler", "scheduler": "discrete", **params}
    [png] = sfumato.diffusion(model_id, **settings).outputs.result()
    return decode_png(png)


@pytest.fixture(scope="module")
def ours(split_model: str) -> npt.NDArray[np.uint8]:
    """The engine's picture of :data:`RUN` from the split layout."""
    return sdk_image(split_model)


def test_split_sdxl_matches_diffusers(ours: npt.NDArray[np.uint8], reference: dict[str, Any]) -> None:
    assert_close(ours, reference["matched"])


def test_all_in_one_sdxl_matches_diffusers(checkpoint: Path, reference: dict[str, Any]) -> None:
    """The checkpoint's names, CLIP-G's OpenCLIP layout (q, k, v stacked, the projection
    stored transposed) and its own VAE read as diffusers reads the split files."""
    model_id = sfumato.load_model(checkpoint, model_config={"rng": "cpu", "threads": THREADS})
    try:
        image = sdk_image(model_id)
    finally:
        sfumato.unload_model(model_id)
    assert_close(image, reference["matched"])
    # Without sfumato's correction the engine projects with the transpose, and misses.
    assert_far(image, reference["pooled_projection"])


def test_an_empty_negative_prompt_is_the_engines_zeroed_hidden_states(
    split_model: str, reference: dict[str, Any]
) -> None:
    """An empty negative prompt: the engine zeroes its hidden states and keeps its pooled
    text. That is not diffusers' way (both zeroed), whose picture differs by far."""
    image = sdk_image(split_model, negative_prompt="")
    assert_close(image, reference["empty-negative-engine"])
    assert_far(image, reference["empty-negative-diffusers"])


@pytest.mark.parametrize("mapping", [name for name in BROKEN if name != "pooled_projection"])
def test_a_broken_sdxl_mapping_fails_parity(
    ours: npt.NDArray[np.uint8], reference: dict[str, Any], mapping: str
) -> None:
    assert_far(ours, reference[mapping])

"""Reference parity of each flavour of the engine: the SD 1.x parity run of
``test_parity.py`` (2 euler steps, timesteps 999 and 0) on every CPU variant this CPU runs, in the bf16 mode on
every variant that carries it, and on Vulkan (Mesa's lavapipe, the Vulkan driver every
machine has), each against diffusers' fp32 picture of the same weights and held to its own
threshold.

Thresholds:
- each variant's exact kernels, and Vulkan with ggml's f16 shader arithmetic off
  (``GGML_VK_DISABLE_F16``; see ``test_devices.py``): those of the default build (at most
  2 levels, at least 50 dB). Measured here: max abs 1, 60.5-60.6 dB on the four variants,
  58.3 dB on Vulkan.
- the bf16 mode: at most :data:`BF16_MAX_ABS` levels and at least :data:`BF16_MIN_PSNR` dB.
  bf16 keeps 8 bits of mantissa, so every product's operands move by up to 2^-9 of their
  size. Measured here: 6 levels and 45.8-46.1 dB from diffusers' fp32 (Intel Xeon, zen4
  and sapphirerapids, AVX512-BF16 and AMX; diffusers' own bf16 lands 45-48 dB from its
  fp32 at 256-512, ``bench/test_bf16.py``; the full model at 256 and 512, 43.5 dB from
  the exact mode). Another prompt's picture, the negative control, lands 77-78 levels and
  23.3 dB away.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from sfumato.engine.kernels import carries_bf16
from sfumato.images import decode_png
from tests.helpers import assert_close, assert_far, difference, parity_picture
from tests.support.reference import SDReference, cached_reference_folder, sd_token_ids
from tests.test_bf16 import _has_bf16, _variants
from tests.test_cpu_variants import _runnable
from tests.test_devices import F32_SHADERS, _with_lavapipe

THREADS = 2
PROMPT = "a photo of a cat"
RUN: dict[str, Any] = {"width": 64, "height": 64, "steps": 2, "cfg_scale": 7.0, "seed": 42}
BF16_MAX_ABS, BF16_MIN_PSNR = 16, 38.0

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def weights(model_dir: Path) -> Path:
    return cached_reference_folder(model_dir)


@pytest.fixture(scope="module")
def references(weights: Path) -> Iterator[dict[str, npt.NDArray[np.uint8]]]:
    """diffusers' pictures of :data:`PROMPT` and of another prompt (the negative control)."""
    reference = SDReference(weights, threads=THREADS)
    yield {
        prompt: reference.txt2img(sd_token_ids(prompt), sd_token_ids(""), **RUN)
        for prompt in (PROMPT, "a photo of a dog")
    }
    del reference


SETTINGS: dict[str, Any] = {**RUN, "prompt": PROMPT, "sampling_method": "euler", "scheduler": "discrete"}


def flavour_image(weights: Path, **config: Any) -> npt.NDArray[np.uint8]:
    return parity_picture(weights, SETTINGS, THREADS, **config)


def test_every_runnable_variant_matches_diffusers(weights: Path, references: dict[str, Any]) -> None:
    variants = _runnable()
    assert variants, "this CPU runs no variant of the build"
    for variant in variants:
        print(variant, end=": ")
        image = flavour_image(weights, cpu_variant=variant)
        assert_close(image, references[PROMPT])
    assert_far(image, references["a photo of a dog"])


def test_the_bf16_mode_on_each_carrier_matches_diffusers_within_its_threshold(
    weights: Path, references: dict[str, Any]
) -> None:
    carriers = [name for name, path in _variants().items() if carries_bf16(path) and name in _runnable()]
    if not _has_bf16():  # the mode's refusal there is test_bf16.py's
        assert not carriers, carriers
        return
    assert carriers, "sfumato's build carries a variant with the bf16 kernels (zen4)"
    for variant in carriers:
        image = flavour_image(weights, cpu_variant=variant, precision="bf16")
        max_abs, psnr = difference(image, references[PROMPT])
        print(f"bf16 on {variant}: max abs {max_abs}, PSNR {psnr:.2f} dB")
        assert max_abs > 0, "the bf16 mode rounded nothing: it did not run"
        assert max_abs <= BF16_MAX_ABS and psnr >= BF16_MIN_PSNR, (max_abs, psnr)
        # The threshold still tells prompts apart: the other prompt's picture misses it.
        max_abs, psnr = difference(image, references["a photo of a dog"])
        assert max_abs > BF16_MAX_ABS and psnr < BF16_MIN_PSNR, (max_abs, psnr)


_ON_VULKAN = """
model = sfumato.load_model(args["model"], model_config={"device": "Vulkan0", "rng": "cpu", "threads": 2})
result = sfumato.diffusion(model, **args["settings"])
(out / "vulkan.png").write_bytes(result.outputs.result(timeout=900)[0])
device = result.stats.result(timeout=60).device
unload(model)
print(json.dumps({"device": device}))
"""


def test_vulkan_on_lavapipe_matches_diffusers(weights: Path, references: dict[str, Any], tmp_path: Path) -> None:
    found, _ = _with_lavapipe(_ON_VULKAN, tmp_path, F32_SHADERS, model=str(weights), settings=SETTINGS)
    assert found["device"] == "Vulkan0"
    image = decode_png((tmp_path / "vulkan.png").read_bytes())
    assert_close(image, references[PROMPT])
    assert_far(image, references["a photo of a dog"])

"""The bf16 mode of sfumato's CPU kernels (``model_config.precision="bf16"``), end to end.

On a CPU with AVX512-BF16 or AMX-BF16 the mode loads the model's weights as bf16, runs
its worker on a CPU variant whose kernels carry the mode, and generates an image close
to the exact mode's, and not equal to it (the operands were rounded). On any other CPU
it is refused by name before a worker starts; so is every way of asking for it where it
cannot run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import sfumato
from sfumato import errors
from sfumato.engine.cpu_variants import BF16_FLAGS, variant_modules
from sfumato.engine.devices import Device
from sfumato.engine.kernels import carries_bf16
from sfumato.engine.library import load_engine
from sfumato.images import decode_png
from sfumato.loading import check_precision

from .helpers import assert_far, difference, sdk_script

# bf16 keeps 8 bits of mantissa: each product's operands move by up to 2^-9 of their
# size. Over this model's 4 steps at 64x64 the image lands 42.2 dB from the exact
# mode's (AMD EPYC Zen 4; the full SD 1.x UNet at 256, 2 steps: 43.7 dB); another seed
# lands under 15 dB, and so would a broken bf16 kernel (a wrong pair order, half of k).
BF16_MIN_PSNR = 35.0


def _has_bf16() -> bool:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return bool(set(BF16_FLAGS) & set(line.partition(":")[2].split()))
    raise AssertionError("/proc/cpuinfo has no flags line")


def _variants() -> dict[str, Path]:
    return variant_modules({m.name: m.path for m in load_engine().modules})


_BOTH_MODES = """
run = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 4, "cfg_scale": 7.0}
for precision in ("exact", "bf16"):
    config = {"device": "cpu", "precision": precision, "threads": 2}
    model = sfumato.load_model(args["model"], model_config=config)
    (out / f"{precision}.png").write_bytes(sfumato.diffusion(model, seed=7, **run).outputs.result(timeout=600)[0])
    unload(model)
    if precision == "exact":
        model = sfumato.load_model(args["model"], model_config=config)
        other = sfumato.diffusion(model, seed=8, **run).outputs.result(timeout=600)[0]
        (out / "other-seed.png").write_bytes(other)
        unload(model)
print(json.dumps({}))
"""


def test_the_bf16_mode_generates_close_to_the_exact_mode_or_is_refused_by_name(
    sd1_tiny_gguf: Path, tmp_path: Path
) -> None:
    if not _has_bf16():
        with pytest.raises(errors.InvalidParameterError, match=r"model_config\.precision: 'bf16' needs a CPU with"):
            sfumato.load_model(sd1_tiny_gguf, model_config={"device": "cpu", "precision": "bf16"})
        return
    carriers = [name for name, path in _variants().items() if carries_bf16(path)]
    assert carriers, "sfumato's build carries a variant with the bf16 kernels (zen4)"
    _, log = sdk_script(_BOTH_MODES, tmp_path, {}, model=str(sd1_tiny_gguf))
    library = load_engine().path.parent
    # The bf16 model's worker ran a variant with the bf16 kernels (ggml's own log line).
    assert any(f"loaded CPU backend from {library}/libggml-cpu-{v}.so" in log for v in carriers), log[-3000:]
    exact, bf16 = (decode_png((tmp_path / f"{p}.png").read_bytes()) for p in ("exact", "bf16"))
    max_abs, psnr = difference(bf16, exact)
    print(f"bf16 against exact: max abs {max_abs}, PSNR {psnr:.2f} dB")
    assert max_abs > 0, "the bf16 mode rounded nothing: it did not run"
    assert psnr >= BF16_MIN_PSNR, f"PSNR {psnr:.2f} dB against the exact mode (>= {BF16_MIN_PSNR})"
    assert_far(exact, decode_png((tmp_path / "other-seed.png").read_bytes()))


def test_the_bf16_mode_is_refused_by_name_where_it_cannot_run(sd1_tiny_gguf: Path) -> None:
    with pytest.raises(
        errors.InvalidParameterError, match=r"model_config\.precision: must be one of \['exact', 'bf16'\]"
    ):
        sfumato.load_model(sd1_tiny_gguf, model_config={"precision": "fp8"})
    # A GPU device: the mode is the CPU kernels'.
    gpu = Device(name="Vulkan0", description="a GPU", type="gpu", memory_free=0, memory_total=0)
    with pytest.raises(errors.InvalidParameterError, match=r"model_config\.precision: .* runs on Vulkan0"):
        check_precision("bf16", gpu, _variants(), None)
    if _has_bf16():
        # A named variant without the bf16 kernels.
        with pytest.raises(errors.InvalidParameterError, match=r"model_config\.cpu_variant: 'haswell' has no bf16"):
            sfumato.load_model(sd1_tiny_gguf, model_config={"cpu_variant": "haswell", "precision": "bf16"})
    env = {k: v for k, v in os.environ.items() if k != "SFUMATO_PRECISION"}
    bad = subprocess.run(
        [sys.executable, "-m", "sfumato", "info"], env={**env, "SFUMATO_PRECISION": "half"},
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert bad.returncode == 2
    assert "SFUMATO_PRECISION: must be one of ['exact', 'bf16'], got 'half'" in bad.stderr

"""sfumato's own CPU kernels (``csrc/``) against ggml's own, on random tensors.

Each CPU variant module this CPU runs is loaded in a process of its own
(``tests/support/kernels.py``) and runs every case twice, with sfumato's kernel and
with ggml's, on the same inputs; both are measured against the operation in float64.
The haswell module also runs under ``qemu-x86_64 -cpu Haswell`` (AVX2, no AVX-512),
single ops on small tensors, one thread.

Tolerances: sfumato's CONV_2D and MUL_MAT multiply and sum in f32 (f16 and bf16 weights
are widened exactly), so they must land within 1e-5 of float64, relative to the output's
largest magnitude; ggml's own round the input (the activations) to f16 first wherever
the weights are f16, which shows as errors of about 2e-4, and sfumato's must be the
smaller there.

The bf16 mode (the variants with AVX512-BF16; the sapphirerapids module's products on
AMX-BF16's tiles, which it must use on a CPU with AMX-BF16): its products are exact and its sums f32,
so it must land within 1e-5 of float64 over the operands rounded to bf16 (to nearest,
ties to even, as numpy computes it here; the attention within ATTN_BF16_FLIPS, as it
rounds a value it computed), and its distance from the unrounded float64 must be what
rounding 8-bit mantissas gives: 1e-4 to 1e-2 of the output's magnitude. Its
convolutions run again with their weights in a buffer marked as the model's weights,
which the mode keeps rounded to bf16 across calls (``csrc/kept_weights.h``), and one
context checks the kept copy's life: made, read, replaced when new weights are set in
place, dropped when a graph writes into them.

Folds (``csrc/fusion.h``): each fold case's chain (a convolution with its bias and skip,
a group norm with gamma, beta and silu, built as the engine builds them) must fold the
nodes it names (none with folds off), land within 1e-5 of float64, and, for a
convolution, equal the unfolded run bit for bit (the same adds in the same order).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sfumato.engine.cpu_variants import BF16_FLAGS, bf16_variants, cpu_identity, runs_here, variant_modules
from sfumato.engine.kernels import AMX, module_kernels
from sfumato.engine.library import backend_modules, locate_library
from sfumato.errors import InvalidParameterError
from tests.support.kernels import ATTN_CASES, CONV_CASES, FOLD_CASES, MAT_CASES

from .helpers import ROOT

EXACT = 1e-5
BF16_ROUNDING = (1e-4, 1e-2)  # bf16's 8-bit mantissas move a product's operands by up to 2^-9
F16_INPUT_ROUNDING = 5e-5  # ggml's own CONV_2D is at least this far off: it rounds the input to f16
# The bf16 attention rounds the softmax's numerators, which the kernel's 2^x computes to
# 2.7e-6: where float64's lands by a rounding boundary the two round apart, one bf16 step
# (2^-8) of that weight. Measured: at most 9.3e-4 over the cases on AMX's tiles (9.4e-4
# with the earlier degree-6 exp on the AVX512-BF16 tile).
ATTN_BF16_FLIPS = 2e-3


def _variants() -> dict[str, Path]:
    return variant_modules(backend_modules(locate_library()))


def _check(command: list[str], timeout: float) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The module's own report (its kernels, whether AMX's tiles are ready) and each case's result."""
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return lines[0], lines[1:]


def _assert_exact(results: list[dict[str, Any]], cases: int) -> None:
    assert len(results) == cases
    for r in results:
        if r["op"] == "fold":
            assert r["folded"] == r["shape"]["folded"] and r["unfolded_folded"] == 0, r
            assert r["sfumato_error"] <= EXACT, r
            assert r["identical"] or r["shape"]["conv"] is None, r  # a convolution's adds, in the same order
            continue
        assert r["sfumato_error"] <= EXACT, r
        if r["shape"].get("weights") == "f16":
            assert r["ggml_error"] >= F16_INPUT_ROUNDING, r  # the comparison sees two different kernels
            assert r["sfumato_error"] < r["ggml_error"], r


def test_every_variant_carries_the_kernels_for_its_instruction_set() -> None:
    variants = _variants()
    assert variants, "sfumato's build ships CPU variant modules"
    isa = {"haswell": "avx2", "skylakex": "avx512", "zen4": "avx512", "sapphirerapids": "avx512"}
    # The bf16 mode needs AVX512-BF16; the sapphirerapids module runs its products on AMX's tiles.
    bf16 = {"haswell": "", "skylakex": "", "zen4": "+bf16", "sapphirerapids": "+bf16+amx"}
    for name, path in variants.items():
        assert module_kernels(path) == {
            "conv_2d": isa[name] + bf16[name],
            "mul_mat": isa[name] + bf16[name],
            "flash_attn_ext": isa[name] + bf16[name],
            "group_norm": isa[name],
        }, name


def test_conv_2d_and_mul_mat_against_ggml_and_float64_on_every_variant_this_cpu_runs() -> None:
    runnable = {name: path for name, path in _variants().items() if runs_here(path)}
    assert "haswell" in runnable, "every x86-64 CPU sfumato runs on runs the floor"
    # An AVX-512 variant on a CPU without it is tested where the CPU has it (every machine
    # of this project's CI so far has); qemu-user does not emulate AVX-512.
    print(f"variants this CPU runs: {sorted(runnable)}; not here: {sorted(set(_variants()) - set(runnable))}")
    for name, module in runnable.items():
        carried, results = _check([sys.executable, "-m", "tests.support.kernels", str(module), "2"], timeout=300)
        assert carried["kernels"].startswith("conv_2d:"), name
        _assert_exact(results, len(CONV_CASES) + len(MAT_CASES) + len(ATTN_CASES) + len(FOLD_CASES))


def test_the_bf16_mode_against_float64_on_every_variant_that_carries_it_or_its_refusal() -> None:
    runnable = {name: path for name, path in _variants().items() if runs_here(path)}
    model, flags = cpu_identity()
    if not set(BF16_FLAGS) & set(flags.split()):
        with pytest.raises(InvalidParameterError, match="'bf16' needs a CPU with AVX512-BF16 or AMX-BF16"):
            bf16_variants(runnable, "model_config.precision")
        return
    carriers = bf16_variants(runnable, "model_config.precision")
    print(f"{model}: variants with the bf16 mode: {sorted(carriers)}")
    runs = [(name, module, True) for name, module in carriers.items()]
    # A module with AMX's tile products also runs the AVX512-BF16 tile, where the tiles are
    # not granted (a kernel without AMX support): that way too, with the tiles turned off.
    on_amx_cpu = "amx_bf16" in flags.split()
    runs += [(name, module, False) for name, module in carriers.items() if AMX in module_kernels(module)["mul_mat"]]
    for name, module, tiles in runs:
        command = [sys.executable, "-m", "tests.support.kernels", str(module), "2", "--bf16"]
        carried, results = _check(command if tiles else [*command, "--no-amx"], timeout=300)
        # A module with AMX's tile products runs them on a CPU with AMX-BF16 (no silent
        # fall-back to the AVX512-BF16 tile), and the AVX512-BF16 tile elsewhere.
        on_tiles = tiles and on_amx_cpu and AMX in module_kernels(module)["mul_mat"]
        assert carried["amx"] == int(on_tiles), (name, carried)
        print(f"{name}: {'AMX-BF16 tiles' if on_tiles else 'AVX512-BF16 tile'}")
        assert len(results) == len(CONV_CASES) + len(MAT_CASES) + len(ATTN_CASES) + 1, name
        *cases, kept = results
        for r in cases:
            assert r["bf16_error"] <= (ATTN_BF16_FLIPS if r["op"] == "flash_attn_ext" else EXACT), r
            assert BF16_ROUNDING[0] <= r["bf16_vs_exact"] <= BF16_ROUNDING[1], r
            if r["op"] == "conv_2d":  # and with its weights kept (a buffer marked as weights)
                assert r["kept_error"] <= EXACT, r
        _assert_kept(kept)


def _assert_kept(result: dict[str, Any]) -> None:
    """The kept weights' lifecycle: each run right for the weights it had then; a copy
    kept after the first run, still there after new weights were set in place (the guard
    replaced it), gone once a graph wrote into the weights, and made again."""
    steps = result["steps"]
    for step in ("made", "kept", "new_weights", "written"):
        assert steps[step]["error"] <= EXACT, (step, result)
    assert steps["made"]["kept_bytes"] > 0, result
    assert steps["kept"]["kept_bytes"] == steps["made"]["kept_bytes"], result
    assert steps["after_write"]["kept_bytes"] < steps["new_weights"]["kept_bytes"], result
    assert steps["written"]["kept_bytes"] == steps["new_weights"]["kept_bytes"], result


# Under emulation every instruction costs tens of native ones: the smaller cases only.
EMULATED_CASES = [
    *(c.name for c in CONV_CASES if c.n * c.ic * c.h * c.w * c.oc * c.kh * c.kw < 3_000_000),
    *(c.name for c in MAT_CASES if c.m * c.n * c.k * c.batch < 3_000_000),
    *(c.name for c in ATTN_CASES if c.d * c.lq * (c.lk + c.pad) * c.heads * c.batch < 3_000_000),
    *(c.name for c in FOLD_CASES),  # all small
]


def test_the_haswell_module_kernels_on_an_emulated_avx2_cpu() -> None:
    qemu = shutil.which("qemu-x86_64")
    assert qemu, "qemu-x86_64 is missing: install Debian's qemu-user (.ci/run does)"
    module = _variants()["haswell"]
    command = [qemu, "-cpu", "Haswell", sys.executable, "-m", "tests.support.kernels", str(module), "1"]
    carried, results = _check([*command, *EMULATED_CASES], timeout=600)
    assert carried["kernels"] == "conv_2d:avx2,mul_mat:avx2,flash_attn_ext:avx2,group_norm:avx2"
    _assert_exact(results, len(EMULATED_CASES))


def test_sfumato_kernels_ggml_runs_ggml_own_and_a_bad_value_is_refused_by_name() -> None:
    def info(choice: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "sfumato", "info", "--json"], capture_output=True, text=True, timeout=300,
            check=False, env={**os.environ, "SFUMATO_KERNELS": choice},
        )  # fmt: skip

    ggml = info("ggml")
    assert ggml.returncode == 0, ggml.stderr
    assert json.loads(ggml.stdout)["kernels"] == {"choice": "ggml", "running": {}}
    bad = info("fast")
    assert bad.returncode == 2
    assert "SFUMATO_KERNELS: must be one of ['sfumato', 'ggml'], got 'fast'" in bad.stderr

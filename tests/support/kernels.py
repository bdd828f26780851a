"""sfumato's CPU kernels against ggml's own, in one CPU module, in a process of its own.

``python -m tests.support.kernels MODULE THREADS [--bf16] [CASE...]`` loads one CPU
variant module through ggml's library (no engine), runs each case's graph (a CONV_2D, a
MUL_MAT or a FLASH_ATTN_EXT) twice, with sfumato's kernels and with ggml's own (the module's
``sfumato_kernels_set_enabled``), on the same random inputs, computes the same
operation in float64 with numpy, and prints one JSON line per case: the largest error
of each side against float64, relative to the largest output magnitude. With
``--bf16`` it runs sfumato's kernels in their bf16 mode instead, against float64 over
the operands rounded to bf16 as the mode rounds them, and against float64 over the
operands as they are. A process per module: a variant the CPU
cannot run never loads in the test's own process, and the haswell module runs under
``qemu-x86_64 -cpu Haswell`` this way.

Folds (``csrc/fusion.h``): each chain of a fold case (a convolution with its bias and
skip, a group norm with gamma, beta and silu, built as the engine builds them) runs
three times: sfumato's kernels with folds, without, and ggml's own; the line says how
many nodes the folded run passed and whether its output is the unfolded one bit for bit.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sfumato.engine import _cdefs

_F32, _F16, _BF16 = 0, 1, 30
_PREC_F32 = 10  # enum ggml_prec: the op's f32 accumulators
_TYPES = {"f32": _F32, "f16": _F16, "bf16": _BF16}
_USAGE_WEIGHTS = 1  # enum ggml_backend_buffer_usage: the model's parameters
_GGML = "libggml.so"
# Makes a one-op graph in a ggml context: its inputs with their arrays, and its output.
Build = Callable[[Any, Any], tuple[list[tuple[Any, np.ndarray]], Any]]


@dataclass(frozen=True)
class ConvCase:
    """One CONV_2D: input ``[n, ic, h, w]``, kernel ``[oc, ic, kh, kw]`` of ``weights`` type."""

    name: str
    n: int
    ic: int
    h: int
    w: int
    oc: int
    kh: int
    kw: int
    stride: tuple[int, int] = (1, 1)
    pad: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    weights: str = "f16"


# The convolutions of the UNets and VAEs of SD 1.x / 2.x, SDXL, SD3 and FLUX (3x3 with
# padding 1, 1x1 projections and skips, stride-2 downsampling, few-channel inputs and
# outputs), at small spatial sizes, and odd shapes that exercise every edge of the tiling.
CONV_CASES: tuple[ConvCase, ...] = (
    ConvCase("unet conv_in 4->320", 2, 4, 16, 16, 320, 3, 3, pad=(1, 1)),
    ConvCase("unet resnet 320->320", 2, 320, 12, 12, 320, 3, 3, pad=(1, 1)),
    ConvCase("unet downsample 320 stride 2", 2, 320, 12, 12, 320, 3, 3, stride=(2, 2), pad=(1, 1)),
    ConvCase("unet skip 320->640 1x1", 2, 320, 8, 8, 640, 1, 1),
    ConvCase("unet deep 1280 at 2x2 (channel split)", 2, 1280, 2, 2, 1280, 3, 3, pad=(1, 1)),
    ConvCase("unet conv_out 320->4", 2, 320, 8, 8, 4, 3, 3, pad=(1, 1)),
    ConvCase("sd vae post_quant 4->4 1x1", 1, 4, 8, 8, 4, 1, 1),
    ConvCase("sd vae conv_in 4->512", 1, 4, 8, 8, 512, 3, 3, pad=(1, 1)),
    ConvCase("vae 16-channel latent 16->512 (sd3, flux)", 1, 16, 8, 8, 512, 3, 3, pad=(1, 1)),
    ConvCase("vae skip 512->256 1x1", 1, 512, 10, 10, 256, 1, 1),
    ConvCase("vae conv_out 128->3", 1, 128, 20, 20, 3, 3, 3, pad=(1, 1)),
    ConvCase("f32 weights", 2, 24, 9, 11, 40, 3, 3, pad=(1, 1), weights="f32"),
    ConvCase("bf16 weights, 32 channels", 2, 32, 9, 11, 40, 3, 3, pad=(1, 1), weights="bf16"),
    ConvCase("odd: 7x5, 3->13, 5x3 kernel, pad 2/1", 3, 3, 5, 7, 13, 5, 3, pad=(1, 2)),
    ConvCase("odd: stride 2x3, dilation 2, no pad", 2, 17, 13, 19, 29, 3, 3, stride=(2, 3), dilation=(2, 2)),
    ConvCase("odd: one pixel out, many channels", 1, 300, 3, 3, 70, 3, 3),
    ConvCase("odd: wide row crossing tiles", 1, 8, 3, 97, 16, 3, 3, pad=(1, 1)),
)


@dataclass(frozen=True)
class MatCase:
    """One MUL_MAT: ``a`` ``[batch_a, m, k]`` of ``weights`` type times ``b`` ``[batch, n, k]``
    (f32) into ``[batch, n, m]``; ``a``'s batch broadcasts over ``b``'s."""

    name: str
    m: int
    n: int
    k: int
    batch: int = 1
    batch_a: int = 1
    weights: str = "f16"


# The matrix products of the UNets' and DiTs' linear layers (f16 weights, tokens x
# channels), attention's two products (f32 on both sides, one slice a head: scores with
# k the head size 40, 64, 80, 128; values with k the tokens), text encoders, and odd
# shapes for every edge of the tiling.
MAT_CASES: tuple[MatCase, ...] = (
    MatCase("linear 320->320, 2x64 tokens", 320, 128, 320),
    MatCase("geglu 320->2560", 2560, 96, 320),
    MatCase("ff out 1280->320", 320, 64, 1280),
    MatCase("deep linear 1280->1280, 2x16 tokens", 1280, 32, 1280),
    MatCase("text encoder 768->3072, 77 tokens", 3072, 77, 768),
    MatCase("time embedding, one row", 1280, 1, 320),
    MatCase("f32 weights", 200, 50, 96, weights="f32"),
    MatCase("bf16 weights", 200, 50, 96, weights="bf16"),
    MatCase("attention scores, head 40", 256, 256, 40, batch=4, batch_a=4, weights="f32"),
    MatCase("attention scores, head 64", 144, 144, 64, batch=2, batch_a=2, weights="f32"),
    MatCase("attention scores, head 80", 100, 100, 80, batch=2, batch_a=2, weights="f32"),
    MatCase("attention scores, head 128", 64, 64, 128, batch=2, batch_a=2, weights="f32"),
    MatCase("attention values, head 40", 40, 256, 256, batch=4, batch_a=4, weights="f32"),
    MatCase("broadcast weights over a batch", 96, 33, 72, batch=3),
    MatCase("odd: 37 x 29 x 300", 37, 29, 300),
    MatCase("odd: k of 3", 50, 70, 3),
)


@dataclass(frozen=True)
class AttnCase:
    """One FLASH_ATTN_EXT: ``heads`` heads of ``lq`` queries against ``lk`` keys of width
    ``d`` (``kv_heads`` of them, shared as grouped-query attention shares them), K and V
    of ``kv`` type; ``pad`` keys more, masked out with -inf as the engine pads keys to a
    multiple of 256."""

    name: str
    d: int
    lq: int
    lk: int
    heads: int
    batch: int = 1
    kv_heads: int = 0  # 0: as many as heads
    pad: int = 0
    kv: str = "f16"


# The attentions of SD 1.x (heads of 40), SD 2.x / SDXL (64), SD 1.x's deeper levels (80),
# SD3 / FLUX (128); cross-attention against 77 text tokens, padded to 256 keys as the
# engine pads them; and odd shapes for every edge of the query blocks.
ATTN_CASES: tuple[AttnCase, ...] = (
    AttnCase("self-attention, head 40", 40, 256, 256, 8, batch=2),
    AttnCase("self-attention, head 64", 64, 144, 144, 4),
    AttnCase("self-attention, head 80", 80, 100, 100, 4),
    AttnCase("self-attention, head 128", 128, 96, 96, 2),
    AttnCase("cross-attention, 77 tokens padded to 256", 40, 64, 77, 8, pad=179),
    AttnCase("f32 keys and values", 40, 50, 60, 2, kv="f32"),
    AttnCase("grouped heads: 4 over 2", 64, 40, 48, 4, kv_heads=2),
    AttnCase("odd: 37 queries, 50 keys, head 24", 24, 37, 50, 3),
)


@dataclass(frozen=True)
class FoldCase:
    """A chain ``csrc/fusion.h`` folds, and how many nodes it folds (``folded``): a
    convolution ``conv`` with its bias, then a skip of the output's shape when ``skip``; or,
    without ``conv``, a group norm of ``shape`` ``[n, c, h, w]`` in ``groups`` groups, then
    gamma and beta when ``affine``, then silu when ``silu``."""

    name: str
    folded: int
    conv: ConvCase | None = None
    skip: bool = False
    shape: tuple[int, int, int, int] = (1, 64, 8, 8)
    groups: int = 32
    affine: bool = True
    silu: bool = True


# A ResNet block's two convolutions (with its bias; with the bias and the skip), on the
# tile's direct path and across images, and its norms: with and without the affine part
# and the silu, a batch of two, and channels that do not split evenly into the groups.
FOLD_CASES: tuple[FoldCase, ...] = (
    FoldCase("conv + bias", 1, ConvCase("", 1, 64, 12, 12, 96, 3, 3, pad=(1, 1))),
    FoldCase("conv + bias + skip", 2, ConvCase("", 1, 64, 12, 12, 64, 3, 3, pad=(1, 1)), skip=True),
    FoldCase("conv + bias + skip, tiles across images", 2, ConvCase("", 3, 16, 5, 7, 40, 3, 3, pad=(1, 1)), skip=True),
    FoldCase("conv + bias, many k blocks", 1, ConvCase("", 1, 600, 6, 6, 24, 3, 3, pad=(1, 1))),
    FoldCase("group norm + affine + silu", 3, shape=(1, 128, 16, 16)),
    FoldCase("group norm + affine + silu, batch 2", 3, shape=(2, 64, 9, 7)),
    FoldCase("group norm + silu", 1, shape=(1, 64, 8, 8), affine=False),
    FoldCase("group norm + affine", 2, shape=(1, 64, 8, 8), silu=False),
    FoldCase("group norm, 20 channels in 6 groups", 3, shape=(1, 20, 5, 3), groups=6),
)
GROUP_NORM_EPS = 1e-6  # the engine's


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """``x`` rounded to bf16 (to nearest, ties to even), as bf16's 16 bits."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_round(x: np.ndarray) -> np.ndarray:
    """``x`` rounded to bf16, as float32 (exactly the bf16 values)."""
    return (bf16_bits(x).astype(np.uint32) << 16).view(np.float32)


def _weights(values: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Random weights as the tensor's data of type ``kind``, and their exact values."""
    if kind == "bf16":
        return bf16_bits(values), bf16_round(values)
    data = values.astype(np.float16 if kind == "f16" else np.float32)
    return data, data.astype(np.float32)


def _reference(x: np.ndarray, k: np.ndarray, case: ConvCase) -> np.ndarray:
    """The convolution in float64: ``x`` ``[n, ic, h, w]``, ``k`` ``[oc, ic, kh, kw]``."""
    (sy, sx), (py, px), (dy, dx) = case.stride[::-1], case.pad[::-1], case.dilation[::-1]
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (py, py), (px, px)))
    oh = (case.h + 2 * py - dy * (case.kh - 1) - 1) // sy + 1
    ow = (case.w + 2 * px - dx * (case.kw - 1) - 1) // sx + 1
    out = np.zeros((case.n, case.oc, oh, ow))
    weights = k.astype(np.float64)
    for ky in range(case.kh):
        for kx in range(case.kw):
            patch = padded[:, :, ky * dy : ky * dy + sy * (oh - 1) + 1 : sy, kx * dx : kx * dx + sx * (ow - 1) + 1 : sx]
            out += np.einsum("nchw,oc->nohw", patch, weights[:, :, ky, kx])
    return out


class Module:
    """One CPU module loaded through ggml's library, with a CPU backend on it."""

    def __init__(self, path: Path, threads: int) -> None:
        import cffi

        self.ffi = cffi.FFI()
        self.ffi.cdef(_cdefs.GGML_DEVICES + _cdefs.GGML_REGISTRY + _cdefs.GGML_GRAPH)
        self.lib: Any = self.ffi.dlopen(str(path.parent / _GGML))
        reg = self.lib.ggml_backend_load(str(path).encode())
        if reg == self.ffi.NULL:
            raise RuntimeError(f"ggml refused {path.name} on this CPU")
        self.backend = self.lib.ggml_backend_dev_init(self.lib.ggml_backend_reg_dev_get(reg, 0), self.ffi.NULL)
        set_threads = self.lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_set_n_threads")
        self.ffi.cast("ggml_backend_set_n_threads_t", set_threads)(self.backend, threads)
        # The same module again by path: the loader hands back the instance ggml opened.
        kernels_ffi = cffi.FFI()
        kernels_ffi.cdef(_cdefs.SFUMATO_KERNELS)
        self.kernels: Any = kernels_ffi.dlopen(str(path))
        self.kernels_ffi = kernels_ffi

    def carried(self) -> str:
        return bytes(self.kernels_ffi.string(self.kernels.sfumato_kernels())).decode()

    def run(
        self, build: Build, sfumato: bool, bf16: bool = False, folds: bool = True, weights: bool = False
    ) -> np.ndarray:
        """The output of the graph ``build(ctx)`` makes (its inputs set from their arrays),
        run with sfumato's kernels (in their bf16 mode when ``bf16``; without folds unless
        ``folds``) or ggml's own, in a buffer marked as the model's weights when ``weights``
        (which the bf16 mode keeps). How many nodes the run folded: :attr:`folded`."""
        ffi, lib = self.ffi, self.lib
        params = ffi.new("struct ggml_init_params *")
        params.mem_size = lib.ggml_tensor_overhead() * 16 + lib.ggml_graph_overhead()
        params.no_alloc = True
        ctx = lib.ggml_init(params[0])
        try:
            inputs, out = build(lib, ctx)
            graph = lib.ggml_new_graph(ctx)
            lib.ggml_build_forward_expand(graph, out)
            buffer = lib.ggml_backend_alloc_ctx_tensors(ctx, self.backend)
            if weights:
                lib.ggml_backend_buffer_set_usage(buffer, _USAGE_WEIGHTS)
            try:
                for tensor, array in inputs:
                    lib.ggml_backend_tensor_set(tensor, ffi.from_buffer(array), 0, array.nbytes)
                self.kernels.sfumato_kernels_set_enabled(1 if sfumato else 0)
                self.kernels.sfumato_bf16_set_enabled(1 if bf16 else 0)
                self.kernels.sfumato_folds_set_enabled(1 if folds else 0)
                if lib.ggml_backend_graph_compute(self.backend, graph) != 0:
                    raise RuntimeError("ggml_backend_graph_compute failed")
                self.folded = int(self.kernels.sfumato_folds_last())
                result = np.empty(lib.ggml_nbytes(out) // 4, dtype=np.float32)
                lib.ggml_backend_tensor_get(out, ffi.from_buffer(result), 0, result.nbytes)
                return result
            finally:
                lib.ggml_backend_buffer_free(buffer)
        finally:
            lib.ggml_free(ctx)


def _error(got: np.ndarray, reference: np.ndarray) -> float:
    """The largest error of ``got`` against ``reference``, relative to its largest magnitude."""
    reference = reference.ravel()
    assert got.shape == reference.shape, (got.shape, reference.shape)
    return float(np.abs(got - reference).max()) / float(np.abs(reference).max())


def _errors(
    module: Module,
    build: Build,
    compute: Callable[[bool], np.ndarray],
    bf16: bool,
    ggml: bool = True,
    kept: bool = False,
) -> dict[str, float]:
    """Exact mode: both kernels' errors against ``compute(False)``, the operation in float64
    (sfumato's alone where ggml has no kernel: ``ggml`` false). bf16 mode: sfumato's
    against ``compute(True)``, float64 over bf16-rounded operands, and against
    ``compute(False)``; with ``kept``, also its error with the inputs in a buffer marked as
    weights (the bf16 mode's kept weights, csrc/kept_weights.h)."""
    exact = compute(False)
    if bf16:
        got = module.run(build, sfumato=True, bf16=True)
        errors = {"bf16_error": _error(got, compute(True)), "bf16_vs_exact": _error(got, exact)}
        if kept:
            errors["kept_error"] = _error(module.run(build, sfumato=True, bf16=True, weights=True), compute(True))
        return errors
    sides = ("sfumato", "ggml") if ggml else ("sfumato",)
    return {f"{side}_error": _error(module.run(build, sfumato=side == "sfumato"), exact) for side in sides}


def _operand(x: np.ndarray, rounded: bool) -> np.ndarray:
    return (bf16_round(x) if rounded else x).astype(np.float64)


def conv_inputs(case: ConvCase, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A case's random input ``[n, ic, h, w]``, its kernel as the tensor's data, and the
    kernel's exact values (f32)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((case.n, case.ic, case.h, case.w)).astype(np.float32)
    k, k_values = _weights(
        rng.standard_normal((case.oc, case.ic, case.kh, case.kw)) / np.sqrt(case.ic * case.kh * case.kw), case.weights
    )
    return x, k, k_values


def mat_inputs(case: MatCase, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A case's weights as the tensor's data, their exact values, and its activations."""
    rng = np.random.default_rng(seed)
    a, a_values = _weights(rng.standard_normal((case.batch_a, case.m, case.k)) / np.sqrt(case.k), case.weights)
    b = rng.standard_normal((case.batch, case.n, case.k)).astype(np.float32)
    return a, a_values, b


def check_conv(module: Module, case: ConvCase, seed: int = 0, bf16: bool = False) -> dict[str, Any]:
    """``ggml_conv_2d_direct`` with both kernels (or sfumato's bf16 mode) against float64."""
    x, k, k_values = conv_inputs(case, seed)

    def build(lib: Any, ctx: Any) -> tuple[list[tuple[Any, np.ndarray]], Any]:
        kernel = lib.ggml_new_tensor_4d(ctx, _TYPES[case.weights], case.kw, case.kh, case.ic, case.oc)
        image = lib.ggml_new_tensor_4d(ctx, _F32, case.w, case.h, case.ic, case.n)
        out = lib.ggml_conv_2d_direct(ctx, kernel, image, *case.stride, *case.pad, *case.dilation)
        return [(kernel, k), (image, x)], out

    def compute(rounded: bool) -> np.ndarray:
        return _reference(_operand(x, rounded), _operand(k_values, rounded), case)

    # ggml's own CONV_2D takes f16 and f32 kernels only (it stops the process on others).
    return {"case": case.name, **_errors(module, build, compute, bf16, ggml=case.weights != "bf16", kept=True)}


def check_kept(module: Module, seed: int = 0) -> dict[str, Any]:
    """The bf16 mode's kept weights (csrc/kept_weights.h) in one context whose buffer is
    marked as the model's weights: a convolution run once (its weights kept), again (read
    from the kept copy), after new weights were set in place (the copy's guard sees them),
    and after another graph wrote into the weights (the write drops the copy). Each run's
    error against float64 over the operands rounded to bf16, with the weights it had
    then, and the bytes kept after each step."""
    case = ConvCase("kept", 2, 64, 10, 10, 96, 3, 3, pad=(1, 1))
    x, k, k_values = conv_inputs(case, seed)
    rng = np.random.default_rng(seed + 1)
    new_k = (rng.standard_normal(k.shape) / np.sqrt(k[0].size)).astype(np.float16)
    delta = (rng.standard_normal(k.shape) * 0.05).astype(np.float16)
    written = (new_k.astype(np.float32) + delta.astype(np.float32)).astype(np.float16)  # ggml adds f16 in f32
    ffi, lib, kernels = module.ffi, module.lib, module.kernels
    params = ffi.new("struct ggml_init_params *")
    params.mem_size = lib.ggml_tensor_overhead() * 16 + 2 * lib.ggml_graph_overhead()
    params.no_alloc = True
    ctx = lib.ggml_init(params[0])
    try:
        kernel = lib.ggml_new_tensor_4d(ctx, _F16, case.kw, case.kh, case.ic, case.oc)
        image = lib.ggml_new_tensor_4d(ctx, _F32, case.w, case.h, case.ic, case.n)
        change = lib.ggml_new_tensor_4d(ctx, _F16, case.kw, case.kh, case.ic, case.oc)
        out = lib.ggml_conv_2d_direct(ctx, kernel, image, *case.stride, *case.pad, *case.dilation)
        convolve, write = lib.ggml_new_graph(ctx), lib.ggml_new_graph(ctx)
        lib.ggml_build_forward_expand(convolve, out)
        lib.ggml_build_forward_expand(write, lib.ggml_add_inplace(ctx, kernel, change))
        buffer = lib.ggml_backend_alloc_ctx_tensors(ctx, module.backend)
        lib.ggml_backend_buffer_set_usage(buffer, _USAGE_WEIGHTS)
        try:
            for tensor, array in ((kernel, k), (image, x), (change, delta)):
                lib.ggml_backend_tensor_set(tensor, ffi.from_buffer(array), 0, array.nbytes)
            kernels.sfumato_kernels_set_enabled(1)
            kernels.sfumato_bf16_set_enabled(1)

            def convolved(weights: np.ndarray) -> dict[str, float]:
                if lib.ggml_backend_graph_compute(module.backend, convolve) != 0:
                    raise RuntimeError("ggml_backend_graph_compute failed")
                got = np.empty(lib.ggml_nbytes(out) // 4, dtype=np.float32)
                lib.ggml_backend_tensor_get(out, ffi.from_buffer(got), 0, got.nbytes)
                reference = _reference(_operand(x, True), _operand(weights.astype(np.float32), True), case)
                return {"error": _error(got, reference), "kept_bytes": int(kernels.sfumato_kept_bytes())}

            steps = {"made": convolved(k_values), "kept": convolved(k_values)}
            lib.ggml_backend_tensor_set(kernel, ffi.from_buffer(new_k), 0, new_k.nbytes)
            steps["new_weights"] = convolved(new_k)
            if lib.ggml_backend_graph_compute(module.backend, write) != 0:
                raise RuntimeError("ggml_backend_graph_compute failed")
            steps["after_write"] = {"kept_bytes": int(kernels.sfumato_kept_bytes())}
            steps["written"] = convolved(written)
            return {"case": "kept weights", "steps": steps}
        finally:
            lib.ggml_backend_buffer_free(buffer)
    finally:
        lib.ggml_free(ctx)


def check_mul_mat(module: Module, case: MatCase, seed: int = 0, bf16: bool = False) -> dict[str, Any]:
    """``ggml_mul_mat`` with both kernels (or sfumato's bf16 mode) against float64."""
    a, a_values, b = mat_inputs(case, seed)

    def build(lib: Any, ctx: Any) -> tuple[list[tuple[Any, np.ndarray]], Any]:
        ta = lib.ggml_new_tensor_4d(ctx, _TYPES[case.weights], case.k, case.m, case.batch_a, 1)
        tb = lib.ggml_new_tensor_4d(ctx, _F32, case.k, case.n, case.batch, 1)
        return [(ta, a), (tb, b)], lib.ggml_mul_mat(ctx, ta, tb)

    def compute(rounded: bool) -> np.ndarray:
        weights = np.repeat(_operand(a_values, rounded), case.batch // case.batch_a, axis=0)
        return np.asarray(np.einsum("bmk,bnk->bnm", weights, _operand(b, rounded)), dtype=np.float64)

    return {"case": case.name, **_errors(module, build, compute, bf16)}


def check_attention(module: Module, case: AttnCase, seed: int = 0, bf16: bool = False) -> dict[str, Any]:
    """``ggml_flash_attn_ext`` with both kernels (or sfumato's bf16 mode) against float64:
    softmax(scale q k^T + mask) v. The bf16 mode rounds the scaled queries, the keys, the
    values and the softmax's numerators (before they are summed) to bf16."""
    rng = np.random.default_rng(seed)
    kv_heads = case.kv_heads or case.heads
    keys = case.lk + case.pad
    q = rng.standard_normal((case.batch, case.heads, case.lq, case.d)).astype(np.float32)
    k, k_values = _weights(rng.standard_normal((case.batch, kv_heads, keys, case.d)), case.kv)
    v, v_values = _weights(rng.standard_normal((case.batch, kv_heads, keys, case.d)), case.kv)
    mask = np.zeros((case.lq, keys), dtype=np.float16)
    mask[:, case.lk :] = -np.inf
    scale = 1.0 / np.sqrt(case.d)

    def build(lib: Any, ctx: Any) -> tuple[list[tuple[Any, np.ndarray]], Any]:
        tq = lib.ggml_new_tensor_4d(ctx, _F32, case.d, case.lq, case.heads, case.batch)
        tk = lib.ggml_new_tensor_4d(ctx, _TYPES[case.kv], case.d, keys, kv_heads, case.batch)
        tv = lib.ggml_new_tensor_4d(ctx, _TYPES[case.kv], case.d, keys, kv_heads, case.batch)
        inputs = [(tq, q), (tk, k), (tv, v)]
        tm = module.ffi.NULL
        if case.pad:
            tm = lib.ggml_new_tensor_4d(ctx, _F16, keys, case.lq, 1, 1)
            inputs.append((tm, mask))
        out = lib.ggml_flash_attn_ext(ctx, tq, tk, tv, tm, scale, 0.0, 0.0)
        lib.ggml_flash_attn_ext_set_prec(out, _PREC_F32)
        return inputs, out

    def compute(rounded: bool) -> np.ndarray:
        group = case.heads // kv_heads
        keys64 = np.repeat(_operand(k_values, rounded), group, axis=1)
        values64 = np.repeat(_operand(v_values, rounded), group, axis=1)
        queries = _operand(q * np.float32(scale), rounded)  # the kernel scales in f32, then rounds
        scores = np.einsum("bhqd,bhkd->bhqk", queries, keys64) + mask.astype(np.float64)
        weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
        if rounded:
            weights = bf16_round(weights.astype(np.float32)).astype(np.float64)
        weights /= weights.sum(axis=-1, keepdims=True)
        out = np.asarray(np.einsum("bhqk,bhkd->bhqd", weights, values64), dtype=np.float64)
        return out.transpose(0, 2, 1, 3)  # ggml's output: [batch, query, head, d]

    return {"case": case.name, **_errors(module, build, compute, bf16)}


def _group_norm(x: np.ndarray, groups: int) -> np.ndarray:
    """ggml's group norm in float64: groups of ceil(c / groups) channels, the last ones
    shorter or empty; no affine part."""
    out = np.empty(x.shape)
    per = -(-x.shape[1] // groups)
    for c0 in range(0, x.shape[1], per):
        part = x[:, c0 : c0 + per].astype(np.float64)
        mean = part.mean(axis=(1, 2, 3), keepdims=True)
        variance = ((part - mean) ** 2).mean(axis=(1, 2, 3), keepdims=True)
        out[:, c0 : c0 + per] = (part - mean) / np.sqrt(variance + GROUP_NORM_EPS)
    return out


def check_fold(module: Module, case: FoldCase, seed: int = 0) -> dict[str, Any]:
    """A fold case's chain with sfumato's kernels folded and not, and ggml's own, against float64."""
    rng = np.random.default_rng(seed)
    conv = case.conv
    if conv is not None:
        x, k, k_values = conv_inputs(conv, seed)
        reference = _reference(x, k_values, conv)
        channels = conv.oc
    else:
        x = (rng.standard_normal(case.shape) * 2 + 0.5).astype(np.float32)
        reference = _group_norm(x, case.groups)
        channels = case.shape[1]
    bias = rng.standard_normal(channels).astype(np.float32)
    gamma = rng.standard_normal(channels).astype(np.float32)
    skip = rng.standard_normal(reference.shape).astype(np.float32)

    def per_channel(lib: Any, ctx: Any) -> tuple[Any, Any]:
        """A vector of one value per channel, and its view [1, 1, channels, 1] as the engine reshapes it."""
        t = lib.ggml_new_tensor_4d(ctx, _F32, channels, 1, 1, 1)
        return t, lib.ggml_reshape_4d(ctx, t, 1, 1, channels, 1)

    def build(lib: Any, ctx: Any) -> tuple[list[tuple[Any, np.ndarray]], Any]:
        if conv is not None:
            kernel = lib.ggml_new_tensor_4d(ctx, _TYPES[conv.weights], conv.kw, conv.kh, conv.ic, conv.oc)
            image = lib.ggml_new_tensor_4d(ctx, _F32, conv.w, conv.h, conv.ic, conv.n)
            tb, b4 = per_channel(lib, ctx)
            out = lib.ggml_add_inplace(ctx, lib.ggml_conv_2d_direct(ctx, kernel, image, *conv.stride, *conv.pad,
                                                                    *conv.dilation), b4)  # fmt: skip
            inputs = [(kernel, k), (image, x), (tb, bias)]
            if case.skip:
                ts = lib.ggml_new_tensor_4d(ctx, _F32, *reversed(reference.shape))
                out = lib.ggml_add_inplace(ctx, out, ts)
                inputs.append((ts, skip))
            return inputs, out
        image = lib.ggml_new_tensor_4d(ctx, _F32, *reversed(case.shape))
        out = lib.ggml_group_norm(ctx, image, case.groups, GROUP_NORM_EPS)
        inputs = [(image, x)]
        if case.affine:
            tg, g4 = per_channel(lib, ctx)
            tb, b4 = per_channel(lib, ctx)
            out = lib.ggml_add_inplace(ctx, lib.ggml_mul_inplace(ctx, out, g4), b4)
            inputs += [(tg, gamma), (tb, bias)]
        if case.silu:
            out = lib.ggml_silu_inplace(ctx, out)
        return inputs, out

    expected = reference
    if conv is not None:
        expected = expected + bias[None, :, None, None] + (skip if case.skip else 0.0)
    else:
        if case.affine:
            expected = expected * gamma[None, :, None, None] + bias[None, :, None, None]
        if case.silu:
            expected = expected / (1.0 + np.exp(-expected))
    folded = module.run(build, sfumato=True)
    nodes = module.folded
    unfolded = module.run(build, sfumato=True, folds=False)
    return {
        "case": case.name, "folded": nodes, "unfolded_folded": module.folded,
        "identical": bool(np.array_equal(folded, unfolded)),
        "sfumato_error": _error(folded, expected), "unfolded_error": _error(unfolded, expected),
        "ggml_error": _error(module.run(build, sfumato=False), expected),
    }  # fmt: skip


def main(argv: list[str]) -> int:
    """``python -m tests.support.kernels MODULE THREADS [--bf16] [--no-amx] [CASE...]``: JSON
    lines on stdout (``--no-amx``: the bf16 mode on the AVX512-BF16 tile in a module with AMX's)."""
    module = Module(Path(argv[0]), int(argv[1]))
    bf16 = "--bf16" in argv[2:]
    if "--no-amx" in argv[2:]:
        module.kernels.sfumato_amx_set_enabled(0)
    wanted = set(argv[2:]) - {"--bf16", "--no-amx"}
    print(json.dumps({"kernels": module.carried(), "amx": int(module.kernels.sfumato_amx_ready())}), flush=True)
    for case in CONV_CASES:
        if not wanted or case.name in wanted:
            result = check_conv(module, case, bf16=bf16)
            print(json.dumps({**result, "op": "conv_2d", "shape": asdict(case)}), flush=True)
    for mat in MAT_CASES:
        if not wanted or mat.name in wanted:
            result = check_mul_mat(module, mat, bf16=bf16)
            print(json.dumps({**result, "op": "mul_mat", "shape": asdict(mat)}), flush=True)
    for attn in ATTN_CASES:
        if not wanted or attn.name in wanted:
            result = check_attention(module, attn, bf16=bf16)
            print(json.dumps({**result, "op": "flash_attn_ext", "shape": asdict(attn)}), flush=True)
    if bf16 and (not wanted or "kept weights" in wanted):
        print(json.dumps({**check_kept(module), "op": "kept"}), flush=True)
    for fold in FOLD_CASES if not bf16 else ():
        if not wanted or fold.name in wanted:
            result = check_fold(module, fold)
            print(json.dumps({**result, "op": "fold", "shape": asdict(fold)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The CPU variants' probe, one variant per process (:mod:`sfumato.engine.cpu_variants`
runs it): ``python -m sfumato.engine.cpu_probe MODULE THREADS`` loads one CPU module
through ggml's own library (no engine) and times, on ggml's graph API, a slice of an SD
sampling step at the latents of a 256 and a 512 image (32x32 and 64x64): the work that
dominates a step there, each as the engine will run it:

- an attention of 8 heads of 40 over the latent's tokens: flash attention with f16 keys
  and values where sfumato's kernel takes it, else a matrix product, softmax and product;
- a 3x3 convolution of 320 channels (direct, where sfumato's kernel takes it);
- a linear layer of f16 weights (320 to 1280) over the tokens.

It prints the fastest of a few runs of each slice, per size, as JSON.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from sfumato.engine import _cdefs
from sfumato.engine.kernels import CONV_2D, FLASH_ATTN_EXT, kernels_choice, module_kernels

# Repeats of each timed graph stop after this long, or after _REPEATS runs.
_REPEAT_BUDGET_S = 1.0
_REPEATS = 5
_GGML_LIBRARY = {"linux": "libggml.so", "darwin": "libggml.dylib", "win32": "ggml.dll"}
_F32, _F16 = 0, 1
_PREC_F32 = 10  # enum ggml_prec
# The latent sides of a 256 and a 512 image, by image size.
SIZES = {256: 32, 512: 64}


def _time_graph(ffi: Any, lib: Any, backend: Any, build: Any) -> float:
    """The fastest run of the graph ``build(ctx)`` makes, its inputs random."""
    import numpy as np

    params = ffi.new("struct ggml_init_params *")
    params.mem_size = lib.ggml_tensor_overhead() * 32 + lib.ggml_graph_overhead()
    params.no_alloc = True
    ctx = lib.ggml_init(params[0])
    try:
        inputs, output = build(ctx)
        graph = lib.ggml_new_graph(ctx)
        lib.ggml_build_forward_expand(graph, output)
        buffer = lib.ggml_backend_alloc_ctx_tensors(ctx, backend)
        try:
            rng = np.random.default_rng(0)
            for tensor, dtype in inputs:
                size = int(lib.ggml_nbytes(tensor))
                data = rng.standard_normal(size // np.dtype(dtype).itemsize).astype(dtype)
                lib.ggml_backend_tensor_set(tensor, ffi.from_buffer(data), 0, size)
            lib.ggml_backend_graph_compute(backend, graph)  # warm-up: threads, caches
            best, started = math.inf, time.perf_counter()
            for _ in range(_REPEATS):
                begin = time.perf_counter()
                if lib.ggml_backend_graph_compute(backend, graph) != 0:
                    raise RuntimeError("ggml_backend_graph_compute failed")
                best = min(best, time.perf_counter() - begin)
                if time.perf_counter() - started > _REPEAT_BUDGET_S:
                    break
            return best
        finally:
            lib.ggml_backend_buffer_free(buffer)
    finally:
        lib.ggml_free(ctx)


def _run_probe(module: Path, threads: int) -> dict[str, Any]:
    import cffi
    import numpy as np

    ffi = cffi.FFI()
    ffi.cdef(_cdefs.GGML_DEVICES + _cdefs.GGML_REGISTRY + _cdefs.GGML_GRAPH)
    lib = ffi.dlopen(str(module.parent / _GGML_LIBRARY.get(sys.platform, _GGML_LIBRARY["linux"])))
    reg = lib.ggml_backend_load(str(module).encode())
    if reg == ffi.NULL:
        return {"error": "ggml refused it on this CPU (instruction sets it lacks)"}
    backend = lib.ggml_backend_dev_init(lib.ggml_backend_reg_dev_get(reg, 0), ffi.NULL)
    set_threads = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_set_n_threads")
    if set_threads != ffi.NULL:
        ffi.cast("ggml_backend_set_n_threads_t", set_threads)(backend, threads)
    head, heads, channels = 40, 8, 320
    # The operations as the engine will run them: sfumato's kernels where they take them.
    ours = module_kernels(module) if kernels_choice() == "sfumato" else {}
    conv_2d = lib.ggml_conv_2d_direct if CONV_2D in ours else lib.ggml_conv_2d

    def attention(side: int) -> Any:
        tokens = side * side

        def build(ctx: Any) -> tuple[list[tuple[Any, Any]], Any]:
            q = lib.ggml_new_tensor_4d(ctx, _F32, head, tokens, heads, 1)
            if FLASH_ATTN_EXT in ours:
                k = lib.ggml_new_tensor_4d(ctx, _F16, head, tokens, heads, 1)
                v = lib.ggml_new_tensor_4d(ctx, _F16, head, tokens, heads, 1)
                out = lib.ggml_flash_attn_ext(ctx, q, k, v, ffi.NULL, 1 / math.sqrt(head), 0.0, 0.0)
                lib.ggml_flash_attn_ext_set_prec(out, _PREC_F32)
                return [(q, np.float32), (k, np.float16), (v, np.float16)], out
            k = lib.ggml_new_tensor_4d(ctx, _F32, head, tokens, heads, 1)
            v = lib.ggml_new_tensor_4d(ctx, _F32, tokens, head, heads, 1)  # transposed, as the engine feeds it
            weights = lib.ggml_soft_max_ext(ctx, lib.ggml_mul_mat(ctx, k, q), ffi.NULL, 1 / math.sqrt(head), 0.0)
            return [(q, np.float32), (k, np.float32), (v, np.float32)], lib.ggml_mul_mat(ctx, v, weights)

        return build

    def conv(side: int) -> Any:
        def build(ctx: Any) -> tuple[list[tuple[Any, Any]], Any]:
            kernel = lib.ggml_new_tensor_4d(ctx, _F16, 3, 3, channels, channels)
            latent = lib.ggml_new_tensor_4d(ctx, _F32, side, side, channels, 1)
            return [(kernel, np.float16), (latent, np.float32)], conv_2d(ctx, kernel, latent, 1, 1, 1, 1, 1, 1)

        return build

    def linear(side: int) -> Any:
        def build(ctx: Any) -> tuple[list[tuple[Any, Any]], Any]:
            weights = lib.ggml_new_tensor_4d(ctx, _F16, channels, 4 * channels, 1, 1)
            tokens = lib.ggml_new_tensor_4d(ctx, _F32, channels, side * side, 1, 1)
            return [(weights, np.float16), (tokens, np.float32)], lib.ggml_mul_mat(ctx, weights, tokens)

        return build

    try:
        timed = {
            str(size): {
                "attention_s": _time_graph(ffi, lib, backend, attention(side)),
                "conv_s": _time_graph(ffi, lib, backend, conv(side)),
                "linear_s": _time_graph(ffi, lib, backend, linear(side)),
            }
            for size, side in SIZES.items()
        }
        return {"sizes": timed, "threads": threads}
    finally:
        lib.ggml_backend_free(backend)


def main(argv: list[str]) -> int:
    """``python -m sfumato.engine.cpu_probe MODULE THREADS``: one probe, its JSON on stdout."""
    if len(argv) != 2:
        print("usage: python -m sfumato.engine.cpu_probe MODULE THREADS", file=sys.stderr)
        return 2
    print(json.dumps(_run_probe(Path(argv[0]), int(argv[1]))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

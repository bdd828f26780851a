"""The CPU variants' probe, one variant per process (:mod:`sfumato.engine.cpu_variants`
runs it): ``python -m sfumato.engine.cpu_probe MODULE THREADS`` loads one CPU module
through ggml's own library (no engine), times an attention with heads of 40 over a
32x32 latent's tokens and a 3x3 convolution of 320 channels over a 64x64 latent (direct,
through sfumato's kernel, where the engine will run it so) on ggml's graph API, and
prints the fastest of a few runs of each as JSON.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from sfumato.engine import _cdefs
from sfumato.engine.kernels import CONV_2D, kernels_choice, module_kernels

# Repeats of each timed graph stop after this long, or after _REPEATS runs.
_REPEAT_BUDGET_S = 1.0
_REPEATS = 5
_GGML_LIBRARY = {"linux": "libggml.so", "darwin": "libggml.dylib", "win32": "ggml.dll"}
_F32, _F16 = 0, 1


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
    tokens, head, heads = 32 * 32, 40, 8

    def attention(ctx: Any) -> tuple[list[tuple[Any, Any]], Any]:
        q = lib.ggml_new_tensor_4d(ctx, _F32, head, tokens, heads, 1)
        k = lib.ggml_new_tensor_4d(ctx, _F32, head, tokens, heads, 1)
        v = lib.ggml_new_tensor_4d(ctx, _F32, tokens, head, heads, 1)  # transposed, as the engine feeds it
        weights = lib.ggml_soft_max_ext(ctx, lib.ggml_mul_mat(ctx, k, q), ffi.NULL, 1 / math.sqrt(head), 0.0)
        return [(q, np.float32), (k, np.float32), (v, np.float32)], lib.ggml_mul_mat(ctx, v, weights)

    # The convolution as the engine will run it: direct when sfumato's kernel takes it.
    direct = kernels_choice() == "sfumato" and CONV_2D in module_kernels(module)
    conv_2d = lib.ggml_conv_2d_direct if direct else lib.ggml_conv_2d

    def conv(ctx: Any) -> tuple[list[tuple[Any, Any]], Any]:
        kernel = lib.ggml_new_tensor_4d(ctx, _F16, 3, 3, 320, 320)
        latent = lib.ggml_new_tensor_4d(ctx, _F32, 64, 64, 320, 1)
        return [(kernel, np.float16), (latent, np.float32)], conv_2d(ctx, kernel, latent, 1, 1, 1, 1, 1, 1)

    try:
        return {
            "attention_s": _time_graph(ffi, lib, backend, attention),
            "conv_s": _time_graph(ffi, lib, backend, conv),
            "threads": threads,
        }
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

"""sfumato's kernels against PyTorch's (oneDNN's convolutions, its matmul, its fused
attention) one operation at a time: the operations that carry an SD 1.x step and VAE
decode at 512, each implementation and precision in its own process, compute alone
(no graph set-up, no copies), 2 threads, the best of 3 runs.

This is the measured comparison with oneDNN the kernels issue asks for: PyTorch's CPU
convolutions are oneDNN's, in fp32 and bf16, so the table says where a graft of oneDNN
would pay and where sfumato's own kernels are the faster.
"""

from __future__ import annotations

from pytest_benchmark.fixture import BenchmarkFixture

from sfumato.engine.cpu_variants import BF16_FLAGS, cpu_identity, runs_here, variant_modules
from sfumato.engine.kernels import carries_bf16
from sfumato.engine.library import load_engine

from . import engines
from .conftest import Probe, fmt, write_result
from .probe import OPS, op_flops


def test_sfumato_kernels_against_pytorch_per_operation(benchmark: BenchmarkFixture, probe: Probe) -> None:
    modules = variant_modules({m.name: m.path for m in load_engine().modules})
    runnable = {name: path for name, path in modules.items() if runs_here(path)}
    bf16 = bool(set(BF16_FLAGS) & set(cpu_identity()[1].split()))
    # The last carrier in the build's order has the most: AMX's tiles where this CPU runs them.
    carrier = next((path for path in reversed(runnable.values()) if carries_bf16(path)), None)
    exact_module = runnable.get("zen4", next(iter(runnable.values())))
    runs = {
        "sfumato exact": {"kind": "ops_sfumato", "module": str(exact_module)},
        "PyTorch fp32": {"kind": "ops_torch"},
    }
    if bf16 and carrier is not None:
        runs["sfumato bf16"] = {"kind": "ops_sfumato", "module": str(carrier), "bf16": True}
        runs["PyTorch bf16"] = {"kind": "ops_torch", "bf16": True}
    seconds: dict[str, dict[str, float]] = {}

    def measure_all() -> None:
        for name, config in runs.items():
            seconds[name] = probe(threads=2, **config)["seconds"]  # type: ignore[assignment]

    benchmark.pedantic(measure_all, rounds=1, iterations=1)
    rows: list[dict[str, object]] = []
    for op, (kind, shape) in OPS.items():
        flops = op_flops(kind, shape)
        row: dict[str, object] = {"operation": op}
        for name in runs:
            row[f"{name} GFLOP/s"] = fmt(flops / seconds[name][op] / 1e9, 1)
        row["exact: sfumato / PyTorch"] = fmt(seconds["PyTorch fp32"][op] / seconds["sfumato exact"][op])
        if "sfumato bf16" in runs:
            row["bf16: sfumato / PyTorch"] = fmt(seconds["PyTorch bf16"][op] / seconds["sfumato bf16"][op])
        rows.append(row)
    benchmark.extra_info["seconds"] = seconds
    write_result(
        "cpu_ops",
        rows,
        f"sfumato's kernels against PyTorch's, one operation at a time, on {engines.cpu_description()}, ISA flags: "
        f"{engines.isa_flags()}; 2 threads, compute alone, best of 3, each implementation in its own process. "
        f"sfumato exact on {exact_module.name} (f16 weights), bf16 on the module with the bf16 kernels (bf16 weights); "
        "attention: sfumato's FLASH_ATTN_EXT (f16 keys and values, as the engine's graph casts them) against "
        "PyTorch's scaled_dot_product_attention. Above 1 in the ratio columns: sfumato is faster.",
    )
    assert len(rows) == len(OPS)

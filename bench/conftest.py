"""Benchmark fixtures: the same self-made models as the tests (random weights
in the real layouts), from the same cache folder, and :func:`probe`, which
measures one configuration in a fresh process.

Every case writes ``bench/results/<case>.json`` and ``.md`` (and a PNG where a
plot says more); at the end of the session ``bench/results/README.md`` gathers
the tables in one page.

``SFUMATO_BENCH_QUICK=1`` shrinks sizes and steps to check that the suite runs
(its figures mean nothing).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.support import models
from tests.support.reference import cached_reference_folder

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
QUICK = os.environ.get("SFUMATO_BENCH_QUICK") == "1"
SIZES = (64, 128) if QUICK else (256, 512)
"""The two image sides every per-step comparison is made at."""

CASE_ORDER = (
    "engine_build",
    "engine_profile",
    "kernels_profile",
    "binding_overhead",
    "engine_options",
    "diffusers",
    "upscale",
    "scaling",
    "taesd",
    "previews",
    "queue",
    "followers",
    "devices",
    "cpu_variants",
    "cpu_kernels",
    "bf16_error",
    "cpu_ops",
    "cancel",
    "families",
)


def _model_dir() -> Path:
    return models.models_dir(ROOT / ".test-models")


@pytest.fixture(scope="session")
def sd1_gguf() -> Path:
    """A full-size SD 1.x model (859M-parameter UNet) as one GGUF file, f16."""
    return models.cached(_model_dir(), "sd1.gguf", lambda p: models.write_sd_checkpoint(p, "sd1"))


@pytest.fixture(scope="session")
def sd1_tiny_gguf() -> Path:
    """BK-SDM-Tiny's SD 1.x layout (a third of the UNet) as one GGUF file, f16."""
    return models.cached(_model_dir(), "sd1-tiny.gguf", lambda p: models.write_sd_checkpoint(p, "sd1-tiny"))


@pytest.fixture(scope="session")
def sd1_fp32_folder() -> Path:
    """The same SD 1.x layout as an fp32 diffusers folder: the engine and
    diffusers both load it, so every comparison runs on identical weights."""
    return cached_reference_folder(_model_dir())


@pytest.fixture(scope="session")
def taesd() -> Path:
    """TAESD, the tiny autoencoder of SD 1.x latents, in its released layout."""
    return models.cached(_model_dir(), "taesd.safetensors", models.write_taesd)


@pytest.fixture(scope="session")
def esrgan_x4() -> Path:
    """The RealESRGAN_x4plus layout (23 RRDB blocks), random weights."""
    return models.cached(_model_dir(), "esrgan-23b.pth", lambda p: models.write_esrgan(p, num_block=23))


Probe = Callable[..., dict[str, float]]


@pytest.fixture(scope="session")
def probe() -> Iterator[Probe]:
    """``probe(kind=..., **config)``: the figures of one configuration, measured
    once per session in its own process (``bench/probe.py``)."""
    seen: dict[str, dict[str, float]] = {}

    def run(**config: Any) -> dict[str, float]:
        key = json.dumps(config, sort_keys=True, default=str)
        if key not in seen:
            done = subprocess.run(
                [sys.executable, "-m", "bench.probe", key], cwd=ROOT, capture_output=True, text=True, check=False
            )
            lines = [line for line in done.stdout.splitlines() if line.startswith("PROBE ")]
            if done.returncode != 0 or not lines:
                raise RuntimeError(f"probe {key} failed ({done.returncode}):\n{done.stderr[-3000:]}")
            seen[key] = json.loads(lines[-1].removeprefix("PROBE "))
            print(f"\n{key} -> {seen[key]}", flush=True)
        return seen[key]

    yield run


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """No per-test time limit here: a case measures many configurations for many minutes."""
    for item in items:
        item.add_marker(pytest.mark.timeout(0))


def write_result(name: str, table: list[dict[str, object]], note: str) -> None:
    """Write one case's figures to ``bench/results/<name>.json`` and ``.md``."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"note": note, "rows": table}, indent=2) + "\n")
    columns = list(table[0])
    lines = [f"| {' | '.join(columns)} |", f"|{'---|' * len(columns)}"]
    lines += [f"| {' | '.join(str(row[c]) for c in columns)} |" for row in table]
    (RESULTS / f"{name}.md").write_text("\n".join([note, "", *lines]) + "\n")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Gather every case's table into ``bench/results/README.md``."""
    parts = [
        "# Benchmark results",
        "",
        "Written by `python -m pytest bench` (see the README). Random SD 1.x weights in the real layout, "
        "2 CPU threads unless a row says otherwise; the machine is shared, so compare the figures of one run only.",
    ]
    found = False
    for name in CASE_ORDER:
        table = RESULTS / f"{name}.md"
        if table.exists():
            found = True
            parts += ["", f"## {name.replace('_', ' ')}", "", table.read_text().strip()]
            plot = RESULTS / f"{name}.png"
            if plot.exists():
                parts += ["", f"![{name}]({plot.name})"]
    if found:
        (RESULTS / "README.md").write_text("\n".join(parts) + "\n")


def fmt(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}"

"""Choosing the CPU backend module by measurement.

sfumato's engine build carries several of ggml's x86-64 CPU variants as modules
(``libggml-cpu-haswell.so``, ``libggml-cpu-skylakex.so``...). ggml ranks them by
the instruction sets a CPU has, and the variant with the most is not always the
fastest on SD's shapes: with AVX-512, ggml's f32 dot product steps 64 floats at a
time, and SD's attention heads of 40 fall to the scalar tail. So a process picks
its variant by measurement:

- ``SFUMATO_CPU_VARIANT`` (or a model's ``model_config.cpu_variant``, which sets
  it for the model's worker) names one, or ``auto``;
- else the choice remembered in sfumato's cache for this CPU (its model name and
  flags) and these modules (their sha256);
- else a short probe: each variant, in a process of its own with a time limit,
  times a slice of an SD step at the latents of a 256 and of a 512 image (an
  attention with heads of 40, a 3x3 convolution of 320 channels and a linear layer,
  each run as the engine runs it: through sfumato's kernels, unless
  ``SFUMATO_KERNELS=ggml``; :mod:`sfumato.engine.cpu_probe`) on ggml's own graph API.
  The variant chosen is the one least behind the fastest at its worse size (the
  fastest at both, where one is), and it is remembered. A variant this CPU cannot
  run (ggml's own check, the module's ``ggml_backend_score``) is left out. One
  process probes at a time (a file lock); the others wait for its answer.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sfumato.engine.kernels import ENV_KERNELS, ENV_PRECISION, carries_bf16, kernels_choice, precision_choice
from sfumato.errors import InvalidParameterError

logger = logging.getLogger(__name__)

ENV_CPU_VARIANT = "SFUMATO_CPU_VARIANT"
CACHE_FILE = "cpu-variants.json"
# The CPU flags (as /proc/cpuinfo names them) of which the bf16 mode needs one.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# How many of each probed part a step's slice counts: roughly an SD 1.x step's
# proportions at 512 (most of it convolutions, then linear layers, then attention).
STEP_WEIGHTS = {"attention_s": 1.0, "conv_s": 8.0, "linear_s": 4.0}
# Each variant's probe process gets this long (a start, a warm-up and the repeats).
PROBE_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class VariantTiming:
    """One variant's probe.

    Attributes
    ----------
    variant:
        The variant's name (``"haswell"``).
    sizes:
        Per image size probed (``"256"``, ``"512"``): the fastest of its timed runs of
        each part of a step's slice (``attention_s``, ``conv_s``, ``linear_s``), in
        seconds; empty when it did not run.
    error:
        Why it did not run (ggml refused it on this CPU, the time limit), else ``None``.
    """

    variant: str
    sizes: dict[str, dict[str, float]] = field(default_factory=dict)
    error: str | None = None

    def step_s(self, size: str) -> float:
        """The slice's time at ``size``, its parts weighted as a step weighs them
        (:data:`STEP_WEIGHTS`); infinite when the variant did not run there."""
        parts = self.sizes.get(size)
        return sum(STEP_WEIGHTS.get(name, 1.0) * s for name, s in parts.items()) if parts else math.inf


def fastest_at_every_size(timings: tuple[VariantTiming, ...]) -> VariantTiming | None:
    """The variant whose slowest size, against the fastest variant at that size, is the
    least behind: the fastest at every size when one is; ``None`` when none ran."""
    ran = [t for t in timings if t.error is None and t.sizes]
    if not ran:
        return None
    sizes = sorted({size for t in ran for size in t.sizes})
    best = {size: min(t.step_s(size) for t in ran) for size in sizes}
    return min(ran, key=lambda t: max(t.step_s(size) / best[size] for size in sizes))


@dataclass(frozen=True)
class CpuChoice:
    """The CPU variant a process runs, and why.

    Attributes
    ----------
    variant:
        The chosen variant's name.
    how:
        ``"probe"`` (measured now), ``"cached probe"`` (measured before on this CPU and
        build), ``"SFUMATO_CPU_VARIANT"`` (named), ``"only variant this CPU runs"``, or
        ``"no variant this CPU runs"`` (the floor, which then does not load).
    timings:
        The probe's timings, when there was one.
    """

    variant: str
    how: str
    timings: tuple[VariantTiming, ...] = ()


def variant_modules(modules: dict[str, Path]) -> dict[str, Path]:
    """The CPU variants among backend modules (named ``cpu-<variant>``), by variant name."""
    return {name[len("cpu-") :]: path for name, path in modules.items() if name.startswith("cpu-")}


def check_variant(value: object, variants: dict[str, Path], field: str) -> str | None:
    """``value`` as a variant name of ``variants``, ``None`` for ``auto``.

    Raises
    ------
    InvalidParameterError
        When it names no variant of this build.
    """
    if value == "auto" or value is None:
        return None
    if not isinstance(value, str) or value not in variants:
        what = "'auto' and this engine build's CPU variants" if variants else "'auto' (this build has one CPU module)"
        raise InvalidParameterError(field, f"must be one of {['auto', *variants]}: {what}; got {value!r}")
    return value


def runs_here(module: Path) -> bool:
    """Whether ggml's own check (the module's ``ggml_backend_score``) accepts this CPU.

    The module is opened with its symbols local, as ggml's loader opens it; a module
    without the check is taken to run.
    """
    import ctypes

    handle = ctypes.CDLL(str(module), mode=os.RTLD_LOCAL | os.RTLD_NOW)
    score = getattr(handle, "ggml_backend_score", None)
    return score is None or int(score()) > 0


def bf16_variants(variants: dict[str, Path], field: str) -> dict[str, Path]:
    """The variants among ``variants`` that this CPU runs and whose kernels have the
    bf16 mode.

    Raises
    ------
    InvalidParameterError
        Naming ``field``, when the CPU has neither AVX512-BF16 nor AMX-BF16, when
        ``SFUMATO_KERNELS=ggml`` turns sfumato's kernels off, or when no module of this
        build has the mode.
    """
    model, flags = cpu_identity()
    if not set(BF16_FLAGS) & set(flags.split()):
        raise InvalidParameterError(
            field, f"'bf16' needs a CPU with AVX512-BF16 or AMX-BF16, and this one ({model}) has neither; use 'exact'"
        )
    if kernels_choice() != "sfumato":
        raise InvalidParameterError(field, f"'bf16' runs sfumato's kernels, and {ENV_KERNELS}=ggml turns them off")
    found = {name: path for name, path in variants.items() if carries_bf16(path) and runs_here(path)}
    if not found:
        raise InvalidParameterError(field, "'bf16' needs a CPU module with sfumato's bf16 kernels; this build has none")
    return found


def choose_variant(modules: dict[str, Path], cache: Path) -> CpuChoice | None:
    """The CPU variant for this process among ``modules``; ``None`` when the build has
    no variants (a single CPU module).

    Raises
    ------
    InvalidParameterError
        When ``SFUMATO_CPU_VARIANT`` names no variant of this build, or one this CPU cannot run.
    """
    variants = variant_modules(modules)
    if not variants:
        return None
    named = check_variant(os.environ.get(ENV_CPU_VARIANT, "auto").strip() or "auto", variants, ENV_CPU_VARIANT)
    runnable = {name: path for name, path in variants.items() if runs_here(path)}
    if precision_choice() == "bf16":
        runnable = bf16_variants(runnable, ENV_PRECISION)
        if named is not None and named not in runnable:
            raise InvalidParameterError(
                ENV_CPU_VARIANT, f"{named!r} has no bf16 kernels; {ENV_PRECISION}=bf16 runs {sorted(runnable)}"
            )
    if named is not None:
        if named not in runnable:
            raise InvalidParameterError(
                ENV_CPU_VARIANT,
                f"{named!r} needs instruction sets this CPU lacks; it runs {sorted(runnable) or 'none of them'}",
            )
        return CpuChoice(named, ENV_CPU_VARIANT)
    if not runnable:  # the floor, which then fails to load naming the reason
        return CpuChoice(next(iter(variants)), "no variant this CPU runs")
    if len(runnable) == 1:
        return CpuChoice(next(iter(runnable)), "only variant this CPU runs")
    key = cache_key(runnable)
    with _locked(cache.with_suffix(".lock")):
        known = _read(cache)
        entry = known.get(key)
        if isinstance(entry, dict) and entry.get("variant") in runnable:
            with contextlib.suppress(KeyError, TypeError):  # else a damaged entry: probe again
                return CpuChoice(entry["variant"], "cached probe", tuple(VariantTiming(**t) for t in entry["timings"]))
        choice = probe(runnable)
        known[key] = {
            "variant": choice.variant,
            "cpu": cpu_identity()[0],
            "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "timings": [asdict(t) for t in choice.timings],
        }
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            partial = cache.with_suffix(f".{os.getpid()}.partial")
            partial.write_text(json.dumps(known, indent=1) + "\n")
            partial.replace(cache)
        except OSError as exc:  # a read-only cache: the choice holds for this process
            logger.warning("cannot remember the CPU variant in %s (%s): the next process probes again", cache, exc)
        return choice


def probe(variants: dict[str, Path]) -> CpuChoice:
    """Time each variant in a process of its own and choose the fastest.

    When none ran, the first (the build's floor, in ggml's order) is chosen.
    """
    timings = tuple(probe_variant(name, path) for name, path in variants.items())
    fastest = fastest_at_every_size(timings)
    return CpuChoice(fastest.variant if fastest is not None else next(iter(variants)), "probe", timings)


def probe_variant(name: str, module: Path, timeout_s: float = PROBE_TIMEOUT_S) -> VariantTiming:
    """Run one variant's probe in a process of its own (``python -m sfumato.engine.cpu_probe``)."""
    command = [sys.executable, "-m", "sfumato.engine.cpu_probe", str(module), str(physical_cores())]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return VariantTiming(name, error=f"the probe ran past its limit of {timeout_s:g} s")
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        return VariantTiming(name, error=f"the probe failed: {tail}")
    result: dict[str, Any] = json.loads(lines[-1])
    return VariantTiming(name, result.get("sizes", {}), result.get("error"))


def cache_key(variants: dict[str, Path]) -> str:
    """What a remembered choice is valid for: this CPU's model and flags, the modules'
    contents, whose kernels run (``SFUMATO_KERNELS``) and in which arithmetic
    (``SFUMATO_PRECISION``)."""
    model, flags = cpu_identity()
    modules = {name: hashlib.sha256(path.read_bytes()).hexdigest() for name, path in sorted(variants.items())}
    arithmetic = {"kernels": kernels_choice(), "precision": precision_choice()}
    text = json.dumps({"cpu": model, "flags": flags, "modules": modules, **arithmetic}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def physical_cores() -> int:
    """Physical cores of the CPUs this process may run on (hyperthreads counted once)."""
    cores: set[str] = set()
    for cpu in os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else ():
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        with contextlib.suppress(OSError):
            cores.add(siblings.read_text().strip())
    return len(cores) or os.cpu_count() or 1


def cpu_identity() -> tuple[str, str]:
    """The CPU's model name and feature flags, as ``/proc/cpuinfo`` states them."""
    found: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            found.setdefault(key.strip(), value.strip())
    flags = " ".join(sorted(found.get("flags", "").split()))
    return found.get("model name") or platform.processor() or platform.machine(), flags


def _read(cache: Path) -> dict[str, Any]:
    try:
        data = json.loads(cache.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One process at a time past this point, where advisory locks and the folder allow."""
    try:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        handle = path.open("a")
    except (ImportError, OSError):  # no locks here: two first processes may both probe
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)

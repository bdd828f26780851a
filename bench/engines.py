"""The engine builds the build benchmark compares, each compiled once and kept in
sfumato's build cache (``SFUMATO_BUILD_CACHE``, default ``~/.cache/sfumato/build``).

- ``stock``: ``stable-diffusion-cpp-python==0.4.7`` exactly as ``pip install`` builds
  it (no ``CMAKE_ARGS``; ``SOURCE_DATE_EPOCH`` unset, so ggml's own defaults hold);
- ``sfumato default``: this checkout's engine build, as its wheel ships it;
- ``sfumato native``: the same configured with ``SFUMATO_NATIVE=ON`` (``-march=native``),
  which sfumato measures but does not offer (README, "The engine build").

A sfumato build is keyed by the hash of the build files (``CMakeLists.txt``,
``cmake/``), so a changed build is compiled again; each keeps its own CMake build
folder (``build/bench-<name>``) and ccache makes a rebuild with unchanged flags quick.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = "libstable-diffusion.so"
STOCK = "stable-diffusion-cpp-python==0.4.7"
# The CMake options each sfumato build is configured with on top of CMakeLists.txt.
BUILDS: dict[str, dict[str, str]] = {
    "stock": {},
    "sfumato default": {},
    "sfumato native": {"SFUMATO_NATIVE": "ON"},
}


def _cache_root() -> Path:
    given = os.environ.get("SFUMATO_BUILD_CACHE")
    if given:
        return Path(given)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "sfumato" / "build"


def _build_files_hash() -> str:
    digest = hashlib.sha256()
    for path in [ROOT / "CMakeLists.txt", *sorted((ROOT / "cmake").glob("*.cmake"))]:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("CMAKE_ARGS", "SOURCE_DATE_EPOCH")}


def build_library(name: str) -> Path:
    """The engine library of build ``name`` (one of :data:`BUILDS`), compiled on first use."""
    slug = name.replace(" ", "-")
    key = "0.4.7" if name == "stock" else _build_files_hash()
    target = _cache_root() / "bench-engines" / f"{slug}-{key}"
    if (target / LIBRARY).is_file():
        return target / LIBRARY
    with tempfile.TemporaryDirectory() as tmp:
        if name == "stock":
            command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-binary", "stable-diffusion-cpp-python",
                       STOCK, "-w", tmp]  # fmt: skip
            inside = "stable_diffusion_cpp/lib/"
        else:
            command = [sys.executable, "-m", "pip", "wheel", "--no-deps", str(ROOT), "-w", tmp,
                       "--config-settings", f"build-dir=build/bench-{slug}"]  # fmt: skip
            for option, value in BUILDS[name].items():
                command += ["--config-settings", f"cmake.define.{option}={value}"]
            inside = "sfumato/engine/lib/"
        print(f"\nbuilding the {name} engine: {' '.join(command)}", flush=True)
        subprocess.run(command, check=True, env=_clean_env(), cwd=ROOT)
        (wheel,) = Path(tmp).glob("*.whl")
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.namelist():
                if member.startswith(inside) and not member.endswith("/"):
                    (partial / member.rsplit("/", 1)[1]).write_bytes(archive.read(member))
        partial.rename(target)
    return target / LIBRARY


def unstripped_library(name: str) -> Path:
    """The same sfumato build before the wheel's strip, with its symbols (for profiles)."""
    build_library(name)
    return ROOT / "build" / f"bench-{name.replace(' ', '-')}" / "bin" / LIBRARY


def cpu_description() -> str:
    """This machine's CPU model and whether it has AVX-512, for the results' notes."""
    model, flags = "unknown CPU", set[str]()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            model = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
    simd = "AVX-512" if "avx512f" in flags else "AVX2, no AVX-512" if "avx2" in flags else "no AVX2"
    return f"{model} ({os.cpu_count()} CPUs, {simd})"


# The instruction sets that decide the kernels' speed, as /proc/cpuinfo names them.
KERNEL_ISA = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
              "amx_tile", "amx_bf16", "amx_int8")  # fmt: skip


def isa_flags() -> str:
    """Which of :data:`KERNEL_ISA` this CPU has, for the results' headers."""
    flags: set[str] = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags = set(value.split())
            break
    return " ".join(flag for flag in KERNEL_ISA if flag in flags) or "none of them"

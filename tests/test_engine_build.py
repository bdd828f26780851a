"""sfumato's own engine build, as its users get it.

- ``sfumato info`` reports the build: its CMake options, and the CPU features and
  llamafile as the library's own backend registry reports them;
- the wheel: a ``py3-none-manylinux`` platform wheel carrying the engine, its
  build record and the engine's licences, with no dependency on the engine package;
- installed into a fresh venv with nothing compiled (``--only-binary :all:``), it
  reports itself and generates;
- the engine and its grafted libraries load only from the package's own folders,
  never a same-named file in the current directory or on ``LD_LIBRARY_PATH``;
- the portable build runs on an AVX2 CPU without AVX-512 (Haswell, emulated by
  Debian's qemu-user), and the emulation does refuse a CPU below the floor.

The wheel is the one ``.ci/run`` built (``SFUMATO_TEST_WHEEL``), or, run from a
checkout without it, one that the session builds with ``pip wheel`` and
``auditwheel repair`` (a rebuild of the checkout's build folder).
"""

from __future__ import annotations

import ctypes.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path

import pytest
from PIL import Image

from .helpers import ROOT, SIZE, sfumato_cli

WHEEL_ENV = "SFUMATO_TEST_WHEEL"
PORTABLE_FLOOR = ("AVX", "AVX2", "FMA", "F16C", "BMI2")
ENGINE_IN_WHEEL = "sfumato/engine/lib/libstable-diffusion.so"
# The CPU variants the build ships (CMakeLists.txt, SFUMATO_CPU_VARIANTS), Haswell the floor.
CPU_VARIANTS = ("haswell", "skylakex", "zen4", "sapphirerapids")
# ggml as shared libraries, and the backends as modules sfumato loads by path.
GGML_IN_WHEEL = (
    "libggml.so", "libggml-base.so", *(f"libggml-cpu-{v}.so" for v in CPU_VARIANTS), "libggml-vulkan.so"
)  # fmt: skip


def _run(args: list[str], timeout: float = 900, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)  # type: ignore[call-overload, no-any-return]


def _checked(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    done = _run(args, **kwargs)
    assert done.returncode == 0, f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="session")
def engine_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repaired sfumato wheel."""
    given = os.environ.get(WHEEL_ENV)
    if given:
        path = Path(given)
        assert path.is_file(), f"{WHEEL_ENV}={given} is not a file"
        return path
    out = tmp_path_factory.mktemp("wheel")
    _checked([sys.executable, "-m", "pip", "wheel", "--no-deps", str(ROOT), "-w", str(out / "built")], timeout=3600)
    (built,) = (out / "built").glob("sfumato-*.whl")
    _checked([sys.executable, "-m", "auditwheel", "repair", str(built), "-w", str(out)])
    (repaired,) = out.glob("sfumato-*.whl")
    return repaired


@pytest.fixture(scope="session")
def wheel_venv(engine_wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed, binary packages only (nothing compiled);
    its ``bin`` folder."""
    venv = tmp_path_factory.mktemp("venv") / "env"
    _checked([sys.executable, "-m", "venv", str(venv)])
    started = time.perf_counter()
    _checked([str(venv / "bin" / "python"), "-m", "pip", "install", "--only-binary", ":all:", str(engine_wheel)])
    print(f"\n{engine_wheel.name} ({engine_wheel.stat().st_size / 1e6:.1f} MB) installed into a fresh venv "
          f"in {time.perf_counter() - started:.1f} s")  # fmt: skip
    return venv / "bin"


def _site_packages(venv_bin: Path) -> Path:
    (site,) = venv_bin.parent.glob("lib/python3*/site-packages")
    return site


def _info(python: Path | str, env: Mapping[str, str] | None = None, cwd: Path | None = None) -> dict[str, object]:
    done = _checked([str(python), "-m", "sfumato", "info", "--json"], env=env, cwd=cwd)
    info: dict[str, object] = json.loads(done.stdout)
    return info


def _cpu_features(info: Mapping[str, object]) -> dict[str, str]:
    features = info["backend_features"]
    assert isinstance(features, dict)
    cpu: dict[str, str] = features["CPU"]
    return cpu


def test_info_reports_the_build_and_what_the_library_holds() -> None:
    # The floor variant, named: what it reports is the floor's (the probe's choice is
    # tests/test_cpu_variants.py's).
    info = _info(sys.executable, env={**os.environ, "SFUMATO_CPU_VARIANT": "haswell"})
    build = info["build"]
    assert isinstance(build, dict)
    assert build["native"] is False
    assert build["build_type"] == "Release"
    assert build["engine_version"] == "0.4.7"
    options = build["options"]
    assert options["GGML_LLAMAFILE"] == "ON"
    assert options["GGML_OPENMP"] == "ON"
    assert options["GGML_NATIVE"] == "OFF" and options["GGML_CPU_ALL_VARIANTS"] == "ON"
    assert options["GGML_BACKEND_DL"] == "ON" and options["SD_VULKAN"] == "ON"
    assert build["flavour"] == "cpu+vulkan" and build["backends"] == ["cpu", "vulkan"]
    assert build["cpu_variants"] == list(CPU_VARIANTS)
    # sfumato's own, in every CPU module (csrc/)
    assert build["kernels"] == ["conv_2d", "mul_mat", "flash_attn_ext", "group_norm"]
    modules = info["modules"]
    assert isinstance(modules, list)
    assert {m["name"]: m["loaded"] for m in modules} == {
        "cpu-haswell": True, "cpu-skylakex": False, "cpu-zen4": False, "cpu-sapphirerapids": False, "vulkan": True
    }  # fmt: skip
    # What the library itself says it was compiled with (the registry, not the record).
    cpu = _cpu_features(info)
    assert all(cpu.get(name) == "1" for name in (*PORTABLE_FLOOR, "LLAMAFILE", "OPENMP")), cpu
    assert not any(name.startswith("AVX512") for name in cpu), cpu
    assert info["llamafile"] is True

    text = sfumato_cli("info")
    assert text.returncode == 0, text.stderr
    assert "llamafile:      on" in text.stdout
    assert "-DGGML_LLAMAFILE=ON" in text.stdout
    assert re.search(r"CPU features:.* AVX2 .*LLAMAFILE", text.stdout), text.stdout
    assert re.search(r"cpu variant: +\w+ \(", text.stdout), text.stdout


def test_the_wheel_is_a_manylinux_wheel_for_every_python3(engine_wheel: Path) -> None:
    tag = re.fullmatch(r"sfumato-0\.1\.0-py3-none-(manylinux_2_\d+_x86_64)\.whl", engine_wheel.name)
    assert tag, engine_wheel.name
    shown = " ".join(_checked([sys.executable, "-m", "auditwheel", "show", str(engine_wheel)]).stdout.split())
    assert f'is consistent with the following platform tag: "{tag.group(1)}"' in shown, shown
    # Versioned glibc symbols no newer than the tag claims.
    floor = int(tag.group(1).split("_")[2])
    glibc = {int(minor) for minor in re.findall(r"GLIBC_2\.(\d+)", shown)}
    assert glibc and max(glibc) <= floor, sorted(glibc)


def test_the_wheel_carries_the_engine_its_record_and_licences(engine_wheel: Path) -> None:
    with zipfile.ZipFile(engine_wheel) as wheel:
        names = wheel.namelist()
        assert ENGINE_IN_WHEEL in names
        assert {f"sfumato/engine/lib/{name}" for name in GGML_IN_WHEEL} <= set(names), names
        record = json.loads(wheel.read("sfumato/engine/lib/build.json"))
        (metadata,) = (n for n in names if n.endswith(".dist-info/METADATA"))
        # What every install pulls in (an extra's requirements carry an ``extra ==`` marker).
        requires = [
            line
            for line in wheel.read(metadata).decode().splitlines()
            if line.startswith("Requires-Dist:") and "extra ==" not in line
        ]
        licences = {n.rsplit("/", 1)[1]: wheel.read(n).decode() for n in names if "/licenses/engine/" in n}
    assert record["options"]["GGML_LLAMAFILE"] == "ON"
    assert record["engine"] == {
        "distribution": "stable-diffusion-cpp-python",
        "version": "0.4.7",
        "sha256": record["engine"]["sha256"],
    }
    assert re.fullmatch(r"[0-9a-f]{64}", record["engine"]["sha256"])
    assert requires and not any("stable-diffusion-cpp" in line or "stable_diffusion_cpp" in line for line in requires)
    # The engine's own files stay out: no headers, no static libraries, no ctypes package.
    assert not [n for n in names if n.endswith((".h", ".a", ".hpp")) or n.startswith("stable_diffusion_cpp")]
    # Only sfumato's package, its metadata and the libraries auditwheel grafted: the test
    # support stays beside the tests.
    assert {n.split("/", 1)[0] for n in names} <= {"sfumato", "sfumato.libs", metadata.split("/", 1)[0]}
    assert not [n for n in names if "/testing/" in n or n.startswith("tests/")]
    assert set(licences) >= {"stable-diffusion.cpp-LICENSE", "ggml-LICENSE"}
    for name in ("stable-diffusion.cpp-LICENSE", "ggml-LICENSE"):
        assert "MIT License" in licences[name] and "Permission is hereby granted" in licences[name]


def _generate(sfumato: Path, model: Path, out: Path, **kwargs: object) -> Path:
    _checked(
        [str(sfumato), "generate", "-m", str(model), "-W", str(SIZE), "-H", str(SIZE), "--steps", "1",
         "--seed", "5", "--threads", "2", "-o", str(out)],
        **kwargs,
    )  # fmt: skip
    (png,) = out.glob("sfumato_5_0.png")
    with Image.open(png) as image:
        assert image.size == (SIZE, SIZE)
    return png


def test_a_fresh_venv_install_compiles_nothing_and_generates(
    wheel_venv: Path, sd1_tiny_gguf: Path, tmp_path: Path
) -> None:
    info = _info(wheel_venv / "python", cwd=tmp_path)
    site = _site_packages(wheel_venv)
    assert info["library"] == str(site / ENGINE_IN_WHEEL)
    assert info["engine_version"] == "0.4.7"
    assert _cpu_features(info).get("LLAMAFILE") == "1"
    # No engine package beside it.
    assert not list(site.glob("stable_diffusion_cpp*"))
    _generate(wheel_venv / "sfumato", sd1_tiny_gguf, tmp_path / "out", cwd=tmp_path)


STRAY_SOURCE = """
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void stray_loaded(void) {
    const char* marker = getenv("STRAY_MARKER");
    FILE* f = marker ? fopen(marker, "a") : NULL;
    if (f) { fputs("a stray library was loaded\\n", f); fclose(f); }
}
"""


def _stray_library(folder: Path, name: str) -> Path:
    source = folder / "stray.c"
    source.write_text(STRAY_SOURCE)
    target = folder / name
    _checked(["gcc", "-shared", "-fPIC", f"-Wl,-soname,{name}", "-o", str(target), str(source)])
    return target


def test_libraries_load_only_from_the_package(wheel_venv: Path, sd1_tiny_gguf: Path, tmp_path: Path) -> None:
    site = _site_packages(wheel_venv)
    engine = site / ENGINE_IN_WHEEL
    grafted = sorted(p.name for p in (site / "sfumato.libs").iterdir())
    assert any(name.startswith("libgomp") for name in grafted), grafted
    stray = tmp_path / "stray"
    stray.mkdir()
    for name in ("libstable-diffusion.so", "libgomp.so.1", *GGML_IN_WHEEL, *grafted):
        _stray_library(stray, name)
    marker = tmp_path / "marker"
    env = {**os.environ, "LD_LIBRARY_PATH": str(stray), "STRAY_MARKER": str(marker)}
    env.pop("SFUMATO_ENGINE_LIB", None)

    # From the strays' folder, with them on LD_LIBRARY_PATH, sfumato loads none of them:
    # not as the engine, not as the engine's dependencies (its DT_RPATH comes first), and
    # not as backend modules (loaded by path; ggml never searches its default paths).
    assert "(RPATH)" in _checked(["readelf", "-d", str(engine)]).stdout
    info = _info(wheel_venv / "python", env=env, cwd=stray)
    assert info["library"] == str(engine)
    modules = info["modules"]
    assert isinstance(modules, list) and modules
    assert all(Path(m["path"]).parent == engine.parent for m in modules), modules
    cpu_variant = info["cpu_variant"]
    assert isinstance(cpu_variant, dict)
    assert {m["name"] for m in modules if m["loaded"]} == {f"cpu-{cpu_variant['variant']}", "vulkan"}, modules
    _generate(wheel_venv / "sfumato", sd1_tiny_gguf, tmp_path / "out", env=env, cwd=stray)
    assert not marker.exists()

    # The strays are live: a library looked up by name in that environment is theirs.
    by_name = _run([str(wheel_venv / "python"), "-c", "import ctypes; ctypes.CDLL('libstable-diffusion.so')"],
                   env=env, cwd=stray)  # fmt: skip
    assert by_name.returncode == 0, by_name.stderr
    assert marker.read_text().count("loaded") == 1

    # Named on purpose (SFUMATO_ENGINE_LIB), a stray is loaded and refused by the ABI check.
    named = _run([str(wheel_venv / "sfumato"), "info"], env={**env, "SFUMATO_ENGINE_LIB": str(stray)}, cwd=stray)
    assert named.returncode != 0
    assert "not a stable-diffusion.cpp engine library" in named.stderr, named.stderr


# Emulation is slow, and how slow depends on the host: a 64x64 generation of the tiny SD 1.x
# model took 1-2 minutes on an AMD EPYC and more than 15 on an Intel Xeon (Sapphire Rapids).
# So the emulated run is an engine pipeline of a few ggml graphs: the smallest ESRGAN (one
# RRDB block) upscaling an 8x8 image, in process, on one thread (a second emulated thread
# mostly spins in OpenMP's barriers). sfumato's own kernels run under the same emulation in
# test_kernels.py, and the haswell module's generations natively in test_cpu_variants.py.
UPSCALE_IN_PROCESS = """
import sys
import numpy as np
from PIL import Image
from sfumato.engine import UpscalerContext
with UpscalerContext(sys.argv[1], n_threads=1) as upscaler:
    out = upscaler.upscale((np.arange(8 * 8 * 3) % 251).astype(np.uint8).reshape(8, 8, 3))
Image.fromarray(out).save(sys.argv[2])
"""


def _qemu(
    cpu: str, venv_bin: Path, *args: str, timeout: float = 1500, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    qemu = shutil.which("qemu-x86_64")
    assert qemu, "qemu-x86_64 is missing: install Debian's qemu-user (.ci/run does)"
    # The worker processes of the SDK would run natively (no binfmt for the host's own
    # architecture), so the generation runs in process, through the engine layer, on the
    # CPU module alone (what is tested is the CPU floor, not lavapipe under emulation).
    environ = {**os.environ, "SFUMATO_BACKENDS": "cpu", **(env or {})}
    return _run([qemu, "-cpu", cpu, str(venv_bin / "python"), *args], timeout=timeout, env=environ)


def test_the_portable_build_runs_on_an_avx2_cpu_without_avx512(
    wheel_venv: Path, esrgan_1b: Path, tmp_path: Path
) -> None:
    info = _qemu("Haswell", wheel_venv, "-m", "sfumato", "info", "--json")
    assert info.returncode == 0, info.stderr
    found = json.loads(info.stdout)
    assert found["llamafile"] is True
    # Of the build's CPU variants, an AVX2 CPU runs the floor alone: no probe to make.
    assert found["cpu_variant"] == {"variant": "haswell", "how": "only variant this CPU runs", "timings": []}
    named = _qemu("Haswell", wheel_venv, "-m", "sfumato", "info", env={"SFUMATO_CPU_VARIANT": "zen4"})
    assert named.returncode == 2
    assert "SFUMATO_CPU_VARIANT: 'zen4' needs instruction sets this CPU lacks; it runs ['haswell']" in named.stderr

    png = tmp_path / "haswell.png"
    done = _qemu("Haswell", wheel_venv, "-c", UPSCALE_IN_PROCESS, str(esrgan_1b), str(png))
    assert done.returncode == 0, done.stderr[-3000:]
    with Image.open(png) as image:
        assert image.size == (32, 32)

    # The emulated CPU model is enforced: below the floor (Nehalem has no AVX) the CPU
    # module's own check refuses the machine, and sfumato says so (no illegal instruction).
    below = _qemu("Nehalem", wheel_venv, "-c", UPSCALE_IN_PROCESS, str(esrgan_1b), str(tmp_path / "nehalem.png"))
    assert below.returncode == 1, (below.returncode, below.stderr[-2000:])
    assert "libggml-cpu-haswell.so does not load: ggml refused it on this machine (for the CPU module: a CPU" in (
        below.stderr
    ), below.stderr[-2000:]


CUDA_WHEEL_ENV = "SFUMATO_TEST_CUDA_WHEEL"


@pytest.mark.cuda
def test_an_install_with_cuda_works_on_a_machine_without_a_driver(sd1_tiny_gguf: Path, tmp_path: Path) -> None:
    given = os.environ.get(CUDA_WHEEL_ENV)
    assert given, f"-m cuda needs {CUDA_WHEEL_ENV}: a wheel built by scripts/build-cuda-wheel"
    wheel = Path(given)
    assert ctypes.util.find_library("cuda") is None, "this test is about a machine without the CUDA driver"
    venv = tmp_path / "env"
    _checked([sys.executable, "-m", "venv", str(venv)])
    python, env = venv / "bin" / "python", {k: v for k, v in os.environ.items() if k != "SFUMATO_ENGINE_LIB"}
    _checked([str(python), "-m", "pip", "install", "--only-binary", ":all:", str(wheel)], timeout=1800)

    def cuda_module() -> dict[str, object]:
        info = _info(python, env=env, cwd=tmp_path)
        build = info["build"]
        assert isinstance(build, dict) and build["flavour"] == "cpu+cuda", build
        devices = info["devices"]
        assert isinstance(devices, list) and [d["name"] for d in devices] == ["CPU"], devices
        modules = info["modules"]
        assert isinstance(modules, list)
        (cuda,) = (m for m in modules if m["name"] == "cuda")
        assert isinstance(cuda, dict)
        return cuda

    # Without the `cuda` extra, NVIDIA's runtime is missing (cuBLAS at least; a system
    # toolkit on the loader's path may hold cudart): the module does not load, and sfumato
    # says why in the loader's words; the CPU serves.
    cuda = cuda_module()
    assert cuda["loaded"] is False, cuda
    assert re.search(r"lib(cudart|cublas)\.so\.13: cannot open shared object file", str(cuda["error"])), cuda
    _generate(venv / "bin" / "sfumato", sd1_tiny_gguf, tmp_path / "without-runtime", env=env)

    # With it (NVIDIA's wheels), the module loads and finds no device: no driver here.
    _checked([str(python), "-m", "pip", "install", "--only-binary", ":all:", f"{wheel}[cuda]"], timeout=1800)
    cuda = cuda_module()
    assert cuda["loaded"] is True and cuda["devices"] == 0, cuda
    assert str(cuda["error"]).startswith("no device"), cuda
    _generate(venv / "bin" / "sfumato", sd1_tiny_gguf, tmp_path / "with-runtime", env=env)

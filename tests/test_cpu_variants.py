"""CPU variants: the engine build's x86-64 CPU modules, one chosen per process by a
timed probe, remembered per CPU and build, and named by ``SFUMATO_CPU_VARIANT`` or
``model_config.cpu_variant``.

Which variants this CPU runs is read from ``/proc/cpuinfo`` against the instruction
sets ggml's variant list gives each (a fact of ggml's build, not of sfumato's code), so
the tests hold on an AVX2-only machine as on an AVX-512 one.
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

import sfumato
from sfumato import errors
from sfumato.engine.cpu_variants import STEP_WEIGHTS
from sfumato.engine.library import load_engine
from sfumato.images import decode_png

from .helpers import assert_close, assert_far, sdk_script

# ggml's x86-64 variants and the instruction sets each needs (ggml/src/CMakeLists.txt),
# in /proc/cpuinfo's names.
_HASWELL = {"avx", "avx2", "fma", "f16c", "bmi2", "sse4_2"}
NEEDS = {
    "haswell": _HASWELL,
    "skylakex": _HASWELL | {"avx512f"},
    "cannonlake": _HASWELL | {"avx512f", "avx512vbmi"},
    "cascadelake": _HASWELL | {"avx512f", "avx512_vnni"},
    "icelake": _HASWELL | {"avx512f", "avx512vbmi", "avx512_vnni"},
    "cooperlake": _HASWELL | {"avx512f", "avx512_vnni", "avx512_bf16"},
    "zen4": _HASWELL | {"avx512f", "avx512vbmi", "avx512_vnni", "avx512_bf16"},
    "alderlake": _HASWELL | {"avx_vnni"},
    "sapphirerapids": _HASWELL | {"avx512f", "avx512vbmi", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8"},
}


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    raise AssertionError("/proc/cpuinfo has no flags line")


def _variants() -> tuple[str, ...]:
    build = load_engine().build
    assert build is not None and build.cpu_variants, "the suite's engine is sfumato's build, with CPU variants"
    return build.cpu_variants


def _runnable() -> list[str]:
    flags = _cpu_flags()
    return [v for v in _variants() if NEEDS[v] <= flags]


def _info(env: dict[str, str], library: Path | None = None) -> dict[str, Any]:
    environ = {k: v for k, v in os.environ.items() if k != "SFUMATO_CPU_VARIANT"}
    environ.update(env)
    if library is not None:
        environ["SFUMATO_ENGINE_LIB"] = str(library)
    done = subprocess.run(
        [sys.executable, "-m", "sfumato", "info", "--json"], env=environ, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    info: dict[str, Any] = json.loads(done.stdout)
    return info


def _loaded_cpu(info: dict[str, Any]) -> list[str]:
    return [m["name"] for m in info["modules"] if m["loaded"] and m["name"].startswith("cpu")]


def test_the_probe_chooses_the_fastest_runnable_variant_once_per_cpu_and_build(tmp_path: Path) -> None:
    runnable = _runnable()
    cache = {"SFUMATO_CACHE": str(tmp_path / "cache")}
    first = _info(cache)
    choice = first["cpu_variant"]
    if len(runnable) < 2:
        assert choice["how"] == "only variant this CPU runs" and choice["variant"] == runnable[0], choice
        return
    assert choice["how"] == "probe", choice
    timed = {t["variant"]: t for t in choice["timings"]}
    # Every variant this CPU runs was timed, every part of the slice at both image sizes; none failed.
    assert sorted(timed) == sorted(runnable), timed
    parts = {"attention_s", "conv_s", "linear_s"}
    for t in timed.values():
        assert t["error"] is None and sorted(t["sizes"]) == ["256", "512"], t
        assert all(set(p) == parts and min(p.values()) > 0 for p in t["sizes"].values()), t
    # The choice: the variant least behind the fastest at its worse size, each slice's
    # parts weighted as a step weighs them.
    step = {
        v: {s: sum(STEP_WEIGHTS[k] * x for k, x in p.items()) for s, p in t["sizes"].items()} for v, t in timed.items()
    }
    best = {s: min(step[v][s] for v in step) for s in ("256", "512")}
    behind = {v: max(step[v][s] / best[s] for s in best) for v in step}
    print(f"behind the fastest at the worse size: {behind}")
    fastest = min(behind, key=behind.__getitem__)
    assert choice["variant"] == fastest, choice
    assert _loaded_cpu(first) == [f"cpu-{fastest}"], first["modules"]
    # What the loaded CPU backend reports it was compiled with is that variant's.
    features = first["backend_features"]["CPU"]
    assert ("AVX512" in features) == ("avx512f" in NEEDS[fastest]), features

    # Remembered: the next process takes the choice without probing again.
    second = _info(cache)
    assert second["cpu_variant"] == {**choice, "how": "cached probe"}

    # The key is the modules' contents, not their path: a copy of the build is the same
    # build; a module changed (a byte appended: it still loads) is another, probed again.
    # (The copy keeps the install's layout: a repaired wheel's libraries find the grafted
    # ones in sfumato.libs beside the package.)
    library = Path(first["library"])
    copy = tmp_path / "site" / "sfumato" / "engine" / "lib"
    copy.mkdir(parents=True)
    for path in library.parent.iterdir():
        if path.name != "libggml-vulkan.so":
            shutil.copy2(path, copy / path.name)
    grafted = library.parents[3] / "sfumato.libs"
    if grafted.is_dir():
        shutil.copytree(grafted, tmp_path / "site" / "sfumato.libs")
    assert _info(cache, copy / library.name)["cpu_variant"]["how"] == "cached probe"
    with (copy / f"libggml-cpu-{runnable[-1]}.so").open("ab") as module:
        module.write(b"\0")
    assert _info(cache, copy / library.name)["cpu_variant"]["how"] == "probe"

    # A cache that cannot be written: the process probes and runs; nothing is remembered.
    assert _info({"SFUMATO_CACHE": "/proc/no-cache-here"})["cpu_variant"]["how"] == "probe"


def test_a_variant_is_named_by_the_environment_or_refused_by_name(sd1_tiny_gguf: Path, tmp_path: Path) -> None:
    cache = {"SFUMATO_CACHE": str(tmp_path)}
    for variant in _runnable():
        info = _info({**cache, "SFUMATO_CPU_VARIANT": variant})
        assert info["cpu_variant"] == {"variant": variant, "how": "SFUMATO_CPU_VARIANT", "timings": []}
        assert _loaded_cpu(info) == [f"cpu-{variant}"]
    assert not (tmp_path / "cpu-variants.json").exists()  # named: nothing probed

    done = sfumato_info_with({"SFUMATO_CPU_VARIANT": "pentium"})
    assert done.returncode == 2
    assert f"SFUMATO_CPU_VARIANT: must be one of {['auto', *_variants()]}" in done.stderr, done.stderr
    with pytest.raises(errors.InvalidParameterError, match=r"model_config\.cpu_variant: must be one of \['auto', "):
        sfumato.load_model(sd1_tiny_gguf, model_config={"cpu_variant": "pentium"})
    with pytest.raises(errors.InvalidParameterError, match=r"model_config\.cpu_variant: must be 'auto' or"):
        sfumato.load_model(sd1_tiny_gguf, model_config={"cpu_variant": 3})


def sfumato_info_with(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "sfumato", "info"]
    return subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)


_EACH_VARIANT = """
run = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 4, "cfg_scale": 7.0}
for variant in args["variants"]:
    model = sfumato.load_model(args["model"], model_config={"device": "cpu", "cpu_variant": variant, "threads": 2})
    (out / f"{variant}.png").write_bytes(sfumato.diffusion(model, seed=7, **run).outputs.result(timeout=600)[0])
    if variant == args["variants"][0]:
        other = sfumato.diffusion(model, seed=8, **run).outputs.result(timeout=600)[0]
        (out / "other-seed.png").write_bytes(other)
    unload(model)
print(json.dumps({}))
"""


def test_each_runnable_variant_generates_the_same_image(sd1_tiny_gguf: Path, tmp_path: Path) -> None:
    runnable = _runnable()
    _, log = sdk_script(_EACH_VARIANT, tmp_path, {}, model=str(sd1_tiny_gguf), variants=runnable)
    library = load_engine().path.parent
    images = {v: decode_png((tmp_path / f"{v}.png").read_bytes()) for v in runnable}
    for variant in runnable:
        # Each model's worker loaded the variant its model_config named (ggml's own log line).
        assert f"loaded CPU backend from {library}/libggml-cpu-{variant}.so" in log, log[-3000:]
        assert_close(images[variant], images[runnable[0]])
    assert_far(images[runnable[0]], decode_png((tmp_path / "other-seed.png").read_bytes()))

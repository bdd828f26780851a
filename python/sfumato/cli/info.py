"""``sfumato info``: the engine, its CPU modules and kernels, and its devices."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any

from sfumato.engine.cpu_variants import VariantTiming


def module_info(module: Any) -> dict[str, Any]:
    names = ("name", "loaded", "error", "devices", "kernels")
    return {"path": str(module.path), **{name: getattr(module, name) for name in names}}


def engine_info() -> dict[str, Any]:
    """What ``sfumato info`` reports, as a dict."""
    from sfumato.engine.abi import ENGINE_VERSION_REQUIRED
    from sfumato.engine.build import backend_features, llamafile_enabled
    from sfumato.engine.devices import list_devices
    from sfumato.engine.kernels import kernels_choice
    from sfumato.engine.library import load_engine

    engine = load_engine()
    features = backend_features(engine)
    return {
        "engine_version": engine.version,
        "engine_version_required": ENGINE_VERSION_REQUIRED,
        "library": str(engine.path),
        "build": asdict(engine.build) if engine.build is not None else None,
        "backend_features": features,
        "llamafile": llamafile_enabled(features),
        "physical_cores": engine.physical_cores,
        "system_info": " ".join(engine.system_info.split()),
        "modules": [module_info(m) for m in engine.modules],
        "kernels": {"choice": kernels_choice(), "running": engine.cpu_kernels},
        "cpu_variant": asdict(engine.cpu_choice) if engine.cpu_choice is not None else None,
        "devices": [asdict(d) for d in list_devices(engine)],
    }


def info(args: argparse.Namespace) -> int:
    info = engine_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    build = info["build"]
    print(f"engine version: {info['engine_version']} (sfumato requires {info['engine_version_required']})")
    print(f"library:        {info['library']}")
    if build is None:
        print("build:          not built by sfumato (no build.json beside the library)")
    else:
        target = "native (this machine's CPU)" if build["native"] else "portable"
        print(f"build:          {build['flavour']}, {target}, {build['build_type']}, {build['compiler']}")
        flags = " ".join(f"-D{name}={value}" for name, value in build["options"].items())
        print(f"build flags:    {flags}")
    for backend, found in info["backend_features"].items():
        listed = " ".join(name if value == "1" else f"{name}={value}" for name, value in found.items())
        print(f"{backend + ' features:':<16}{listed or '(none reported)'}")
    print(f"llamafile:      {'on' if info['llamafile'] else 'off'}")
    print(f"physical cores: {info['physical_cores']}")
    print(f"system info:    {info['system_info']}")
    if info["modules"]:
        print("backend modules:")
        for m in info["modules"]:
            state = "loaded" if m["loaded"] else "not loaded"
            state += f": {m['error']}" if m["error"] else ""
            print(f"  {m['name']:<14} {state} ({m['path']})")
            if m["kernels"]:
                listed = ", ".join(f"{op} ({isa})" for op, isa in m["kernels"].items())
                print(f"  {'':<14} sfumato kernels: {listed}")
    running = info["kernels"]["running"]
    which = ", ".join(running) if running else "none: ggml's own run"
    print(f"kernels:        {which} (SFUMATO_KERNELS={info['kernels']['choice']})")
    choice = info["cpu_variant"]
    if choice is not None:
        print(f"cpu variant:    {choice['variant']} ({choice['how']})")
        for t in choice["timings"]:
            if t["error"] is not None:
                print(f"  {t['variant']:<14} {t['error']}")
            else:
                timing = VariantTiming(**t)
                sizes = "; ".join(
                    f"at {size}: {timing.step_s(size) * 1000:.1f} ms (attention {p['attention_s'] * 1000:.1f}, "
                    f"3x3 conv {p['conv_s'] * 1000:.1f}, linear {p['linear_s'] * 1000:.1f})"
                    for size, p in t["sizes"].items()
                )
                print(f"  {t['variant']:<14} {sizes}")
    print("devices:")
    for d in info["devices"]:
        memory = f"{d['memory_free'] / 2**30:.1f} of {d['memory_total'] / 2**30:.1f} GiB free"
        kind = d["type"] + (", software: used only by name" if d["software"] else "")
        print(f"  {d['name']:<10} {d['description']} ({kind}; {memory})")
    return 0

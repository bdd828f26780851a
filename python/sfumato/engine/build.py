"""What the loaded engine is: the record sfumato's build leaves beside the library
(``build.json``) and the features each ggml backend reports it was compiled with.

The record says what was asked of the compiler; the backend features say what the
library holds (a record can be copied next to another library, the features cannot),
and they work for any build, sfumato's or not, static or with dynamic backends.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sfumato.engine.library import Engine

BUILD_RECORD = "build.json"


@dataclass(frozen=True)
class EngineBuild:
    """The record of one sfumato engine build.

    Attributes
    ----------
    flavour:
        The backends this build carries, joined: ``"cpu"``, ``"cpu+vulkan"``.
    backends:
        Its backend modules by name (``"cpu"``, ``"vulkan"``).
    cpu_variants:
        The CPU variants it carries (``"haswell"``, ``"skylakex"``, ``"zen4"``,
        ``"sapphirerapids"``), each a
        module; none for a build with a single CPU module.
    kernels:
        The ggml operations sfumato's own kernels (``csrc/``) take over in its CPU
        modules (``"conv_2d"``).
    native:
        Whether it was built for the building machine's CPU (``SFUMATO_NATIVE``)
        rather than the portable floor.
    engine_version, engine_sha256:
        The ``stable-diffusion-cpp-python`` source release it was compiled from.
    options:
        The engine's CMake options as sfumato set them (``GGML_LLAMAFILE``: ``"ON"``).
    compiler, build_type, system:
        As CMake saw them.
    """

    flavour: str
    backends: tuple[str, ...]
    cpu_variants: tuple[str, ...]
    native: bool
    engine_version: str
    engine_sha256: str
    options: dict[str, str]
    compiler: str
    build_type: str
    system: str
    kernels: tuple[str, ...] = ()


def read_build(library: Path) -> EngineBuild | None:
    """Read the ``build.json`` beside ``library``; ``None`` when there is none.

    Raises
    ------
    ValueError
        When the record exists but is not one sfumato's build writes.
    """
    record = library.parent / BUILD_RECORD
    if not record.is_file():
        return None
    data: dict[str, Any] = json.loads(record.read_text())
    try:
        return EngineBuild(
            flavour=str(data["flavour"]),
            backends=tuple(str(b) for b in data.get("backends", str(data["flavour"]).split("+"))),
            cpu_variants=tuple(str(v) for v in data.get("cpu_variants", ())),
            kernels=tuple(str(k) for k in data.get("kernels", ())),
            native=bool(data["native"]),
            engine_version=str(data["engine"]["version"]),
            engine_sha256=str(data["engine"]["sha256"]),
            options={str(k): str(v) for k, v in data["options"].items()},
            compiler=str(data["compiler"]),
            build_type=str(data["build_type"]),
            system=str(data["system"]),
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{record} is not an engine build record: missing {exc}") from exc


def backend_features(engine: Engine) -> dict[str, dict[str, str]]:
    """Each registered backend's compile-time features, by backend name.

    For the CPU backend these are the instruction sets its kernels use
    (``AVX2``, ``FMA``, ``F16C``...) and ``LLAMAFILE``, ``OPENMP``, ``REPACK``.
    """
    ffi, lib = engine.ffi, engine.lib
    features: dict[str, dict[str, str]] = {}
    for i in range(int(lib.ggml_backend_reg_count())):
        reg = lib.ggml_backend_reg_get(i)
        name = engine.string(lib.ggml_backend_reg_name(reg))
        entry = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_get_features")
        found: dict[str, str] = {}
        if entry != ffi.NULL:
            get_features = ffi.cast("ggml_backend_get_features_t", entry)
            item = get_features(reg)
            while item != ffi.NULL and item.name != ffi.NULL:
                found[engine.string(item.name)] = engine.string(item.value)
                item += 1
        features[name] = found
    return features


def llamafile_enabled(features: dict[str, dict[str, str]]) -> bool:
    """Whether any CPU backend of ``features`` was compiled with llamafile's GEMM."""
    return any(f.get("LLAMAFILE") == "1" for f in features.values())

"""Locating, opening and checking the engine library.

The locator chain, tried in order:

1. ``SFUMATO_ENGINE_LIB``: a path to ``libstable-diffusion.so`` (or the folder
   holding it), for GPU builds or any other build of the same API version;
2. the library sfumato's own build installed beside this module
   (``sfumato/engine/lib/``; for an editable install, the same path in the
   install tree the distribution records);
3. an :class:`~sfumato.errors.EngineNotFoundError` saying what to install.

Each step names a file by its absolute path, so the dynamic loader never
searches for it: a library of the same name in the current directory or on
``LD_LIBRARY_PATH`` is never taken instead. The library's own dependencies
resolve through its DT_RPATH first (``$ORIGIN``, and auditwheel's
``sfumato.libs`` in a repaired wheel), which the loader searches before
``LD_LIBRARY_PATH``.

A library built with ggml's dynamic backends (sfumato's own build) carries its
backends as modules beside it (``libggml-cpu-haswell.so`` and the other CPU
variants, ``libggml-vulkan.so``). One CPU variant is chosen by measurement
(:mod:`sfumato.engine.cpu_variants`). The modules are loaded by their paths right
after the library opens, the CPU module first (:func:`load_backends`), so the
engine never scans ggml's default search paths (the executable's folder, the
current directory). ``SFUMATO_BACKENDS`` (a comma list such as ``cpu,vulkan``)
limits which are loaded; a model's worker process gets the list its device needs.

Opening the library runs an ABI check (:func:`check_abi`): structs are filled
by the engine's own ``*_init`` functions and by us, printed back by the engine's
``*_to_str`` functions, and compared with what our declarations hold. A layout
mismatch is an :class:`~sfumato.errors.EngineABIError` at load, never a crash
or silent corruption later.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import sys
import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import cffi

from sfumato.engine import _cdefs
from sfumato.engine.abi import ENGINE_DISTRIBUTION, ENGINE_VERSION_REQUIRED, check_abi
from sfumato.engine.build import EngineBuild, read_build
from sfumato.engine.cpu_variants import CACHE_FILE, CpuChoice, choose_variant, variant_modules
from sfumato.engine.kernels import CONV_2D, FLASH_ATTN_EXT, kernels_choice, module_kernels, precision_choice
from sfumato.errors import EngineABIError, EngineNotFoundError
from sfumato.registry import cache_dir

ENV_LIBRARY = "SFUMATO_ENGINE_LIB"
ENV_BACKENDS = "SFUMATO_BACKENDS"

# Where sfumato's build installs the engine, relative to site-packages.
PACKAGE_LIBRARY_DIR = "sfumato/engine/lib"

_LIB_NAMES = {
    "linux": "libstable-diffusion.so",
    "darwin": "libstable-diffusion.dylib",
    "win32": "stable-diffusion.dll",
}

_MODULE_PATTERNS = {"linux": ("libggml-", ".so"), "darwin": ("libggml-", ".so"), "win32": ("ggml-", ".dll")}
# ggml's own libraries, which are not backend modules.
_NOT_MODULES = {"base"}


def _library_file_name() -> str:
    return _LIB_NAMES.get(sys.platform, _LIB_NAMES["linux"])


@dataclass(frozen=True)
class BackendModule:
    """One backend module beside the engine library.

    Attributes
    ----------
    name:
        ``"cpu-haswell"`` (a CPU variant), ``"cpu"`` (a build's single CPU module),
        ``"vulkan"``, ``"cuda"``: the module's file name without ggml's affixes.
    path:
        Its absolute path.
    loaded:
        Whether this process loaded it.
    error:
        Why it did not load (the dynamic loader's words), ``"not requested"`` when
        ``SFUMATO_BACKENDS`` left it out, ``"another CPU variant was chosen"``; for a
        loaded GPU module without a device, ``"no device"`` and ggml's last warning
        (a machine without the driver); else ``None``.
    devices:
        How many devices the loaded module registered.
    kernels:
        For a CPU module, the operations sfumato's own kernels take in it, with
        their instruction set (``{"conv_2d": "avx512"}``; :mod:`sfumato.engine.kernels`).
    """

    name: str
    path: Path
    loaded: bool
    error: str | None = None
    devices: int = 0
    kernels: dict[str, str] = field(default_factory=dict)


def backend_modules(library: Path) -> dict[str, Path]:
    """The backend modules in the engine library's folder, by name (none for a
    library with its backends linked in): the CPU variants in the build's order
    (``build.json``: ggml's, the floor first, the most capable last), then the others
    by name."""
    prefix, suffix = _MODULE_PATTERNS.get(sys.platform, _MODULE_PATTERNS["linux"])
    found: dict[str, Path] = {}
    for path in sorted(library.parent.glob(f"{prefix}*{suffix}")):
        name = path.name[len(prefix) : -len(suffix)]
        if name not in _NOT_MODULES:
            found[name] = path
    build = read_build(library)
    order = {f"cpu-{variant}": i for i, variant in enumerate(build.cpu_variants if build is not None else ())}
    return dict(sorted(found.items(), key=lambda item: (order.get(item[0], len(order)), item[0])))


def requested_backends() -> set[str] | None:
    """The modules ``SFUMATO_BACKENDS`` asks for (the CPU always), or ``None``: all."""
    raw = os.environ.get(ENV_BACKENDS, "").strip()
    if not raw:
        return None
    return {part.strip().lower() for part in raw.split(",") if part.strip()} | {"cpu"}


def _why_not_loadable(path: Path) -> str:
    """The dynamic loader's reason a module does not open (a missing driver library)."""
    import ctypes

    try:
        ctypes.CDLL(str(path), mode=os.RTLD_LOCAL | os.RTLD_LAZY)
    except OSError as exc:
        return str(exc)
    return (
        "ggml refused it on this machine (for the CPU module: a CPU without the instruction sets it "
        "was built for, AVX2 and FMA; for a GPU module: no usable device or driver)"
    )


# The CPU module's handle, kept open for the life of the process.
_cpu_module: Any = None


def _open_cpu_module(path: Path) -> None:
    """Open the CPU backend module with its symbols global, before the engine library.

    With dynamic backends the engine still calls the CPU backend's feature functions
    (``ggml_cpu_has_avx``...) directly, and nothing links them: they must be in the
    process's global scope when the engine library is opened.
    """
    global _cpu_module
    if _cpu_module is None:
        import ctypes

        _cpu_module = ctypes.CDLL(str(path), mode=os.RTLD_NOW | os.RTLD_GLOBAL)


def _is_cpu(name: str) -> bool:
    return name == "cpu" or name.startswith("cpu-")


# ggml's log levels (enum ggml_log_level) as logging's; 5 continues the previous line.
_GGML_LEVELS = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
_ggml_log: list[Any] = []  # the callback, alive as long as the process
_ggml_warnings: list[str] = []  # ggml's warnings and errors while a module loads


def _route_ggml_log(ffi: cffi.FFI, lib: Any) -> None:
    """Send ggml's own log lines (module loading, device discovery) to the
    ``sfumato.engine`` logger instead of stderr, until the engine sets its own."""
    logger = logging.getLogger("sfumato.engine")
    previous = [logging.INFO]

    def on_log(level: int, text: Any, _data: Any) -> None:
        try:
            message = bytes(ffi.string(text)).decode("utf-8", "replace").rstrip("\n")
            previous[0] = _GGML_LEVELS.get(int(level), previous[0])
            if message.strip():
                logger.log(previous[0], "%s", message)
                if previous[0] >= logging.WARNING:
                    _ggml_warnings[:] = [*_ggml_warnings[-9:], message.strip()]
        except BaseException:  # noqa: BLE001 - must never unwind into C
            pass

    _ggml_log[:] = [ffi.callback("ggml_log_callback", on_log)]
    lib.ggml_log_set(_ggml_log[0], ffi.NULL)


def load_backends(
    ffi: cffi.FFI, lib: Any, library: Path, modules: dict[str, Path], cpu: str = "cpu"
) -> tuple[BackendModule, ...]:
    """Load ``modules`` (:func:`backend_modules` of ``library``) by their paths, the CPU
    module named ``cpu`` first; the other CPU variants are not loaded (they are listed
    next, in the order given), then the other backends.

    Raises
    ------
    EngineNotFoundError
        When the library has modules but its CPU module does not load.
    """
    if not modules:
        return ()
    if cpu not in modules:
        raise EngineNotFoundError(f"the engine at {library} has backend modules ({', '.join(modules)}) but no CPU one")
    wanted = requested_backends()
    result = []
    for name in sorted(modules, key=lambda name: (name != cpu, not _is_cpu(name))):
        path = modules[name]
        kernels = module_kernels(path) if _is_cpu(name) else {}
        if name != cpu and _is_cpu(name):
            result.append(BackendModule(name, path, False, "another CPU variant was chosen", kernels=kernels))
            continue
        if name != cpu and wanted is not None and name not in wanted:
            result.append(BackendModule(name, path, False, "not requested"))
            continue
        _ggml_warnings.clear()
        reg = lib.ggml_backend_load(str(path).encode())
        if reg == ffi.NULL:
            result.append(BackendModule(name, path, False, _why_not_loadable(path)))
            continue
        devices = int(lib.ggml_backend_reg_dev_count(reg))
        why = None if devices else ": ".join(["no device", *_ggml_warnings[-1:]])
        result.append(BackendModule(name, path, True, why, devices, kernels))
    if not result[0].loaded:
        raise EngineNotFoundError(f"the engine's CPU backend {result[0].path} does not load: {result[0].error}")
    return tuple(result)


def package_library() -> Path | None:
    """The engine library installed with sfumato, or ``None`` when there is none.

    A regular install has it beside this module. An editable install keeps the
    Python sources in the checkout and the built library in site-packages, at the
    same path below the distribution's root.
    """
    here = Path(__file__).with_name("lib") / _library_file_name()
    if here.is_file():
        return here
    try:
        dist = importlib.metadata.distribution("sfumato")
    except importlib.metadata.PackageNotFoundError:
        return None
    installed = Path(str(dist.locate_file(f"{PACKAGE_LIBRARY_DIR}/{_library_file_name()}")))
    return installed if installed.is_file() else None


def locate_library() -> Path:
    """Return the absolute path of the engine library, following the locator chain.

    Raises
    ------
    EngineNotFoundError
        When neither ``SFUMATO_ENGINE_LIB`` nor sfumato's own build provides it.
    """
    override = os.environ.get(ENV_LIBRARY)
    if override:
        path = Path(override).expanduser()
        if path.is_dir():
            path = path / _library_file_name()
        if not path.is_file():
            raise EngineNotFoundError(
                f"{ENV_LIBRARY}={override!r} does not name an existing engine library "
                f"(expected a path to {_library_file_name()} or the folder holding it)"
            )
        return path.resolve()

    packaged = package_library()
    if packaged is not None:
        return packaged.resolve()
    raise EngineNotFoundError(
        "the stable-diffusion.cpp engine library was not found: this sfumato has no engine build "
        f"in {PACKAGE_LIBRARY_DIR}. Install a sfumato wheel (`pip install sfumato`), or build one "
        "from a checkout with `pip install .` (it compiles the engine, a few minutes), "
        f"or point {ENV_LIBRARY} at a build of {ENGINE_DISTRIBUTION} {ENGINE_VERSION_REQUIRED}"
    )


def engine_package_version() -> str | None:
    """The version of an installed engine distribution, or ``None``.

    Only a library taken from such a package (through ``SFUMATO_ENGINE_LIB``)
    is described by it; sfumato's own build carries a ``build.json`` instead.
    """
    try:
        return importlib.metadata.version(ENGINE_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class Engine:
    """An opened and checked engine library.

    Attributes
    ----------
    ffi:
        The cffi ``FFI`` holding sfumato's declarations.
    lib:
        The library opened in ABI mode.
    path:
        Where the library was loaded from.
    modules:
        Its backend modules and whether each loaded (empty when its backends
        are linked in).
    cpu_choice:
        The CPU variant this process runs and how it was chosen (``None`` for a
        build with a single CPU module).
    """

    ffi: cffi.FFI
    lib: Any
    path: Path
    modules: tuple[BackendModule, ...] = ()
    cpu_choice: CpuChoice | None = None

    @property
    def cpu_kernels(self) -> dict[str, str]:
        """sfumato's own kernels that run in this process's CPU module, with their
        instruction set (``{"conv_2d": "avx512"}``); empty when ggml's own run
        (``SFUMATO_KERNELS=ggml``, or a library without sfumato's kernels)."""
        if kernels_choice() == "ggml" or not self.modules or not _is_cpu(self.modules[0].name):
            return {}
        return dict(self.modules[0].kernels)

    @property
    def cpu_variants(self) -> dict[str, Path]:
        """The build's CPU variant modules (``libggml-cpu-<variant>``), by variant name."""
        return variant_modules({m.name: m.path for m in self.modules})

    @property
    def gpu_devices(self) -> int:
        """How many GPU devices this process's loaded backend modules registered."""
        return sum(m.devices for m in self.modules if m.loaded and not _is_cpu(m.name))

    @property
    def direct_convolutions(self) -> bool:
        """Whether contexts ask the engine for direct convolutions (CONV_2D ops): when
        sfumato's CONV_2D kernel runs them on the CPU, and no GPU device is loaded."""
        return CONV_2D in self.cpu_kernels and self.gpu_devices == 0

    @property
    def fused_attention(self) -> bool:
        """Whether contexts ask the engine for the diffusion model's flash attention
        (FLASH_ATTN_EXT ops): when sfumato's kernel runs them on the CPU, and no GPU
        device is loaded."""
        return FLASH_ATTN_EXT in self.cpu_kernels and self.gpu_devices == 0

    @cached_property
    def _cancel_hook(self) -> Any:
        """The CPU module's process-wide cancel request (sfumato's build), else ``None``."""
        if not self.modules or not _is_cpu(self.modules[0].name):
            return None
        ffi = cffi.FFI()
        ffi.cdef(_cdefs.SFUMATO_KERNELS)
        module = ffi.dlopen(str(self.modules[0].path))  # the instance ggml loaded, by its path
        try:
            module.sfumato_cancel_set  # noqa: B018 - cffi resolves the symbol here, or raises
        except AttributeError:
            return None
        return module

    @property
    def can_cancel(self) -> bool:
        """Whether :meth:`request_cancel` stops a running generation: on the CPU backend
        of sfumato's own build (a GPU backend runs its graphs elsewhere)."""
        return self._cancel_hook is not None and self.gpu_devices == 0

    def request_cancel(self, requested: bool = True) -> None:
        """Stop every graph the CPU backend runs at its next operation, until called
        with ``False``: the running generation fails, its contexts stay loaded."""
        if self._cancel_hook is not None:
            self._cancel_hook.sfumato_cancel_set(1 if requested else 0)

    def string(self, pointer: Any) -> str:
        """Decode a ``const char*`` owned by the engine (never freed here)."""
        if pointer == self.ffi.NULL:
            return ""
        return bytes(self.ffi.string(pointer)).decode("utf-8", errors="replace")

    @cached_property
    def build(self) -> EngineBuild | None:
        """How the library was built (``build.json`` beside it), or ``None`` for
        a library that sfumato did not build."""
        return read_build(self.path)

    @property
    def version(self) -> str:
        """The engine version.

        The sdist's ``sd_version()`` answers "unknown" (it is not a git checkout),
        so this is the version of the source release the library was built from:
        from ``build.json``, else from an engine distribution that holds the library.
        """
        reported = self.string(self.lib.sd_version())
        if reported and reported != "unknown":
            return reported
        if self.build is not None:
            return self.build.engine_version
        packaged = engine_package_version()
        if packaged is not None and "stable_diffusion_cpp" in self.path.parts:
            return packaged
        return "unknown"

    @property
    def commit(self) -> str:
        """The engine commit as the library reports it (often "unknown")."""
        return self.string(self.lib.sd_commit())

    @property
    def system_info(self) -> str:
        """The engine's CPU feature report (AVX, NEON, ...)."""
        return self.string(self.lib.sd_get_system_info()).strip()

    @property
    def physical_cores(self) -> int:
        """The number of physical cores as the engine counts them."""
        return int(self.lib.sd_get_num_physical_cores())


def make_ffi(cdef: str = _cdefs.ALL) -> cffi.FFI:
    """Build an ``FFI`` from declarations (sfumato's own unless told otherwise)."""
    ffi = cffi.FFI()
    ffi.cdef(cdef)
    return ffi


_lock = threading.Lock()
_engine: Engine | None = None


def load_engine() -> Engine:
    """Open the engine library once per process, checked, and return it.

    Raises
    ------
    EngineNotFoundError
        When the library cannot be located or opened.
    EngineABIError
        When its struct layouts differ from sfumato's declarations, or it lacks
        a function they declare.
    InvalidParameterError
        When ``SFUMATO_CPU_VARIANT`` names a CPU variant the build lacks or this CPU
        cannot run, ``SFUMATO_KERNELS`` is neither ``sfumato`` nor ``ggml``, or
        ``SFUMATO_PRECISION`` is neither ``exact`` nor ``bf16`` (or ``bf16`` where it cannot run).
    """
    global _engine
    with _lock:
        if _engine is None:
            kernels_choice()  # a bad SFUMATO_KERNELS or SFUMATO_PRECISION is refused before anything opens
            precision_choice()
            path = locate_library()
            ffi = make_ffi()
            try:
                modules = backend_modules(path)
                choice = choose_variant(modules, cache_dir() / CACHE_FILE)
                cpu = f"cpu-{choice.variant}" if choice is not None else "cpu"
                if cpu in modules:
                    _open_cpu_module(modules[cpu])
                lib = ffi.dlopen(str(path))
            except OSError as exc:
                raise EngineNotFoundError(f"cannot open the engine library {path}: {exc}") from exc
            try:
                check_abi(ffi, lib)
            except AttributeError as exc:  # cffi's answer for a symbol the library lacks
                raise EngineABIError(f"{path} is not a stable-diffusion.cpp engine library: {exc}") from exc
            _route_ggml_log(ffi, lib)
            loaded = load_backends(ffi, lib, path, modules, cpu)
            _engine = Engine(ffi=ffi, lib=lib, path=path, modules=loaded, cpu_choice=choice)
        return _engine

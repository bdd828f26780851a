"""sfumato's own CPU kernels (``csrc/``), which its engine build compiles into every CPU
variant module, and the switch between them and ggml's own.

Each CPU module sfumato builds exports ``sfumato_kernels()`` (the operations it takes
over, with the instruction set they were compiled for: ``"conv_2d:avx512"``, and
``"+bf16"`` where the operation has the bf16 mode too) and the switch
``sfumato_kernels_set_enabled()``. ``SFUMATO_KERNELS`` chooses at start: ``sfumato``
(the default) or ``ggml``, which runs ggml's own kernels everywhere, for comparison and
as an escape hatch.

The bf16 mode (``model_config.precision="bf16"``, which sets ``SFUMATO_PRECISION`` for
the model's worker): the kernels round both operands of each product to bf16 and sum
in f32, with AVX512-BF16's pair products (``+bf16``), or AMX-BF16's tile products in the
sapphirerapids module (``+bf16+amx``), and the weights are converted to bf16 once, at
load. The default, ``exact``, multiplies and sums in f32.

What a kernel changes in the engine's graph: with sfumato's CONV_2D, the engine is
asked for direct convolutions (its conv-direct option) on the CPU, in the UNet (or
DiT), the VAE and ESRGAN, so no patch matrix (im2col) is written to memory; with its
FLASH_ATTN_EXT, for the diffusion model's flash attention, so no head's score matrix is
(the engine's flash-attention graph hands keys and values over as f16).
"""

from __future__ import annotations

import os
from pathlib import Path

from sfumato.engine import _cdefs
from sfumato.errors import InvalidParameterError

ENV_KERNELS = "SFUMATO_KERNELS"
KERNEL_CHOICES = ("sfumato", "ggml")
CONV_2D = "conv_2d"
FLASH_ATTN_EXT = "flash_attn_ext"
ENV_PRECISION = "SFUMATO_PRECISION"
PRECISIONS = ("exact", "bf16")
BF16 = "+bf16"  # the mark of an operation's bf16 mode in a module's list
AMX = "+amx"  # and of its products on AMX-BF16's tiles


def _env_choice(name: str, choices: tuple[str, ...]) -> str:
    """The environment variable ``name``, one of ``choices`` (the first when unset).

    Raises
    ------
    InvalidParameterError
        When it names anything else.
    """
    value = os.environ.get(name, "") or choices[0]
    if value not in choices:
        raise InvalidParameterError(name, f"must be one of {list(choices)}, got {value!r}")
    return value


def kernels_choice() -> str:
    """``SFUMATO_KERNELS``: ``"sfumato"`` (also when unset) or ``"ggml"``; anything else
    is an :class:`InvalidParameterError`."""
    return _env_choice(ENV_KERNELS, KERNEL_CHOICES)


def precision_choice() -> str:
    """``SFUMATO_PRECISION``: ``"exact"`` (also when unset) or ``"bf16"``; anything else
    is an :class:`InvalidParameterError`."""
    return _env_choice(ENV_PRECISION, PRECISIONS)


def carries_bf16(module: Path) -> bool:
    """Whether a CPU module's kernels have the bf16 mode."""
    return any(BF16 in isa for isa in module_kernels(module).values())


def module_kernels(module: Path) -> dict[str, str]:
    """The operations a CPU module's own kernels take, with their instruction set
    (``{"conv_2d": "avx512"}``); empty for a module without sfumato's kernels.

    Reading the list runs none of the module's vector code: it answers on any CPU.
    """
    import cffi

    ffi = cffi.FFI()
    ffi.cdef(_cdefs.SFUMATO_KERNELS)
    lib = ffi.dlopen(str(module))
    try:
        listed = bytes(ffi.string(lib.sfumato_kernels())).decode()
    except AttributeError:  # cffi's answer for a symbol the module lacks: ggml's own build
        return {}
    finally:
        ffi.dlclose(lib)
    found = {}
    for item in filter(None, listed.split(",")):
        op, _, isa = item.partition(":")
        found[op] = isa
    return found

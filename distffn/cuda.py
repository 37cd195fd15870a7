"""CUDA C sources of the GPU step's kernels, compiled by CuPy (``cupy.RawModule``) on first use.

Every kernel module registers its source here (one registry, so a test can compile them all
with NVRTC on a machine without a GPU, and the trainer can compile them all before the first
timed step). Sources are plain CUDA C with ``extern "C"`` entry points; CuPy caches the
compiled binary on disk (``~/.cupy/kernel_cache``), so a machine compiles each once.

``--fmad=false``: NVCC contracts ``a * b + c`` into one fused multiply-add by default, which
rounds once where NumPy rounds twice. Without contraction every float32 ``+ - * /`` and
``sqrtf`` is IEEE-rounded as NumPy's, so a kernel that does its twin's operations in its
twin's order gives its twin's bits (``exp``/``log`` excepted: CUDA's differ from glibc's by
an ulp or two) for every normal float32. CuPy appends :data:`CUPY_OPTIONS` to every source's
options, ``-ftz=true`` last (it wins over a source's own ``-ftz=false``): float32 operands and
results below 2**-126 (subnormals) are flushed to zero, where NumPy keeps them.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

DEFAULT_OPTIONS = ("--std=c++14", "--fmad=false")
# What cupy.RawModule adds to a source's options (cupy/cuda/compiler.py, CuPy 14; besides the
# architecture), so that a test compiles what CuPy compiles.
CUPY_OPTIONS = ("--device-as-default-execution-space", "-ftz=true")


@dataclass(frozen=True)
class Source:
    """One module of kernels: its CUDA C text, the entry points, NVRTC options."""

    name: str
    code: str
    kernels: tuple[str, ...]
    options: tuple[str, ...] = DEFAULT_OPTIONS


SOURCES: dict[str, Source] = {}


def register(name: str, code: str, kernels: tuple[str, ...], options: tuple[str, ...] = DEFAULT_OPTIONS) -> Source:
    """Add a module of kernels (at import of the module that owns it); returns its entry."""
    if name in SOURCES and SOURCES[name].code != code:
        raise ValueError(f"CUDA source {name!r} registered twice")
    SOURCES[name] = source = Source(name, code, tuple(kernels), tuple(options))
    return source


@functools.lru_cache(maxsize=None)
def module(name: str):
    """The compiled ``cupy.RawModule`` of source ``name`` (CuPy imported here, on first use)."""
    import cupy
    src = SOURCES[name]
    return cupy.RawModule(code=src.code, options=src.options, name_expressions=None)


@functools.lru_cache(maxsize=None)
def kernel(name: str, entry: str):
    """Entry point ``entry`` of source ``name`` as a ``cupy.RawKernel``."""
    if entry not in SOURCES[name].kernels:
        raise KeyError(f"CUDA source {name!r} has no kernel {entry!r}")
    return module(name).get_function(entry)


def compile_all() -> None:
    """Compile (or load from CuPy's cache) every registered kernel, so no step compiles."""
    _import_kernel_modules()
    for name, src in SOURCES.items():
        for entry in src.kernels:
            kernel(name, entry)


def all_sources() -> dict[str, Source]:
    """Every source of the package (importing the kernel modules that register them)."""
    _import_kernel_modules()
    return dict(SOURCES)


def _import_kernel_modules() -> None:
    # the modules register their sources when imported; they import no CuPy at import time
    import importlib
    for mod in KERNEL_MODULES:
        importlib.import_module(mod)


# Every module that registers a source; a new one joins this list (and so the NVRTC test).
KERNEL_MODULES = (
    "distffn.nn.cuda_layer_kernels",
    "distffn.optim.cuda_update_kernels",
    "distffn.data.cuda_gather_kernels",
)


def blocks(n: int, threads: int = 256) -> tuple[tuple[int], tuple[int]]:
    """(grid, block) covering ``n`` threads with ``threads`` a block."""
    return ((max(1, (n + threads - 1) // threads),), (threads,))

"""NVRTC through ctypes: compile CUDA C to PTX on a machine without a GPU or CuPy.

libnvrtc comes from the pip wheel ``nvidia-cuda-nvrtc-cu12`` (in the dev extras). Tests import
it as ``from nvrtc import compile_ptx`` (tests/ is on the path, as for ``helpers``).
"""
from __future__ import annotations

import ctypes
import functools
import pathlib
import site
import sys

ARCH = "--gpu-architecture=compute_90"      # Hopper (H100/H200), the GPUs the step is tuned on
LIBRARY = "libnvrtc.so.12"


class NvrtcError(RuntimeError):
    """A source NVRTC refused; the message holds its log."""


def library_path() -> pathlib.Path:
    """libnvrtc.so.12 of the ``nvidia-cuda-nvrtc-cu12`` wheel; AssertionError (a failure, not
    a skip: CI must compile the sources) naming the dev extras when it is not installed."""
    roots = [*site.getsitepackages(), site.getusersitepackages(), *sys.path]
    for root in dict.fromkeys(roots):
        path = pathlib.Path(root) / "nvidia" / "cuda_nvrtc" / "lib" / LIBRARY
        if path.is_file():
            return path
    raise AssertionError(f"{LIBRARY} not found under nvidia/cuda_nvrtc/lib in site-packages: install the "
                         "dev extras (pip install -e '.[dev]', which brings nvidia-cuda-nvrtc-cu12)")


@functools.lru_cache(maxsize=None)
def _nvrtc() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(library_path()))   # it finds libnvrtc-builtins next to itself
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    return lib


def _check(lib, status: int, what: str, log: str = "") -> None:
    if status != 0:
        raise NvrtcError(f"{what}: {lib.nvrtcGetErrorString(status).decode()}\n{log}")


def compile_ptx(code: str, options=(), name: str = "source.cu") -> str:
    """PTX of ``code`` compiled for :data:`ARCH` with ``options``; :class:`NvrtcError` with the
    compiler's log when it does not compile."""
    lib = _nvrtc()
    prog = ctypes.c_void_p()
    _check(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), code.encode(), name.encode(), 0, None, None),
           "nvrtcCreateProgram")
    try:
        opts = [o.encode() for o in (ARCH, *options)]
        argv = (ctypes.c_char_p * len(opts))(*opts)
        status = lib.nvrtcCompileProgram(prog, len(opts), argv)
        size = ctypes.c_size_t()
        _check(lib, lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)), "nvrtcGetProgramLogSize")
        log = ctypes.create_string_buffer(size.value)
        _check(lib, lib.nvrtcGetProgramLog(prog, log), "nvrtcGetProgramLog")
        _check(lib, status, f"{name} does not compile ({' '.join(o.decode() for o in opts)})",
               log.value.decode(errors="replace"))
        _check(lib, lib.nvrtcGetPTXSize(prog, ctypes.byref(size)), "nvrtcGetPTXSize")
        ptx = ctypes.create_string_buffer(size.value)
        _check(lib, lib.nvrtcGetPTX(prog, ptx), "nvrtcGetPTX")
        return ptx.value.decode()
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))

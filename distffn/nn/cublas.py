"""Matrix products through cuBLAS called directly, for a step that a CUDA graph captures.

CuPy refuses its own cuBLAS calls while a stream captures (its handle re-binds the stream on
every call, which capture forbids). The same library called with a handle of our own — its
stream bound once before capture, a fixed workspace so cuBLAS allocates nothing — records
into a graph, and replays give the eager call's bits. ``out = a @ b`` for 2-D float32 arrays
in C or F order (transposed views included) maps onto one ``cublasSgemm`` with no copies
(:func:`gemm_args`; tested on the CPU against a NumPy emulation of cuBLAS's arguments).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

OP_N, OP_T = 0, 1
DEFAULT_MATH, TF32_TENSOR_OP_MATH = 0, 3        # cublasMath_t
WORKSPACE_BYTES = 32 << 20                      # cuBLAS's recommendation for Hopper


def gemm_args(a_shape, a_fortran: bool, b_shape, b_fortran: bool, out_fortran: bool):
    """cuBLAS's column-major arguments for ``out = a @ b``: ``(transa, transb, m, n, k,
    first, lda, second, ldb, ldc)``, where ``first``/``second`` name the operand ("a" or
    "b") passed as cuBLAS's A and B. A C-ordered (r, c) array is, to cuBLAS, its (c, r)
    transpose with leading dimension c; an F-ordered one is itself with leading dimension r.
    A C-ordered ``out`` is computed as ``outᵀ = bᵀ·aᵀ``."""
    (r, k), (k2, c) = a_shape, b_shape
    if k != k2:
        raise ValueError(f"matmul: {a_shape} @ {b_shape}")
    lda = r if a_fortran else k
    ldb = k if b_fortran else c
    if out_fortran:                             # out (r×c) = op(a) · op(b)
        return (OP_N if a_fortran else OP_T, OP_N if b_fortran else OP_T, r, c, k, "a", lda, "b", ldb, r)
    # outᵀ (c×r) = op(b)ᵀ · op(a)ᵀ: a C-ordered operand is already its transpose
    return (OP_T if b_fortran else OP_N, OP_T if a_fortran else OP_N, c, r, k, "b", ldb, "a", lda, c)


def _order(x) -> bool:
    """True for F order, False for C order; other layouts would need a copy: refused."""
    if x.flags.c_contiguous:
        return False
    if x.flags.f_contiguous:
        return True
    raise ValueError(f"matmul: an operand of shape {x.shape} is neither C- nor F-contiguous")


@functools.lru_cache(maxsize=None)
def _library():
    """The libcublas CuPy has loaded (the same copy, so one version in the process)."""
    import cupy
    (cupy.ones((2, 2), cupy.float32) @ cupy.ones((2, 2), cupy.float32)).get()   # CuPy loads it
    path = None
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                name = line.rsplit(None, 1)[-1]
                if "/libcublas.so" in name:
                    path = name
                    break
    except OSError:
        pass
    lib = ctypes.CDLL(path or ctypes.util.find_library("cublas") or "libcublas.so")
    vp, i, fp = ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_float)
    for fn, args in (("cublasCreate_v2", [ctypes.POINTER(vp)]), ("cublasDestroy_v2", [vp]),
                     ("cublasSetStream_v2", [vp, vp]), ("cublasSetWorkspace_v2", [vp, vp, ctypes.c_size_t]),
                     ("cublasSetMathMode", [vp, i]),
                     ("cublasSgemm_v2", [vp, i, i, i, i, i, fp, vp, i, vp, i, fp, vp, i])):
        getattr(lib, fn).argtypes = args
        getattr(lib, fn).restype = ctypes.c_int
    return lib


def _check(status: int, what: str):
    if status != 0:
        raise RuntimeError(f"{what} failed with cuBLAS status {status}")


class Cublas:
    """A cuBLAS handle of our own, bound to ``stream`` with a fixed workspace."""

    def __init__(self, cupy, stream, tf32: bool = False):
        lib = self.lib = _library()
        self.handle = ctypes.c_void_p()
        _check(lib.cublasCreate_v2(ctypes.byref(self.handle)), "cublasCreate")
        self.workspace = cupy.empty(WORKSPACE_BYTES, cupy.uint8)
        _check(lib.cublasSetWorkspace_v2(self.handle, ctypes.c_void_p(self.workspace.data.ptr),
                                         WORKSPACE_BYTES), "cublasSetWorkspace")
        _check(lib.cublasSetStream_v2(self.handle, ctypes.c_void_p(stream.ptr)), "cublasSetStream")
        _check(lib.cublasSetMathMode(self.handle, TF32_TENSOR_OP_MATH if tf32 else DEFAULT_MATH),
               "cublasSetMathMode")
        self._one, self._zero = ctypes.c_float(1.0), ctypes.c_float(0.0)

    def matmul(self, a, b, out):
        """``out = a @ b`` (float32, 2-D; ``out`` C- or F-contiguous); ``out``."""
        ta, tb, m, n, k, first, lda, second, ldb, ldc = gemm_args(
            a.shape, _order(a), b.shape, _order(b), _order(out))
        ops = {"a": a, "b": b}
        _check(self.lib.cublasSgemm_v2(self.handle, ta, tb, m, n, k, ctypes.byref(self._one),
                                       ctypes.c_void_p(ops[first].data.ptr), lda,
                                       ctypes.c_void_p(ops[second].data.ptr), ldb,
                                       ctypes.byref(self._zero), ctypes.c_void_p(out.data.ptr), ldc),
               "cublasSgemm")
        return out

    def close(self):
        if self.handle:
            self.lib.cublasDestroy_v2(self.handle)
            self.handle = ctypes.c_void_p()

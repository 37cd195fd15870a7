"""Array backends: NumPy on a CPU, CuPy on a GPU, chosen once and passed around as ``xp``."""
from __future__ import annotations

import numpy as np

from .errors import UserError


def get_array_module(use_gpu: bool):
    """NumPy, or CuPy when ``use_gpu``; a clear error if CuPy or a GPU is missing."""
    if not use_gpu:
        return np
    try:
        import cupy
    except ImportError:
        raise UserError("scaling.use_gpu: true needs CuPy; install it with "
                        "pip install -e \".[gpu]\" (CUDA 12) or \".[gpu-cuda13]\"") from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDA driver missing or broken
        raise UserError(f"scaling.use_gpu: true, but CuPy finds no usable CUDA device ({e})") from None
    if count < 1:
        raise UserError("scaling.use_gpu: true, but no CUDA GPU is visible")
    return cupy


def array_module_for(job):
    """The job's array module, with the GPU's matrix products in the job's precision:
    float32, or TF32 on the tensor cores with ``scaling.tf32`` (10-bit mantissas in the
    products, float32 sums)."""
    xp = get_array_module(job.scaling.use_gpu)
    if xp is not np:
        set_tf32(xp, job.scaling.tf32)
    return xp


def set_tf32(cupy, on: bool) -> None:
    """TF32 (``on``) or plain float32 products for CuPy's float32 matmuls in this process
    (CuPy's switch behind its ``CUPY_TF32`` variable, which it reads only once)."""
    from cupy._core import _routines_linalg as linalg
    linalg.set_compute_type(np.float32, linalg.COMPUTE_TYPE_TF32 if on else linalg.COMPUTE_TYPE_DEFAULT)


def limit_blas_threads(threads: int):
    """At most ``threads`` BLAS threads in this process (workers sharing a node share its
    cores); the limiter, to restore later, or None without threadpoolctl (scikit-learn brings
    it; without it the environment variables rule)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    return threadpool_limits(threads, user_api="blas")


def to_numpy(a):
    """A NumPy view or copy of ``a`` (a no-op for NumPy arrays)."""
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)


def xp_of(a):
    """The array module an array belongs to."""
    return np if isinstance(a, np.ndarray) else __import__("cupy").get_array_module(a)

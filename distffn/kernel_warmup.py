"""Load the numba kernels in a background thread while the data loads.

numba compiles a kernel on its first call (from its on-disk cache after the first run on a
machine: still ~0.1 s a kernel, and ~0.3 s to import numba). Calling every kernel once on tiny
arrays of the types a training step passes, in a thread started before the dataset is read,
takes that off the path to the first step (BENCHMARKS.md, start-up).
"""
from __future__ import annotations

import threading

import numpy as np

from . import kernels
from .import_lock import HEAVY_IMPORTS


def _call_every_kernel():
    from .data import gather_kernels
    from .nn import layer_kernels as nk
    from .optim import update_kernels as uk
    f32 = np.float32
    z = np.zeros((2, 3), f32, order="F")
    b = np.zeros(3, f32)
    nk.bias_relu(z, b, z)
    nk.relu_backward(z, z, z, b)
    nk.bias_add(z, b)
    nk.column_sums(z, b)
    t = np.zeros(2, np.int64)
    nk.softmax_xent(z, t, z, t, True, True)
    v = np.zeros(4, f32)
    uk.momentum_update(v, v, v, 0.9, -0.1, 0.0)
    uk.nesterov_update(v, v, v, 0.9, -0.1, 0.0)
    uk.adam_update(v, v, v, v, 1.0, 0.0, 0.1, 0.999, 0.001, 1.0, 1e-8, -0.1)
    codes = np.frombuffer(bytes(6), np.uint8).reshape(2, 3)    # read-only, as the IDX loader's
    gather_kernels.take_rows(codes, f32(0), f32(1), t, np.zeros((2, 3), f32))


def warm_up(job) -> threading.Thread | None:
    """Start the background load when ``job`` runs the numba kernels in this process; the
    thread, or None. Errors are left for the real first call to report."""
    if kernels.resolve(job.scaling.kernels, job.scaling.use_gpu) != "numba":
        return None

    def run():
        try:
            with HEAVY_IMPORTS:     # numba's first compile imports SciPy (import_lock.py)
                _call_every_kernel()
        except Exception:           # the step's own call raises it with context
            pass
    thread = threading.Thread(target=run, name="distffn-kernel-warmup", daemon=True)
    thread.start()
    return thread

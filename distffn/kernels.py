"""CuPy kernels for GPU workers, each the twin of a NumPy function it must match.

Imported only when ``scaling.use_gpu`` is true; nothing here runs without CuPy.
"""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def _momentum_kernel():
    import cupy
    # v ← μ·v − ε·ΔΘ/B; Θ ← Θ + v as one pass over the flat buffers (ChainerMN's MomentumSGD)
    return cupy.ElementwiseKernel(
        "T g, T mu, T scale", "T p, T v",
        "v = mu * v + scale * g; p += v",
        "distffn_momentum_update")


def momentum_update_cupy(theta, velocity, grad, momentum: float, scale: float):
    """Twin of :func:`distffn.optimizer.momentum_update_numpy` (``grad`` is left intact)."""
    dt = theta.dtype.type
    _momentum_kernel()(grad, dt(momentum), dt(scale), theta, velocity)

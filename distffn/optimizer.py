"""Momentum SGD in the lectures' form: ``v ← μ·v − ε·ΔΘ;  Θ ← Θ + v``, on the flat buffers."""
from __future__ import annotations

import numpy as np

# Elements per chunk of the NumPy update: three float32 chunks (Θ, v, ΔΘ) stay in L2 while
# all four passes run over them, instead of streaming 3 × 3.2 MB through memory four times.
_CHUNK = 1 << 16


def momentum_update_numpy(theta, velocity, grad, momentum: float, scale: float):
    """``v = μ·v + scale·g; Θ += v`` in place, where ``scale = −ε / batch`` (``grad`` is clobbered)."""
    for s in range(0, theta.shape[0], _CHUNK):
        t, v, g = theta[s:s + _CHUNK], velocity[s:s + _CHUNK], grad[s:s + _CHUNK]
        g *= scale
        v *= momentum
        v += g
        t += v


class MomentumSGD:
    """Applies one update to flat Θ and velocity buffers given the summed ΔΘ of a global batch."""

    def __init__(self, momentum: float, xp=np):
        self.momentum = momentum
        self.xp = xp
        if xp is np:
            self._update = momentum_update_numpy
        else:
            from .kernels import momentum_update_cupy
            self._update = momentum_update_cupy

    def update(self, theta, velocity, grad_sum, count: int, lr: float):
        """ΔΘ is the gradient summed over ``count`` samples, so ε·ΔΘ/count is the batch mean step."""
        self._update(theta, velocity, grad_sum, self.momentum, -lr / count)

"""Momentum SGD in the lectures' form: ``v ← μ·v − ε·ΔΘ;  Θ ← Θ + v`` on the flat buffers.

With ``weight_decay`` λ the step uses ΔΘ + λ·Θ (L2, as PyTorch's SGD). For a constant ε this
is PyTorch's ``SGD(momentum=μ)`` with its velocity scaled by −ε.
"""
from __future__ import annotations

import functools

import numpy as np

from .optimizer import CHUNK, OPTIMIZERS, Optimizer, check_momentum


def momentum_update_numpy(theta, velocity, grad, momentum: float, scale: float, decay: float = 0.0):
    """``v = μ·v + scale·g − decay·Θ; Θ += v`` in place, where ``scale = −ε·grad_scale`` and
    ``decay = ε·λ`` (``grad`` is clobbered)."""
    for s in range(0, theta.shape[0], CHUNK):
        t, v, g = theta[s:s + CHUNK], velocity[s:s + CHUNK], grad[s:s + CHUNK]
        g *= scale
        if decay:
            g -= decay * t
        v *= momentum
        v += g
        t += v


@functools.lru_cache(maxsize=None)
def _momentum_kernel():
    import cupy
    # one pass over the flat buffers (ChainerMN's MomentumSGD kernel)
    return cupy.ElementwiseKernel(
        "T g, T mu, T scale, T decay", "T p, T v",
        "v = mu * v + scale * g - decay * p; p += v",
        "distffn_momentum_update")


def momentum_update_cupy(theta, velocity, grad, momentum: float, scale: float, decay: float = 0.0):
    """Twin of :func:`momentum_update_numpy` on the GPU (``grad`` is left intact)."""
    dt = theta.dtype.type
    _momentum_kernel()(grad, dt(momentum), dt(scale), dt(decay), theta, velocity)


@OPTIMIZERS.named("momentum")
class MomentumSGD(Optimizer):
    """v ← μ·v − ε·ΔΘ; Θ ← Θ + v (the lectures' form; μ = optimizer.momentum)"""

    buffers = ("velocity",)

    @classmethod
    def check(cls, cfg):
        check_momentum(cfg)

    def _update(self, params, grad, lr, grad_scale):
        step = (self.fused.momentum_update if self.fused else
                momentum_update_numpy if self.xp is np else momentum_update_cupy)
        step(params, self.state["velocity"], grad, self.cfg.momentum, -lr * grad_scale,
             lr * self.weight_decay)

"""Momentum SGD in the lectures' form: ``v ← μ·v − ε·ΔΘ;  Θ ← Θ + v`` on the flat buffers.

With ``weight_decay`` λ the step uses ΔΘ + λ·Θ (L2, as PyTorch's SGD). For a constant ε this
is PyTorch's ``SGD(momentum=μ)`` with its velocity scaled by −ε.
"""
from __future__ import annotations

from .optimizer import CHUNK, OPTIMIZERS, Optimizer, check_momentum, momentum_scalars


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


@OPTIMIZERS.named("momentum")
class MomentumSGD(Optimizer):
    """v ← μ·v − ε·ΔΘ; Θ ← Θ + v (the lectures' form; μ = optimizer.momentum)"""

    buffers = ("velocity",)
    gpu_kernel = "momentum_update"
    _decay_slot = 2
    _scalars = momentum_scalars

    @classmethod
    def check(cls, cfg):
        check_momentum(cfg)

    def _update(self, params, grad, lr, grad_scale):
        step = self.fused.momentum_update if self.fused else momentum_update_numpy
        step(params, self.state["velocity"], grad, *self._scalars(lr, grad_scale))

"""Nesterov momentum in the lectures' notation (Sutskever et al. 2013, in the form of Bengio
et al. 2013 that needs no gradient at a look-ahead point):

    v ← μ·v − ε·ΔΘ;   Θ ← Θ + μ·v − ε·ΔΘ

For a constant ε this is PyTorch's ``SGD(momentum=μ, nesterov=True)``.
"""
from __future__ import annotations

import numpy as np

from .optimizer import CHUNK, OPTIMIZERS, Optimizer, check_momentum, momentum_scalars


@OPTIMIZERS.named("nesterov")
class NesterovSGD(Optimizer):
    """v ← μ·v − ε·ΔΘ; Θ ← Θ + μ·v − ε·ΔΘ (Nesterov momentum)"""

    buffers = ("velocity",)
    gpu_kernel = "nesterov_update"
    _decay_slot = 2
    _scalars = momentum_scalars

    def __init__(self, cfg, size, xp=np, dtype=np.float32, kernels="numpy"):
        super().__init__(cfg, size, xp, dtype, kernels)
        self._scratch = xp.empty(min(size, CHUNK), self.dtype)

    @classmethod
    def check(cls, cfg):
        check_momentum(cfg)

    def _update(self, params, grad, lr, grad_scale):
        xp, mu, decay = self.xp, self.cfg.momentum, lr * self.weight_decay
        velocity = self.state["velocity"]
        if self.fused:
            self.fused.nesterov_update(params, velocity, grad, *self._scalars(lr, grad_scale))
            return
        for s in range(0, params.shape[0], CHUNK):
            t, v, g = params[s:s + CHUNK], velocity[s:s + CHUNK], grad[s:s + CHUNK]
            tmp = self._scratch[:t.shape[0]]
            g *= -lr * grad_scale                   # g ← −ε·ΔΘ
            if decay:
                xp.multiply(t, decay, out=tmp)
                g -= tmp
            v *= mu
            v += g                                  # v ← μ·v − ε·ΔΘ
            t += g
            xp.multiply(v, mu, out=tmp)
            t += tmp                                # Θ ← Θ + μ·v − ε·ΔΘ

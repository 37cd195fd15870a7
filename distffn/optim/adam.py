"""Adam (Kingma and Ba 2015) with PyTorch's algorithm and names (``torch.optim.Adam``):

    g ← ΔΘ + λ·Θ                       (weight_decay λ: L2, not AdamW's decoupled decay)
    m ← m + (1 − β₁)·(g − m)           (exp_avg)
    v ← β₂·v + (1 − β₂)·g²             (exp_avg_sq)
    Θ ← Θ − (ε_t / (1 − β₁ᵗ)) · m / (√v / √(1 − β₂ᵗ) + eps)

in PyTorch's order of float32 operations. PyTorch's CPU kernels round the moment updates once
(fused multiply-adds) where NumPy rounds twice, so the two agree to float32 rounding, not bit
for bit (``tests/optim/test_adam.py`` holds the bound).
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import UserError
from .optimizer import CHUNK, OPTIMIZERS, Optimizer


@OPTIMIZERS.named("adam")
class Adam(Optimizer):
    """PyTorch's Adam: betas (β₁, β₂), eps, weight_decay (L2)"""

    buffers = ("exp_avg", "exp_avg_sq")
    gpu_kernel = "adam_update"
    _decay_slot = 1

    def __init__(self, cfg, size, xp=np, dtype=np.float32, kernels="numpy"):
        super().__init__(cfg, size, xp, dtype, kernels)
        self.beta1, self.beta2 = (float(b) for b in cfg.betas)
        self._scratch = xp.empty(min(size, CHUNK), self.dtype)

    @classmethod
    def check(cls, cfg):
        betas = cfg.betas
        if (not isinstance(betas, list) or len(betas) != 2 or
                not all(isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b)
                        and 0.0 <= b < 1.0 for b in betas)):
            raise UserError(f"optimizer.betas: expected two numbers in [0, 1), got {betas!r}")
        if not cfg.eps > 0:
            raise UserError(f"optimizer.eps: expected a positive number, got {cfg.eps!r}")

    def _scalars(self, lr, grad_scale):
        # the bias corrections of update t + 1 (the coming one), in float64 as PyTorch's
        b1, b2 = self.beta1, self.beta2
        step = self.t + 1
        step_size = lr / (1.0 - b1 ** step)
        bc2_sqrt = math.sqrt(1.0 - b2 ** step)
        return (grad_scale, self.weight_decay, 1.0 - b1, b2, 1.0 - b2, bc2_sqrt, self.cfg.eps,
                -step_size)

    def _update(self, params, grad, lr, grad_scale):
        xp, dt = self.xp, self.dtype.type
        scalars = self._scalars(lr, grad_scale)
        _, _, one_minus_b1, b2, one_minus_b2, bc2_sqrt, eps, neg_step_size = scalars
        m_all, v_all = self.state["exp_avg"], self.state["exp_avg_sq"]
        if self.fused:
            self.fused.adam_update(params, m_all, v_all, grad, *scalars)
            return
        for s in range(0, params.shape[0], CHUNK):
            p, g, m, v = params[s:s + CHUNK], grad[s:s + CHUNK], m_all[s:s + CHUNK], v_all[s:s + CHUNK]
            tmp = self._scratch[:p.shape[0]]
            if grad_scale != 1.0:
                g *= dt(grad_scale)
            if self.weight_decay:
                xp.multiply(p, dt(self.weight_decay), out=tmp)
                g += tmp
            xp.subtract(g, m, out=tmp)              # m.lerp_(g, 1 − β₁)
            tmp *= dt(one_minus_b1)
            m += tmp
            v *= dt(b2)                             # v.mul_(β₂).addcmul_(g, g, value=1 − β₂)
            xp.multiply(g, dt(one_minus_b2), out=tmp)
            tmp *= g
            v += tmp
            xp.sqrt(v, out=tmp)                     # denom = √v / √(1 − β₂ᵗ) + eps
            tmp /= dt(bc2_sqrt)
            tmp += dt(eps)
            xp.multiply(m, dt(neg_step_size), out=g)   # Θ.addcdiv_(m, denom, value=−step_size)
            g /= tmp
            p += g


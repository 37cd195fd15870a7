"""numba twins of the optimizers' updates over the flat buffers (``scaling.kernels: numba``).

One pass over Θ, ΔΘ and the optimizer's buffers where the NumPy reference makes one pass per
operation. Each kernel does its NumPy twin's float32 operations in the same order without
fast-math (no fused multiply-adds), so Θ and the buffers come out bit for bit equal
(``tests/optim/test_update_kernels.py``). Unlike the NumPy twins they leave ``grad`` intact. A branch
on a hyperparameter sits outside the loops, so each loop vectorizes. Importing this module
imports numba.
"""
from __future__ import annotations

import numpy as np

from ..kernels import jit


@jit()
def momentum_update(theta, velocity, grad, momentum, scale, decay):
    """``v = μ·v + scale·g − decay·Θ; Θ += v`` (``scale = −ε·grad_scale``, ``decay = ε·λ``)."""
    mu, sc, dc = np.float32(momentum), np.float32(scale), np.float32(decay)
    if decay != 0:
        for i in range(theta.shape[0]):
            v = velocity[i] * mu + (grad[i] * sc - dc * theta[i])
            velocity[i] = v
            theta[i] = theta[i] + v
    else:
        for i in range(theta.shape[0]):
            v = velocity[i] * mu + grad[i] * sc
            velocity[i] = v
            theta[i] = theta[i] + v


@jit()
def nesterov_update(theta, velocity, grad, momentum, scale, decay):
    """``g' = scale·g − decay·Θ; v = μ·v + g'; Θ += g' + μ·v``."""
    mu, sc, dc = np.float32(momentum), np.float32(scale), np.float32(decay)
    if decay != 0:
        for i in range(theta.shape[0]):
            g = grad[i] * sc - theta[i] * dc
            v = velocity[i] * mu + g
            velocity[i] = v
            theta[i] = (theta[i] + g) + v * mu
    else:
        for i in range(theta.shape[0]):
            g = grad[i] * sc
            v = velocity[i] * mu + g
            velocity[i] = v
            theta[i] = (theta[i] + g) + v * mu


@jit()
def adam_update(theta, exp_avg, exp_avg_sq, grad, grad_scale, weight_decay, one_minus_b1, b2,
                one_minus_b2, bc2_sqrt, eps, neg_step_size):
    """PyTorch's Adam step in :class:`~distffn.optim.adam.Adam`'s order of float32 operations."""
    gs = np.float32(grad_scale) if grad_scale != 1.0 else np.float32(1)   # g·1 = g exactly
    wd, omb1, fb2 = np.float32(weight_decay), np.float32(one_minus_b1), np.float32(b2)
    omb2, bc2, ep, nss = np.float32(one_minus_b2), np.float32(bc2_sqrt), np.float32(eps), np.float32(neg_step_size)
    if weight_decay != 0:
        for i in range(theta.shape[0]):
            p = theta[i]
            g = grad[i] * gs + p * wd
            m = exp_avg[i] + (g - exp_avg[i]) * omb1
            exp_avg[i] = m
            v = exp_avg_sq[i] * fb2 + (g * omb2) * g
            exp_avg_sq[i] = v
            theta[i] = p + (m * nss) / (np.sqrt(v) / bc2 + ep)
    else:
        for i in range(theta.shape[0]):
            g = grad[i] * gs
            m = exp_avg[i] + (g - exp_avg[i]) * omb1
            exp_avg[i] = m
            v = exp_avg_sq[i] * fb2 + (g * omb2) * g
            exp_avg_sq[i] = v
            theta[i] = theta[i] + (m * nss) / (np.sqrt(v) / bc2 + ep)

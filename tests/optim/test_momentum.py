"""Momentum SGD in the lectures' form, by hand and against the chunked kernels."""
from __future__ import annotations

import numpy as np
import pytest

from distffn.jobspec import OptimizerConfig
from distffn.optim import optimizer as optimizer_module
from distffn.optim.momentum import MomentumSGD, momentum_update_numpy


def momentum_sgd(mu, velocity):
    """MomentumSGD whose velocity buffer is ``velocity`` itself (so the test reads it)."""
    opt = MomentumSGD(OptimizerConfig(momentum=mu), velocity.shape[0], np, velocity.dtype)
    opt.state["velocity"] = velocity
    return opt


def test_momentum_one_and_two_steps_by_hand():
    theta = np.array([1.0, -2.0, 0.5])
    v = np.array([0.1, 0.2, -0.3])
    opt = momentum_sgd(0.9, v)
    # v' = 0.9 v - 0.1 * g/4 ; θ' = θ + v'
    opt.update(theta, np.array([4.0, -8.0, 2.0]), 0.1, 1 / 4)
    np.testing.assert_allclose(v, [-0.01, 0.38, -0.32], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(theta, [0.99, -1.62, 0.18], rtol=1e-12, atol=1e-15)
    # v'' = 0.9 v' - 0.05 * g2/2 ; θ'' = θ' + v''
    opt.update(theta, np.array([0.0, 4.0, -4.0]), 0.05, 1 / 2)
    np.testing.assert_allclose(v, [-0.009, 0.242, -0.188], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(theta, [0.981, -1.378, -0.008], rtol=1e-12, atol=1e-15)


def test_momentum_zero_is_plain_sgd():
    theta, v = np.array([1.0, 2.0]), np.array([5.0, -5.0])
    momentum_sgd(0.0, v).update(theta, np.array([2.0, 6.0]), 0.5, 1 / 2)
    np.testing.assert_allclose(v, [-0.5, -1.5], rtol=1e-15)
    np.testing.assert_allclose(theta, [0.5, 0.5], rtol=1e-15)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_momentum_update_numpy_chunked_equals_formula(dtype):
    n = 3 * 65536 + 17
    assert n > optimizer_module.CHUNK
    rng = np.random.default_rng(0)
    theta, v, g = (rng.normal(size=n).astype(dtype) for _ in range(3))
    mu, scale = 0.9, -0.01 / 32
    t64, v64, g64 = (a.astype(np.float64) for a in (theta, v, g))
    v_exp = mu * v64 + scale * g64
    t_exp = t64 + v_exp
    momentum_update_numpy(theta, v, g, mu, scale)
    tol = 1e-12 if dtype == np.float64 else 1e-6
    np.testing.assert_allclose(v, v_exp, rtol=tol, atol=tol)
    np.testing.assert_allclose(theta, t_exp, rtol=tol, atol=tol)


@pytest.mark.gpu
def test_momentum_kernel_matches_numpy(cupy):
    """The CUDA update equals the NumPy twin bit for bit, and both are the float64 update to
    float32 rounding. (The old CuPy ElementwiseKernel fused ``mu * v + scale * g`` into one
    multiply-add, rounding once where NumPy rounds twice: 68 of 196,625 entries differed.)"""
    rng = np.random.default_rng(0)
    n = 3 * 65536 + 17
    theta, v, g = (rng.standard_normal(n).astype(np.float32) for _ in range(3))
    mu, lr, grad_scale = 0.9, 0.05, 1 / 128
    t64, v64, g64 = (a.astype(np.float64) for a in (theta, v, g))
    opt = MomentumSGD(OptimizerConfig(momentum=mu), n, cupy)
    opt.state["velocity"] = dv = cupy.asarray(v)
    dt, dg = cupy.asarray(theta), cupy.asarray(g)
    opt.update(dt, dg, lr, grad_scale)
    momentum_update_numpy(theta, v, g.copy(), mu, -lr * grad_scale)
    np.testing.assert_array_equal(dv.get(), v)
    np.testing.assert_array_equal(dt.get(), theta)
    np.testing.assert_array_equal(dg.get(), g)                  # the kernel leaves ΔΘ intact
    # float64 reference. v' = fl(fl(v·fl(μ)) + fl(g·fl(s))): the constants μ and s = −ε/B
    # rounded to float32 (u = 2⁻²⁴ relative each), each product rounded (u), the sum rounded
    # (u), so |v'₃₂ − v'| ≤ 2u·(|μv| + |sg|) + u·|v'|; Θ' = fl(Θ + v') adds v's error and one
    # rounding: |Θ'₃₂ − Θ'| ≤ err(v') + u·|Θ'| (first order; a 1% margin covers the u² terms).
    u = 2.0 ** -24
    s = -lr * grad_scale
    v_exp = mu * v64 + s * g64
    t_exp = t64 + v_exp
    err_v = 1.01 * (2 * u * (np.abs(mu * v64) + np.abs(s * g64)) + u * np.abs(v_exp))
    err_t = err_v + 1.01 * u * np.abs(t_exp)
    assert np.all(np.abs(v - v_exp) <= err_v)
    assert np.all(np.abs(theta - t_exp) <= err_t)

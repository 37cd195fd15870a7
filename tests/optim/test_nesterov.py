"""Nesterov momentum: the lectures' notation, checked by hand and against PyTorch."""
from __future__ import annotations

import numpy as np
import pytest

from distffn.jobspec import OptimizerConfig
from distffn.optim import make_optimizer


def nesterov(mu, size, dtype=np.float64):
    return make_optimizer(OptimizerConfig(name="nesterov", momentum=mu), size, np, dtype)


def test_two_steps_by_hand():
    theta = np.array([1.0, -2.0])
    opt = nesterov(0.9, 2)
    # v1 = -0.1·g1/2 = [-0.1, 0.2]; Θ1 = Θ0 + 0.9·v1 − 0.1·g1/2 = [1 − 0.09 − 0.1, −2 + 0.18 + 0.2]
    opt.update(theta, np.array([2.0, -4.0]), 0.1, 1 / 2)
    np.testing.assert_allclose(opt.state["velocity"], [-0.1, 0.2], rtol=1e-12)
    np.testing.assert_allclose(theta, [0.81, -1.62], rtol=1e-12)
    # v2 = 0.9·v1 − 0.1·[1, 1] = [-0.19, 0.08]; Θ2 = Θ1 + 0.9·v2 − 0.1·[1, 1]
    opt.update(theta, np.array([1.0, 1.0]), 0.1)
    np.testing.assert_allclose(opt.state["velocity"], [-0.19, 0.08], rtol=1e-12)
    np.testing.assert_allclose(theta, [0.81 - 0.171 - 0.1, -1.62 + 0.072 - 0.1], rtol=1e-12)


def test_chunked_update_equals_the_formula():
    n = 3 * 65536 + 5
    rng = np.random.default_rng(0)
    theta, g = rng.standard_normal(n), rng.standard_normal(n)
    opt = nesterov(0.8, n)
    opt.state["velocity"][...] = v0 = rng.standard_normal(n)
    expect_v = 0.8 * v0 - 0.05 * g / 4
    expect_t = theta + 0.8 * expect_v - 0.05 * g / 4
    opt.update(theta, g.copy(), 0.05, 1 / 4)
    np.testing.assert_allclose(opt.state["velocity"], expect_v, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(theta, expect_t, rtol=1e-12, atol=1e-15)


def test_matches_pytorch_sgd_nesterov_at_a_constant_rate():
    torch = pytest.importorskip("torch", reason="pip install -e '.[dev]' installs torch for this check")
    rng = np.random.default_rng(3)
    theta0 = rng.standard_normal(5000)
    grads = [rng.standard_normal(5000) for _ in range(10)]
    p = torch.tensor(theta0.copy(), requires_grad=True)
    ref = torch.optim.SGD([p], lr=0.05, momentum=0.9, nesterov=True)
    opt, theta = nesterov(0.9, 5000), theta0.copy()
    for g in grads:
        p.grad = torch.tensor(g)
        ref.step()
        opt.update(theta, g.copy(), 0.05)
    np.testing.assert_allclose(theta, p.detach().numpy(), rtol=1e-12, atol=1e-13)

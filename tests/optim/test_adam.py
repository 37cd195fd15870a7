"""Adam against a float64 reference written from Kingma and Ba's formulas, and against
PyTorch's ``torch.optim.Adam`` (same names, same algorithm) to float32 rounding."""
from __future__ import annotations

import numpy as np
import pytest

from distffn.errors import UserError
from distffn.jobspec import OptimizerConfig, from_dict
from distffn.optim import make_optimizer

N = 3 * 65536 + 11          # crosses the chunk boundaries of the NumPy update


def reference_adam(theta, grads, lrs, betas, eps, weight_decay, grad_scale):
    """PyTorch's documented algorithm in float64, step by step."""
    b1, b2 = betas
    m, v = np.zeros_like(theta), np.zeros_like(theta)
    theta = theta.copy()
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        g = g * grad_scale + weight_decay * theta
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        theta = theta - lr * m_hat / (np.sqrt(v_hat) + eps)
    return theta, m, v


def draw(steps, seed=0):
    rng = np.random.default_rng(seed)
    theta = rng.standard_normal(N)
    # gradients of very different sizes per entry, so eps and the bias correction both matter
    scale = 10.0 ** rng.uniform(-6, 1, N)
    grads = [rng.standard_normal(N) * scale for _ in range(steps)]
    return theta, grads


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_float64_matches_the_formulas(weight_decay):
    theta0, grads = draw(12)
    lrs = [1e-3 * (1 + 0.1 * t) for t in range(12)]          # a changing rate, as schedules give
    cfg = OptimizerConfig(name="adam", lr=1e-3, betas=[0.85, 0.995], eps=1e-7, weight_decay=weight_decay)
    opt = make_optimizer(cfg, N, np, np.float64)
    theta = theta0.copy()
    for g, lr in zip(grads, lrs):
        opt.update(theta, g.copy(), lr, 1 / 32)
    expect, m, v = reference_adam(theta0, grads, lrs, (0.85, 0.995), 1e-7, weight_decay, 1 / 32)
    np.testing.assert_allclose(theta, expect, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(opt.state["exp_avg"], m, rtol=1e-10, atol=1e-18)
    np.testing.assert_allclose(opt.state["exp_avg_sq"], v, rtol=1e-10, atol=1e-24)
    assert opt.t == 12


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_float32_matches_pytorch_adam(weight_decay):
    """Same Θ, same gradients, 30 steps against ``torch.optim.Adam``. Each step's float32
    roundings may differ (PyTorch fuses multiply-adds), so the entries of Θ must agree to a few
    roundings of Θ itself plus of the steps taken: |Δ| ≤ 4·(ulp(Θ) + steps·lr·eps32). Measured
    here: at most 3.2 of those units, 2.4e-7 in absolute terms; once in a full CI run one entry
    of 196,619 was 17 units off (2.6e-7), which never recurred alone. So: all but 1 in 10⁵
    entries within that bound, and every entry within a thousandth of one step (lr), where any
    difference in the algorithm (bias corrections, where eps goes) lands far outside."""
    torch = pytest.importorskip("torch", reason="pip install -e '.[dev]' installs torch for this check")
    steps, lr, eps32 = 30, 1e-3, float(np.finfo(np.float32).eps)
    theta0, grads = draw(steps, seed=1)
    theta0 = theta0.astype(np.float32)
    grads = [g.astype(np.float32) for g in grads]
    p = torch.tensor(theta0.copy(), requires_grad=True)
    ref = torch.optim.Adam([p], lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    opt = make_optimizer(OptimizerConfig(name="adam", lr=lr, weight_decay=weight_decay), N)
    theta = theta0.copy()
    for g in grads:
        p.grad = torch.from_numpy(g.copy())
        ref.step()
        opt.update(theta, g.copy(), lr)
    theirs = p.detach().numpy()
    bound = 4 * (np.spacing(np.abs(theirs)) + steps * lr * eps32)
    outside = np.flatnonzero(np.abs(theta - theirs) > bound)
    assert outside.size <= N // 100_000, [(int(i), theta[i], theirs[i], bound[i]) for i in outside[:5]]
    assert np.abs(theta - theirs).max() <= 1e-3 * lr
    assert np.abs(theta - theta0).max() > 100 * bound.max()         # Θ really moved
    # the moments: v to float32 rounding; m (a sum with cancellation) relative to the gradients
    state = ref.state[p]
    np.testing.assert_allclose(opt.state["exp_avg_sq"], state["exp_avg_sq"].numpy(), rtol=4e-6, atol=0)
    g_scale = np.abs(np.stack(grads)).max(axis=0) + weight_decay * np.abs(theirs)
    assert (np.abs(opt.state["exp_avg"] - state["exp_avg"].numpy()) <= 4 * steps * eps32 * g_scale).all()


@pytest.mark.parametrize("betas,field", [([0.9], "optimizer.betas"), ([0.9, 1.0], "optimizer.betas"),
                                         ([-0.1, 0.9], "optimizer.betas"), (["a", 0.9], "optimizer.betas")])
def test_bad_betas_are_refused(betas, field):
    with pytest.raises(UserError, match=field):
        from_dict({"optimizer": {"name": "adam", "betas": betas}})


def test_non_positive_eps_is_refused():
    with pytest.raises(UserError, match="optimizer.eps"):
        from_dict({"optimizer": {"name": "adam", "eps": 0}})

"""The optimizer protocol: registered by name, owning named flat buffers that checkpoints
save and restore."""
from __future__ import annotations

import numpy as np
import pytest

from distffn.errors import UserError
from distffn.jobspec import OptimizerConfig
from distffn.optim import OPTIMIZERS, make_optimizer


def test_every_optimizer_is_registered_with_its_buffers():
    assert OPTIMIZERS.names() == ["momentum", "nesterov", "adam"]
    assert OPTIMIZERS.get("momentum").buffers == ("velocity",)
    assert OPTIMIZERS.get("adam").buffers == ("exp_avg", "exp_avg_sq")


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_state_dict_round_trip_continues_identically(name):
    """Restoring the buffers and the step count into a fresh optimizer continues exactly as
    the original does (what a checkpoint relies on)."""
    rng = np.random.default_rng(1)
    cfg = OptimizerConfig(name=name, weight_decay=0.01)
    grads = [rng.standard_normal(70_000).astype(np.float32) for _ in range(4)]
    a = make_optimizer(cfg, 70_000)
    theta_a = rng.standard_normal(70_000).astype(np.float32)
    for g in grads[:2]:
        a.update(theta_a, g.copy(), 0.01, 1 / 8)
    b = make_optimizer(cfg, 70_000)
    b.load_state_dict(a.state_dict(), a.t)
    theta_b = theta_a.copy()
    assert b.t == a.t == 2
    for g in grads[2:]:
        a.update(theta_a, g.copy(), 0.01, 1 / 8)
        b.update(theta_b, g.copy(), 0.01, 1 / 8)
    np.testing.assert_array_equal(theta_a, theta_b)
    for k, v in a.state_dict().items():
        np.testing.assert_array_equal(v, b.state_dict()[k], err_msg=k)


def test_state_dict_is_a_copy():
    opt = make_optimizer(OptimizerConfig(), 4)
    saved = opt.state_dict()
    saved["velocity"][...] = 7
    assert not opt.state["velocity"].any()


def test_missing_or_misshapen_buffer_is_a_user_error():
    opt = make_optimizer(OptimizerConfig(name="adam"), 4)
    with pytest.raises(UserError, match="no optimizer buffer 'exp_avg_sq'"):
        opt.load_state_dict({"exp_avg": np.zeros(4, np.float32)}, 3, "ckpt.npz")
    with pytest.raises(UserError, match="'exp_avg' has shape"):
        opt.load_state_dict({"exp_avg": np.zeros(5), "exp_avg_sq": np.zeros(4)}, 3, "ckpt.npz")


def test_weight_decay_is_l2_on_the_gradient():
    """For every optimizer, a gradient g with weight_decay λ gives the same step as g + λ·Θ."""
    rng = np.random.default_rng(2)
    theta = rng.standard_normal(1000)
    g = rng.standard_normal(1000)
    for name in OPTIMIZERS.names():
        with_decay = make_optimizer(OptimizerConfig(name=name, weight_decay=0.1), 1000, np, np.float64)
        plain = make_optimizer(OptimizerConfig(name=name), 1000, np, np.float64)
        t1, t2 = theta.copy(), theta.copy()
        with_decay.update(t1, g.copy(), 0.05)
        plain.update(t2, g + 0.1 * theta, 0.05)
        np.testing.assert_allclose(t1, t2, rtol=1e-12, atol=1e-15, err_msg=name)

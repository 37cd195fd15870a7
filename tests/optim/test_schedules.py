"""Learning-rate schedules and warmup."""
from __future__ import annotations

import math

import numpy as np
import pytest

from distffn.jobspec import OptimizerConfig
from distffn.optim.schedules import learning_rate


@pytest.mark.parametrize("t", [0, 1, 2, 5, 10, 100, 12345])
def test_inverse_time_schedule(t):
    cfg = OptimizerConfig(lr=0.1, schedule="inverse_time", decay=0.5)
    assert learning_rate(cfg, t, 100000) == pytest.approx(0.1 / (1 + 0.5 * t), rel=1e-15)


def test_step_schedule():
    cfg = OptimizerConfig(lr=0.1, schedule="step", gamma=0.5, step_size=3)
    expected = [0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025, 0.025, 0.025, 0.0125]
    got = [learning_rate(cfg, t, 100) for t in range(10)]
    np.testing.assert_allclose(got, expected, rtol=1e-14)


def test_cosine_schedule():
    cfg = OptimizerConfig(lr=0.1, schedule="cosine", min_lr=0.01)
    total = 100
    assert learning_rate(cfg, 0, total) == pytest.approx(0.1, rel=1e-14)
    assert learning_rate(cfg, total // 2, total) == pytest.approx((0.1 + 0.01) / 2, rel=1e-14)
    assert learning_rate(cfg, total, total) == pytest.approx(0.01, rel=1e-14)
    # a quarter of the way: cos(pi/4) = sqrt(2)/2
    assert learning_rate(cfg, 25, total) == pytest.approx(0.01 + 0.09 * 0.5 * (1 + math.sqrt(0.5)), rel=1e-14)
    rates = [learning_rate(cfg, t, total) for t in range(total + 1)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))   # never increases
    assert min(rates) >= 0.01 - 1e-15


def test_constant_schedule_with_linear_warmup():
    cfg = OptimizerConfig(lr=0.1, schedule="constant", warmup_steps=4)
    got = [learning_rate(cfg, t, 100) for t in range(7)]
    np.testing.assert_allclose(got, [0.025, 0.05, 0.075, 0.1, 0.1, 0.1, 0.1], rtol=1e-14)


def test_warmup_multiplies_other_schedules():
    cfg = OptimizerConfig(lr=0.1, schedule="inverse_time", decay=0.5, warmup_steps=4)
    assert learning_rate(cfg, 1, 100) == pytest.approx(0.1 / 1.5 * 2 / 4, rel=1e-14)
    assert learning_rate(cfg, 4, 100) == pytest.approx(0.1 / 3.0, rel=1e-14)


def test_constant_schedule():
    cfg = OptimizerConfig(lr=0.03)
    assert all(learning_rate(cfg, t, 50) == 0.03 for t in (0, 1, 49, 50, 1000))

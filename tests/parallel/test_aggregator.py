"""The aggregator: Θ and the optimizer; ΔΘ summed over B samples becomes one update of size 1/B."""
from __future__ import annotations

import numpy as np

from distffn.jobspec import OptimizerConfig
from distffn.parallel.aggregator import Aggregator


def test_the_update_divides_the_sum_by_the_global_batch():
    theta = np.array([1.0, 2.0], np.float32)
    agg = Aggregator(OptimizerConfig(momentum=0.0), theta, None, 0)
    out = agg.apply(np.array([4.0, -8.0], np.float32), 4, 0.5)          # mean gradient [1, -2]
    np.testing.assert_allclose(out, [0.5, 3.0])
    assert agg.step == 1
    assert theta[0] == 1.0                                               # its own copy of Θ


def test_state_round_trip_restores_the_step_and_the_buffers():
    cfg = OptimizerConfig(name="adam")
    a = Aggregator(cfg, np.zeros(3, np.float32), None, 0)
    a.apply(np.ones(3, np.float32), 1, 0.1)
    theta, state = a.state()
    b = Aggregator(cfg, theta, state, a.step)
    for agg in (a, b):
        agg.apply(np.full(3, 2.0, np.float32), 2, 0.1)
    np.testing.assert_array_equal(a.theta, b.theta)
    assert b.step == 2 and set(state) == {"exp_avg", "exp_avg_sq"}

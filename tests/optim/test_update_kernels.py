"""The numba twins of the optimizer updates: bit for bit equal to the NumPy updates."""
from __future__ import annotations

import numpy as np
import pytest

from distffn.jobspec import OptimizerConfig
from distffn.optim import make_optimizer

pytest.importorskip("numba")


@pytest.mark.parametrize("name,extra", [
    ("momentum", {}), ("momentum", {"weight_decay": 1e-3}),
    ("nesterov", {}), ("nesterov", {"weight_decay": 1e-3}),
    ("adam", {}), ("adam", {"weight_decay": 1e-2, "betas": [0.8, 0.99]}),
])
def test_update_equals_numpy_twin_bit_for_bit(name, extra):
    n = 100_003
    rng = np.random.default_rng(0)
    cfg = OptimizerConfig(name=name, **extra)
    theta0 = rng.standard_normal(n).astype(np.float32)
    grads = [(rng.standard_normal(n) * 10.0 ** rng.uniform(-6, 1, n)).astype(np.float32) for _ in range(4)]
    grads[0][:10] = 0.0
    result = {}
    for kernels in ("numpy", "numba"):
        opt = make_optimizer(cfg, n, kernels=kernels)
        assert (opt.fused is not None) == (kernels == "numba")
        theta = theta0.copy()
        for step, g in enumerate(grads):
            lr, scale = 0.05 / (step + 1), (1.0 if step == 1 else 1 / 128)   # scale 1: Adam's skipped multiply
            opt.update(theta, g.copy(), lr, scale)
        result[kernels] = theta, opt.state_dict()
    (t0, s0), (t1, s1) = result["numpy"], result["numba"]
    np.testing.assert_array_equal(t1, t0)
    for key in s0:
        np.testing.assert_array_equal(s1[key], s0[key])


def test_numba_kernels_need_float32_numpy_buffers():
    assert make_optimizer(OptimizerConfig(), 10, np, np.float64, kernels="numba").fused is None

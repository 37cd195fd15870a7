"""GPU workers against their CPU twins. Run with `pytest -m gpu` on a machine with CuPy and a
CUDA GPU; everywhere else these are skipped (and the CPU suite never imports CuPy)."""
from __future__ import annotations

import numpy as np
import pytest

cupy = pytest.importorskip("cupy")
try:
    HAVE_GPU = cupy.cuda.runtime.getDeviceCount() > 0
except Exception:
    HAVE_GPU = False
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAVE_GPU, reason="no CUDA GPU")]

from distffn.config import from_dict                    # noqa: E402
from distffn.optimizer import momentum_update_numpy     # noqa: E402
from distffn.trainer import Trainer                      # noqa: E402


def test_momentum_kernel_matches_numpy():
    from distffn.kernels import momentum_update_cupy
    rng = np.random.default_rng(0)
    n = 3 * 65536 + 17
    theta, v, g = (rng.standard_normal(n).astype(np.float32) for _ in range(3))
    dt, dv, dg = cupy.asarray(theta), cupy.asarray(v), cupy.asarray(g)
    momentum_update_cupy(dt, dv, dg, 0.9, -0.05 / 128)
    momentum_update_numpy(theta, v, g.copy(), 0.9, -0.05 / 128)
    np.testing.assert_allclose(dt.get(), theta, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dv.get(), v, rtol=1e-6, atol=1e-7)


JOB = {"name": "gpu", "data": {"dataset": "digits"},
       "model": {"layers": [64, 128, 10], "activation": "relu"},
       "optimizer": {"lr": 0.05, "momentum": 0.9}, "training": {"epochs": 3, "batch_size": 64}}


def run(tmp_path, use_gpu):
    job = from_dict(dict(JOB, scaling={"use_gpu": use_gpu}))
    return Trainer(job, str(tmp_path / ("gpu" if use_gpu else "cpu")), progress=False,
                   echo=lambda s: None).run()


def test_training_on_gpu_matches_cpu(tmp_path):
    from distffn import checkpoint as ckpt
    gpu, cpu = run(tmp_path, True), run(tmp_path, False)
    assert abs(gpu["test_accuracy"] - cpu["test_accuracy"]) <= 0.01
    a = ckpt.newest_valid_checkpoint(str(tmp_path / "gpu" / "checkpoints"))[1]
    b = ckpt.newest_valid_checkpoint(str(tmp_path / "cpu" / "checkpoints"))[1]
    for name in b:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-3, atol=1e-4, err_msg=name)

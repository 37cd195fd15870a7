"""The numba gather of 8-bit rows against ByteImages' NumPy take: bit for bit."""
from __future__ import annotations

import numpy as np
import pytest

from distffn.data.byte_images import ByteImages

pytest.importorskip("numba")
from distffn.data.gather_kernels import take_rows  # noqa: E402  (imports numba)


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (0.2860, 0.3530), (-3.0, 1e-3)])
def test_take_rows_equals_numpy(mean, std):
    rng = np.random.default_rng(0)
    x = ByteImages(rng.integers(0, 256, (300, 784), dtype=np.uint8), mean, std)
    x.codes[0, :256] = np.arange(256)                 # every code at least once
    idx = np.concatenate([[0], rng.integers(0, 300, 127)])
    want, got = np.empty((128, 784), np.float32), np.empty((128, 784), np.float32)
    x.take(idx, want)
    x.take(idx, got, take_rows)
    np.testing.assert_array_equal(got, want)

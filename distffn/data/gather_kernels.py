"""numba twin of :meth:`ByteImages.take <distffn.data.byte_images.ByteImages.take>`
(``scaling.kernels: numba``): gather rows of 8-bit codes and decode them through the table
in one pass (three float32 operations a pixel, vectorized), where NumPy gathers the codes,
then looks every one up in a table. Importing this module
imports numba; tests: ``tests/data/test_gather_kernels.py``.
"""
from __future__ import annotations

import numpy as np

from ..kernels import jit


@jit()
def take_rows(codes, mean, std, idx, out):
    """``out[r] = (codes[idx[r]] / 255 − mean) / std`` for every row ``r`` of ``out``, in the
    float32 operations that give ``ByteImages``' table."""
    d = codes.shape[1]
    m, s, k = np.float32(mean), np.float32(std), np.float32(255)
    for r in range(idx.shape[0]):
        row = codes[idx[r]]
        for j in range(d):
            out[r, j] = (np.float32(row[j]) / k - m) / s

"""8-bit images kept as bytes: the values of the dense float32 pipeline, bit for bit."""
from __future__ import annotations

import numpy as np
import pytest

from distffn.data.byte_images import ByteImages, dense


def codes(n=50, d=12, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, d), dtype=np.uint8)


def dense_pipeline(c, mean, std):
    """What the loader computed before: c / 255 in float32, then (x − mean) / std in place."""
    x = np.divide(c, np.float32(255), dtype=np.float32)
    x -= np.float32(mean)
    x /= np.float32(std)
    return x


def test_reads_as_the_float32_array_it_stands_for():
    c = codes()
    x = ByteImages(c)
    assert x.shape == (50, 12) and len(x) == 50 and x.dtype == np.float32 and x.ndim == 2
    np.testing.assert_array_equal(np.asarray(x), dense_pipeline(c, 0, 1))
    assert isinstance(x[10:20], ByteImages) and np.array_equal(np.asarray(x[10:20]), np.asarray(x)[10:20])
    assert x.copy().codes.base is None and dense(x).dtype == np.float32
    with pytest.raises(TypeError):
        x[3]
    with pytest.raises(ValueError):
        ByteImages(c.astype(np.int16))


def test_statistics_and_standardize_equal_the_dense_pipeline():
    c = codes(2000, 30)
    x = ByteImages(c)
    d = dense_pipeline(c, 0, 1)
    mean, std = x.mean_std()
    assert mean == pytest.approx(d.mean(dtype=np.float64), rel=1e-12)
    assert std == pytest.approx(d.std(dtype=np.float64), rel=1e-6)
    x.standardize(np.float32(mean), np.float32(std))
    np.testing.assert_array_equal(np.asarray(x), dense_pipeline(c, mean, std))
    with pytest.raises(ValueError, match="already"):
        x.standardize(np.float32(0), np.float32(1))


def test_take_decodes_rows_into_the_buffer():
    c = codes()
    x = ByteImages(c, 0.3, 0.35)
    idx = np.array([4, 0, 49, 4])
    out = np.empty((4, 12), np.float32)
    x.take(idx, out)
    np.testing.assert_array_equal(out, dense_pipeline(c, 0.3, 0.35)[idx])

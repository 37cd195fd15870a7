"""Seeded, stratified splits."""
from __future__ import annotations

import numpy as np

from distffn.data.dataset import stratified_split
from distffn.data.load import load_dataset
from distffn.jobspec import DataConfig


def test_digits_stratified_split():
    from sklearn.datasets import load_digits

    ds = load_dataset(DataConfig(dataset="digits", normalize=False), seed=0)
    target = load_digits().target
    train, test = stratified_split(target, 0.25, seed=3)
    assert len(np.intersect1d(train, test)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(1797))
    for c in range(10):
        count = np.sum(target == c)
        assert abs(np.sum(target[test] == c) - 0.25 * count) <= 1
    again = stratified_split(target, 0.25, seed=3)
    np.testing.assert_array_equal(train, again[0])
    np.testing.assert_array_equal(test, again[1])
    assert not np.array_equal(np.sort(test), np.sort(stratified_split(target, 0.25, seed=4)[1]))
    # Through load_dataset: digits scaled to [0, 1], split 80/20 by default.
    assert ds.x_train.shape == (1438, 64) and ds.x_test.shape == (359, 64)
    assert 0 <= ds.x_train.min() and ds.x_train.max() <= 1 and ds.image_shape == (8, 8)


def test_same_seed_same_split():
    a, b, c = (load_dataset(DataConfig(dataset="breast-cancer"), seed=s) for s in (5, 5, 6))
    np.testing.assert_array_equal(a.x_test, b.x_test)
    assert not np.array_equal(a.x_test, c.x_test)

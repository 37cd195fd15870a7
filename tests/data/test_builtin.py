"""The datasets that need no files."""
from __future__ import annotations

import numpy as np

from distffn.data.load import load_dataset
from distffn.jobspec import DataConfig


def test_xor_never_normalized():
    ds = load_dataset(DataConfig(dataset="xor", normalize=True), seed=0)
    np.testing.assert_array_equal(ds.x_train, [[0, 0], [0, 1], [1, 0], [1, 1]])
    np.testing.assert_array_equal(ds.x_test, ds.x_train)
    np.testing.assert_array_equal(ds.y_train, [0, 1, 1, 0])
    assert ds.y_train.dtype == np.int64 and ds.num_classes == 2 and ds.kind == "classification"
    assert ds.normalization == {}


def test_sine():
    ds = load_dataset(DataConfig(dataset="sine", normalize=False), seed=0)
    assert ds.kind == "regression" and ds.num_classes is None
    assert ds.x_train.shape == (800, 1) and ds.y_train.shape == (800, 1) and ds.x_test.shape == (200, 1)
    assert ds.y_train.dtype == np.float32
    assert 0 <= ds.x_train.min() and ds.x_train.max() <= 2 * np.pi
    np.testing.assert_allclose(ds.y_train, np.sin(ds.x_train), atol=1e-6)
    norm = load_dataset(DataConfig(dataset="sine"), seed=0)
    assert abs(norm.x_train.mean()) < 1e-5 and abs(norm.x_train.std() - 1) < 1e-4
    np.testing.assert_array_equal(norm.y_train, ds.y_train)  # targets stay sin(x)
    assert set(norm.normalization) == {"x_mean", "x_std"}


def test_breast_cancer_and_diabetes():
    bc = load_dataset(DataConfig(dataset="breast-cancer"), seed=0)
    assert bc.kind == "classification" and bc.num_classes == 2 and bc.num_features == 30
    assert len(bc.x_train) + len(bc.x_test) == 569 and bc.image_shape is None
    np.testing.assert_allclose(bc.x_train.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(bc.x_train.std(axis=0), 1, atol=1e-4)
    db = load_dataset(DataConfig(dataset="diabetes"), seed=0)
    assert db.kind == "regression" and db.num_classes is None and db.num_features == 10
    assert db.y_train.shape == (len(db.x_train), 1) and db.y_train.dtype == np.float32
    assert len(db.x_train) + len(db.x_test) == 442
    assert abs(db.y_train.mean()) < 1e-5 and abs(db.y_train.std() - 1) < 1e-4
    assert len(db.normalization["y_mean"]) == 1 and db.normalization["y_std"][0] > 10

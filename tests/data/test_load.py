"""Loading by name: checks, limit_train and normalisation."""
from __future__ import annotations

import numpy as np
import pytest

from distffn.data.load import load_dataset
from distffn.errors import UserError
from distffn.jobspec import DataConfig

from helpers import npz_job, user_error


def test_nan_in_the_data(tmp_path, capsys):
    x = np.ones((40, 3), np.float32)
    x[3, 1] = np.nan
    user_error(capsys, ["run", npz_job(tmp_path, x_train=x)], "x_train", "NaN")


def test_limit_train():
    ds = load_dataset(DataConfig(dataset="digits", limit_train=100), seed=0)
    full = load_dataset(DataConfig(dataset="digits", normalize=False), seed=0)
    assert ds.x_train.shape == (100, 64) and ds.y_train.shape == (100,) and len(ds.x_test) == 359
    np.testing.assert_array_equal(ds.y_train, full.y_train[:100])
    assert abs(ds.x_train.mean()) < 1e-5  # statistics from the kept 100 samples
    assert ds.x_train.base is None  # a copy: the full training array is not kept alive


def test_unknown_dataset():
    with pytest.raises(UserError, match=r"data.dataset: expected one of digits, .*npz; got 'cifar'"):
        load_dataset(DataConfig(dataset="cifar"), seed=0)

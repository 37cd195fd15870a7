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


def test_validation_split_is_carved_from_training_stratified_and_normalised_with_training_stats():
    full = load_dataset(DataConfig(dataset="digits", normalize=False), seed=0)
    ds = load_dataset(DataConfig(dataset="digits", normalize=False, validation_fraction=0.2), seed=0)
    n = len(full.x_train)
    assert len(ds.x_val) + len(ds.x_train) == n and abs(len(ds.x_val) - 0.2 * n) <= 10
    np.testing.assert_array_equal(ds.x_test, full.x_test)            # the test split is untouched
    rows = {r.tobytes() for r in full.x_train}
    assert all(r.tobytes() in rows for r in ds.x_val)                  # carved from training ...
    assert not {r.tobytes() for r in ds.x_val} & {r.tobytes() for r in ds.x_train}   # ... and removed
    share = np.bincount(ds.y_val, minlength=10) / len(ds.y_val)
    assert np.abs(share - np.bincount(full.y_train, minlength=10) / n).max() < 0.02   # stratified
    norm = load_dataset(DataConfig(dataset="digits", validation_fraction=0.2), seed=0)
    assert abs(norm.x_train.mean()) < 1e-5 and abs(norm.x_val.mean()) > 1e-4      # training statistics
    # the same validation split whatever limit_train keeps of the rest
    limited = load_dataset(DataConfig(dataset="digits", normalize=False, validation_fraction=0.2, limit_train=100), 0)
    np.testing.assert_array_equal(limited.x_val, ds.x_val)
    assert len(limited.x_train) == 100


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_validation_fraction_out_of_range_is_refused(tmp_path, capsys, fraction):
    from helpers import write_job
    user_error(capsys, ["run", write_job(tmp_path, data={"dataset": "digits", "validation_fraction": fraction})],
               "data.validation_fraction", "[0, 1)")

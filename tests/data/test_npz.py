"""The user's own .npz arrays, checked key by key."""
from __future__ import annotations

import io
import time
import zipfile

import numpy as np
import pytest

from distffn.errors import UserError

from helpers import load_npz, npz


def test_npz_normalization_uses_train_statistics(tmp_path):
    rng = np.random.default_rng(1)
    x_train = rng.normal(5, 2, (200, 3))
    path = npz(tmp_path, x_train=x_train, x_test=rng.normal(50, 2, (50, 3)),
               y_train=rng.normal(3, 1, 200), y_test=rng.normal(30, 1, 50))
    ds = load_npz(path)
    assert ds.kind == "regression" and ds.y_train.shape == (200, 1)
    np.testing.assert_allclose(ds.x_train.mean(axis=0), 0, atol=1e-5)
    assert np.all(ds.x_test.mean(axis=0) > 10)
    assert abs(ds.y_train.mean()) < 1e-5 and ds.y_test.mean() > 10
    np.testing.assert_allclose(ds.normalization["x_mean"], x_train.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(ds.normalization["x_std"], x_train.std(axis=0), rtol=1e-5)


def test_npz_classification_and_1d_x(tmp_path):
    ds = load_npz(npz(tmp_path, x_train=np.arange(20.0), x_test=np.arange(10.0),
                      y_test=np.array([0] * 9 + [7])), normalize=False)
    assert ds.kind == "classification" and ds.num_classes == 8
    assert ds.x_train.shape == (20, 1) and ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert ds.image_shape is None and ds.class_names is None


def test_npz_constant_feature(tmp_path):
    x = np.random.default_rng(0).normal(size=(20, 3))
    x[:, 1] = 4.0
    ds = load_npz(npz(tmp_path, x_train=x))
    np.testing.assert_array_equal(ds.x_train[:, 1], 0)
    assert ds.normalization["x_std"][1] == 1.0


@pytest.mark.parametrize("arrays, pattern", [
    (dict(y_test=None), "d.npz: missing key 'y_test'"),
    (dict(x_train=np.r_[[[1.0, np.nan, 0], [-np.inf, 2.0, np.nan]], np.zeros((18, 3))]),
     r"d.npz: x_train contains NaN or inf \(3 values\)"),
    (dict(y_train=np.r_[np.ones(19), np.inf], y_test=np.ones(10)), "d.npz: y_train contains NaN or inf"),
    (dict(y_test=np.array([0, 1, -1, 0, 0, 0, 0, 0, 0, 0])), "d.npz: y_test: negative class label -1"),
    (dict(y_train=np.zeros(19, int)), "d.npz: x_train has 20 rows but y_train has 19"),
    (dict(x_test=np.zeros((10, 4))), "d.npz: x_train has 3 features but x_test has 4"),
    (dict(x_train=np.zeros((20, 3, 2))), "d.npz: x_train: expected a 2-D array"),
    (dict(y_train=np.zeros((20, 2), int)), "d.npz: y_train: expected 1-D integer class labels"),
    (dict(y_test=np.zeros(10)), "y_train is int64 but y_test is float64"),
    (dict(x_train=np.array([{"a": 1}] * 20, dtype=object)),
     "d.npz: x_train: cannot be loaded without pickle"),
])
def test_npz_errors(tmp_path, arrays, pattern):
    with pytest.raises(UserError, match=pattern):
        load_npz(npz(tmp_path, **arrays))


def test_npz_bad_files(tmp_path):
    with pytest.raises(UserError, match="data.path: .*nope.npz: no such file"):
        load_npz(str(tmp_path / "nope.npz"))
    text = tmp_path / "text.npz"
    text.write_text("not a zip file at all")
    with pytest.raises(UserError, match="text.npz: not an .npz archive"):
        load_npz(str(text))
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    with pytest.raises(UserError, match="single.npy: holds a single array"):
        load_npz(str(single))
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match="empty.npz: not an .npz archive"):
        load_npz(str(empty))


def test_a_header_that_claims_more_than_the_file_holds_is_refused(tmp_path):
    """An .npy header promising 10^13 floats in a few bytes: refused from the header, before
    anything is allocated."""
    path = npz(tmp_path, x_train=np.zeros((4, 2), np.float32), y_train=np.zeros(4, np.int64),
               x_test=np.zeros((4, 2), np.float32), y_test=np.zeros(4, np.int64))
    with zipfile.ZipFile(path) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (10**13,)})
    entries["x_train.npy"] = header.getvalue() + b"\0" * 32
    with zipfile.ZipFile(path, "w") as z:
        for name, blob in entries.items():
            z.writestr(name, blob)
    t0 = time.monotonic()
    with pytest.raises(UserError, match=r"x_train: its header claims shape \(10000000000000,\) of float32 "
                                        r"\(40,000,000,000,000 bytes\), but the entry holds 32 bytes"):
        load_npz(path)
    assert time.monotonic() - t0 < 1

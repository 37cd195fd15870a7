"""Tests for distffn.data: IDX reading, file search, splits, normalization, npz checks."""
import gzip
import os
import struct

import numpy as np
import pytest

from distffn import data
from distffn.config import DataConfig
from distffn.data import URLS, load_dataset, read_idx, stratified_split
from distffn.errors import UserError

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
IMAGES, LABELS = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"
T_IMAGES, T_LABELS = "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"


def idx_bytes(arr: np.ndarray) -> bytes:
    assert arr.dtype == np.uint8
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.tobytes()


def write(path, payload: bytes, gz: bool):
    path = str(path) + (".gz" if gz else "")
    with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
        f.write(payload)
    return path


def write_mnist(folder, n_train=5, n_test=3, gz=False, seed=0):
    """Four tiny IDX files; returns the raw arrays."""
    rng = np.random.default_rng(seed)
    arrays = {IMAGES: rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
              LABELS: rng.integers(0, 10, n_train, dtype=np.uint8),
              T_IMAGES: rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
              T_LABELS: rng.integers(0, 10, n_test, dtype=np.uint8)}
    os.makedirs(folder, exist_ok=True)
    for name, arr in arrays.items():
        write(os.path.join(folder, name), idx_bytes(arr), gz)
    return arrays


@pytest.fixture
def no_system_data(tmp_path, monkeypatch):
    """Point the system folder and $DISTFFN_DATA at empty folders."""
    empty = tmp_path / "system"
    empty.mkdir()
    monkeypatch.setattr(data, "SYSTEM_DATA_DIR", str(empty))
    monkeypatch.delenv("DISTFFN_DATA", raising=False)
    return empty


def mnist(path, **kw):
    return load_dataset(DataConfig(dataset="mnist", path=str(path), **kw), seed=0)


# ---------------------------------------------------------------- IDX

@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, no_system_data, gz):
    raw = write_mnist(tmp_path / "m", gz=gz)
    ds = mnist(tmp_path / "m", normalize=False)
    assert ds.kind == "classification" and ds.image_shape == (28, 28)
    assert ds.x_train.dtype == np.float32 and ds.x_train.flags.c_contiguous
    assert ds.x_train.shape == (5, 784) and ds.x_test.shape == (3, 784)
    np.testing.assert_array_equal(ds.x_train, raw[IMAGES].reshape(5, -1).astype(np.float32) / 255)
    np.testing.assert_array_equal(ds.x_test, raw[T_IMAGES].reshape(3, -1).astype(np.float32) / 255)
    assert ds.y_train.dtype == np.int64
    np.testing.assert_array_equal(ds.y_train, raw[LABELS])
    np.testing.assert_array_equal(ds.y_test, raw[T_LABELS])
    assert ds.num_classes == max(raw[LABELS].max(), raw[T_LABELS].max()) + 1
    assert ds.normalization == {}


def test_read_idx_other_dtype(tmp_path):
    arr = np.arange(6, dtype=">i4").reshape(2, 3)
    path = write(tmp_path / "a.idx", bytes([0, 0, 0x0C, 2]) + struct.pack(">2I", 2, 3) + arr.tobytes(), False)
    np.testing.assert_array_equal(read_idx(path), np.arange(6).reshape(2, 3))


def test_bad_magic(tmp_path, no_system_data):
    write_mnist(tmp_path)
    # A labels file where the images file should be.
    write(tmp_path / IMAGES, idx_bytes(np.zeros(5, np.uint8)), False)
    with pytest.raises(UserError, match=f"{IMAGES}.*magic number 0x00000801, expected 0x00000803"):
        mnist(tmp_path)


def test_not_idx_at_all(tmp_path):
    path = write(tmp_path / "x", b"hello world, not idx", False)
    with pytest.raises(UserError, match="x: bad magic number"):
        read_idx(path)


@pytest.mark.parametrize("gz", [False, True])
def test_truncated(tmp_path, no_system_data, gz):
    write_mnist(tmp_path, gz=gz)
    payload = idx_bytes(np.zeros((5, 28, 28), np.uint8))[:-100]
    write(tmp_path / IMAGES, payload, gz)
    expected, actual = 16 + 5 * 784, 16 + 5 * 784 - 100
    with pytest.raises(UserError, match=rf"{IMAGES}.*truncated.*expected {expected} .*found {actual}"):
        mnist(tmp_path)


def test_trailing_bytes(tmp_path):
    path = write(tmp_path / "l", idx_bytes(np.zeros(3, np.uint8)) + b"\0", False)
    with pytest.raises(UserError, match="longer than its header says"):
        read_idx(path)


def test_corrupt_gzip(tmp_path, no_system_data):
    write_mnist(tmp_path, gz=True)
    path = str(tmp_path / (LABELS + ".gz"))
    good = open(path, "rb").read()
    with open(path, "wb") as f:  # cut off the end of the deflate stream
        f.write(good[: len(good) // 2])
    with pytest.raises(UserError, match=f"{LABELS}.gz: corrupt gzip"):
        mnist(tmp_path)
    with open(path, "wb") as f:  # not gzip at all
        f.write(b"plain text, no gzip header")
    with pytest.raises(UserError, match=f"{LABELS}.gz: corrupt gzip"):
        mnist(tmp_path)


def test_count_mismatch(tmp_path, no_system_data):
    write_mnist(tmp_path)
    write(tmp_path / LABELS, idx_bytes(np.zeros(4, np.uint8)), False)
    with pytest.raises(UserError, match=f"{IMAGES}: 5 images but .*{LABELS} has 4 labels"):
        mnist(tmp_path)


def test_missing_files_lists_folders_and_url(tmp_path, no_system_data, monkeypatch):
    env = tmp_path / "env"
    monkeypatch.setenv("DISTFFN_DATA", str(env))
    given = tmp_path / "given"
    given.mkdir()
    write(given / IMAGES, idx_bytes(np.zeros((1, 28, 28), np.uint8)), False)  # one of four
    with pytest.raises(UserError) as e:
        load_dataset(DataConfig(dataset="fashion-mnist", path=str(given)), seed=0)
    msg = str(e.value)
    for folder in (given, env / "fashion-mnist", no_system_data / "fashion-mnist"):
        assert str(folder) in msg
    assert f"missing {LABELS}" in msg
    assert URLS["fashion-mnist"] in msg and "apt-get install dataset-fashion-mnist" in msg

    with pytest.raises(UserError) as e:
        load_dataset(DataConfig(dataset="mnist"), seed=0)
    assert URLS["mnist"] in str(e.value) and "apt-get" not in str(e.value)
    assert str(env / "mnist") in str(e.value)


def test_path_beats_env(tmp_path, no_system_data, monkeypatch):
    mine = write_mnist(tmp_path / "mine", n_train=4, seed=1)
    write_mnist(tmp_path / "env" / "mnist", n_train=7, seed=2)
    monkeypatch.setenv("DISTFFN_DATA", str(tmp_path / "env"))
    ds = mnist(tmp_path / "mine", normalize=False)
    np.testing.assert_array_equal(ds.y_train, mine[LABELS])
    # Without data.path, $DISTFFN_DATA/<name> is used; it beats the system folder.
    write_mnist(no_system_data / "mnist", n_train=9)
    assert len(load_dataset(DataConfig(dataset="mnist"), seed=0).x_train) == 7


def test_real_fashion_mnist():
    if not os.path.isdir(FASHION_DIR):
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    ds = load_dataset(DataConfig(dataset="fashion-mnist"), seed=0)
    assert ds.x_train.shape == (60000, 784) and ds.x_test.shape == (10000, 784)
    assert ds.x_train.dtype == np.float32 and ds.x_train.flags.c_contiguous
    np.testing.assert_array_equal(np.bincount(ds.y_train), [6000] * 10)
    assert set(np.unique(ds.y_test)) == set(range(10))
    assert ds.num_classes == 10 and ds.class_names[0] == "T-shirt/top" and len(ds.class_names) == 10
    assert abs(ds.x_train.mean()) < 1e-3 and abs(ds.x_train.std() - 1) < 1e-3
    assert 0.2 < ds.normalization["x_mean"] < 0.4 and isinstance(ds.normalization["x_std"], float)


# ---------------------------------------------------------------- splits

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


# ---------------------------------------------------------------- built-in datasets

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


def test_limit_train():
    ds = load_dataset(DataConfig(dataset="digits", limit_train=100), seed=0)
    full = load_dataset(DataConfig(dataset="digits", normalize=False), seed=0)
    assert ds.x_train.shape == (100, 64) and ds.y_train.shape == (100,) and len(ds.x_test) == 359
    np.testing.assert_array_equal(ds.y_train, full.y_train[:100])
    assert abs(ds.x_train.mean()) < 1e-5  # statistics from the kept 100 samples
    assert ds.x_train.base is None  # a copy: the full training array is not kept alive


# ---------------------------------------------------------------- npz

def npz(tmp_path, name="d.npz", **arrays):
    rng = np.random.default_rng(0)
    base = dict(x_train=rng.normal(size=(20, 3)), y_train=rng.integers(0, 3, 20),
                x_test=rng.normal(size=(10, 3)), y_test=rng.integers(0, 3, 10))
    base.update(arrays)
    path = tmp_path / name
    np.savez(path, **{k: v for k, v in base.items() if v is not None})
    return str(path)


def load_npz(path, **kw):
    return load_dataset(DataConfig(dataset="npz", path=path, **kw), seed=0)


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


def test_unknown_dataset():
    with pytest.raises(UserError, match="data.dataset: unknown dataset 'cifar'"):
        load_dataset(DataConfig(dataset="cifar"), seed=0)

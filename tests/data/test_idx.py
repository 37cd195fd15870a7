"""MNIST and Fashion-MNIST IDX files: parsing, damage, and where they are looked for."""
from __future__ import annotations

import gzip
import json
import os
import struct

import numpy as np
import pytest

from distffn.data import idx
from distffn.data.byte_images import ByteImages
from distffn.data.idx import URLS, read_idx
from distffn.data.load import load_dataset
from distffn.errors import UserError
from distffn.jobspec import DataConfig

from helpers import (
    FASHION_DIR,
    IMAGES,
    LABELS,
    T_IMAGES,
    T_LABELS,
    idx_bytes,
    mnist,
    raw_idx_bytes,
    run_cli,
    user_error,
    write_bytes,
    write_job,
    write_mnist,
)


def test_missing_idx_files(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(idx, "SYSTEM_DATA_DIR", str(tmp_path / "system"))
    monkeypatch.setenv("DISTFFN_DATA", str(tmp_path / "env"))
    job = write_job(tmp_path, data={"dataset": "mnist", "path": str(tmp_path / "nowhere")},
                    model={"layers": [784, 16, 10]})
    user_error(capsys, ["run", job], "nowhere", "https://")


def test_truncated_idx_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(idx, "SYSTEM_DATA_DIR", str(tmp_path / "system"))
    folder = tmp_path / "mnist"
    folder.mkdir()
    n = 20
    files = {
        "train-images-idx3-ubyte": raw_idx_bytes(0x803, (n, 28, 28), bytes(n * 784)),
        "train-labels-idx1-ubyte": raw_idx_bytes(0x801, (n,), bytes(n)),
        "t10k-images-idx3-ubyte": raw_idx_bytes(0x803, (n, 28, 28), bytes(n * 784 - 100)),  # truncated
        "t10k-labels-idx1-ubyte": raw_idx_bytes(0x801, (n,), bytes(n)),
    }
    for name, blob in files.items():
        with gzip.open(folder / (name + ".gz"), "wb") as f:
            f.write(blob)
    job = write_job(tmp_path, data={"dataset": "mnist", "path": str(folder)}, model={"layers": [784, 16, 10]})
    user_error(capsys, ["run", job], "t10k-images-idx3-ubyte")


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, no_system_data, gz):
    raw = write_mnist(tmp_path / "m", gz=gz)
    ds = mnist(tmp_path / "m", normalize=False)
    assert ds.kind == "classification" and ds.image_shape == (28, 28)
    assert isinstance(ds.x_train, ByteImages) and ds.x_train.dtype == np.float32   # bytes, read as float32
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
    path = write_bytes(tmp_path / "a.idx", bytes([0, 0, 0x0C, 2]) + struct.pack(">2I", 2, 3) + arr.tobytes(), False)
    np.testing.assert_array_equal(read_idx(path), np.arange(6).reshape(2, 3))


def test_bad_magic(tmp_path, no_system_data):
    write_mnist(tmp_path)
    # A labels file where the images file should be.
    write_bytes(tmp_path / IMAGES, idx_bytes(np.zeros(5, np.uint8)), False)
    with pytest.raises(UserError, match=f"{IMAGES}.*magic number 0x00000801, expected 0x00000803"):
        mnist(tmp_path)


def test_not_idx_at_all(tmp_path):
    path = write_bytes(tmp_path / "x", b"hello world, not idx", False)
    with pytest.raises(UserError, match="x: bad magic number"):
        read_idx(path)


@pytest.mark.parametrize("gz", [False, True])
def test_truncated(tmp_path, no_system_data, gz):
    write_mnist(tmp_path, gz=gz)
    payload = idx_bytes(np.zeros((5, 28, 28), np.uint8))[:-100]
    write_bytes(tmp_path / IMAGES, payload, gz)
    expected, actual = 16 + 5 * 784, 16 + 5 * 784 - 100
    with pytest.raises(UserError, match=rf"{IMAGES}.*truncated.*expected {expected} .*found {actual}"):
        mnist(tmp_path)


def test_trailing_bytes(tmp_path):
    path = write_bytes(tmp_path / "l", idx_bytes(np.zeros(3, np.uint8)) + b"\0", False)
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
    write_bytes(tmp_path / LABELS, idx_bytes(np.zeros(4, np.uint8)), False)
    with pytest.raises(UserError, match=f"{IMAGES}: 5 images but .*{LABELS} has 4 labels"):
        mnist(tmp_path)


def test_missing_files_lists_folders_and_url(tmp_path, no_system_data, monkeypatch):
    """Without data.path: every folder looked in, and where to get the files."""
    env = tmp_path / "env"
    monkeypatch.setenv("DISTFFN_DATA", str(env))
    (env / "fashion-mnist").mkdir(parents=True)
    write_bytes(env / "fashion-mnist" / IMAGES, idx_bytes(np.zeros((1, 28, 28), np.uint8)), False)
    with pytest.raises(UserError) as e:
        load_dataset(DataConfig(dataset="fashion-mnist"), seed=0)
    msg = str(e.value)
    for folder in (env / "fashion-mnist", no_system_data / "fashion-mnist"):
        assert str(folder) in msg
    assert f"missing {LABELS}" in msg
    assert URLS["fashion-mnist"] in msg and "apt-get install dataset-fashion-mnist" in msg

    with pytest.raises(UserError) as e:
        load_dataset(DataConfig(dataset="mnist"), seed=0)
    assert URLS["mnist"] in str(e.value) and "apt-get" not in str(e.value)
    assert str(env / "mnist") in str(e.value)


def test_a_given_data_path_is_never_replaced_by_another_copy(tmp_path, no_system_data, monkeypatch):
    """data.path names the data: incomplete or missing is an error naming it, even when
    $DISTFFN_DATA or the system folder holds a good copy."""
    write_mnist(tmp_path / "env" / "fashion-mnist")
    write_mnist(no_system_data / "fashion-mnist")
    monkeypatch.setenv("DISTFFN_DATA", str(tmp_path / "env"))
    assert len(load_dataset(DataConfig(dataset="fashion-mnist"), seed=0).x_train) == 5
    given = tmp_path / "given"
    given.mkdir()
    write_bytes(given / IMAGES, idx_bytes(np.zeros((1, 28, 28), np.uint8)), False)  # one of four
    for path, what in ((given, f"missing {LABELS}"), (tmp_path / "nowhere", "no such folder")):
        with pytest.raises(UserError) as e:
            load_dataset(DataConfig(dataset="fashion-mnist", path=str(path)), seed=0)
        msg = str(e.value)
        assert msg.startswith(f"data.path: {path} (") and what in msg and URLS["fashion-mnist"] in msg
        assert str(tmp_path / "env") not in msg and str(no_system_data) not in msg


def test_the_run_says_where_its_data_came_from(tmp_path, no_system_data, capsys):
    write_mnist(tmp_path / "mine", n_train=60)
    out = tmp_path / "run"
    job = write_job(tmp_path, data={"dataset": "mnist", "path": str(tmp_path / "mine")},
                    model={"layers": [784, 8, 10]}, training={"epochs": 1, "batch_size": 20})
    assert run_cli(job, "--out", str(out)) == 0
    assert f"data from {tmp_path / 'mine'}" in capsys.readouterr().out
    start = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert start["data_source"] == str(tmp_path / "mine")


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
    assert isinstance(ds.x_train, ByteImages) and ds.x_train.codes.nbytes == 60000 * 784
    np.testing.assert_array_equal(np.bincount(ds.y_train), [6000] * 10)
    assert set(np.unique(ds.y_test)) == set(range(10))
    assert ds.num_classes == 10 and ds.class_names[0] == "T-shirt/top" and len(ds.class_names) == 10
    x = np.asarray(ds.x_train)
    assert abs(x.mean()) < 1e-3 and abs(x.std() - 1) < 1e-3
    assert 0.2 < ds.normalization["x_mean"] < 0.4 and isinstance(ds.normalization["x_std"], float)

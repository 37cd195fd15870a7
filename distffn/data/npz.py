"""The user's own arrays: an ``.npz`` with ``x_train, y_train, x_test, y_test``, loaded
without pickle and checked key by key."""
from __future__ import annotations

import math
import os
import zipfile
import zlib

import numpy as np

from ..errors import UserError
from .dataset import DATASETS, Dataset

_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _check_header(archive, key: str, path: str) -> None:
    """Read an entry's .npy header before its data: a shape the entry cannot hold (a header
    claiming 10^13 floats in a small file) is refused before anything is allocated."""
    try:
        info = archive.zip.getinfo(key + ".npy")
        with archive.zip.open(info) as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f, max_header_size=10_000)
            body = info.file_size - f.tell()
    except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise UserError(f"{path}: {key}: not a readable .npy entry ({e})") from None
    if dtype.hasobject:
        raise UserError(f"{path}: {key}: cannot be loaded without pickle (it holds Python objects); "
                        f"save plain numeric arrays")
    claimed = math.prod(shape) * dtype.itemsize
    if claimed > body:
        raise UserError(f"{path}: {key}: its header claims shape {shape} of {dtype} ({claimed:,} bytes), "
                        f"but the entry holds {body:,} bytes")


def _npz_arrays(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"data.path: {path}: no such file; expected an .npz with {', '.join(_NPZ_KEYS)}")
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, EOFError, zipfile.BadZipFile):  # numpy's "pickled data" ValueError too
        raise UserError(f"{path}: not an .npz archive; expected one written by np.savez "
                        f"with {', '.join(_NPZ_KEYS)}") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror or e}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise UserError(f"{path}: holds a single array; expected an .npz archive with "
                        f"{', '.join(_NPZ_KEYS)} (np.savez)")
    with archive:
        out = {}
        for key in _NPZ_KEYS:
            if key not in archive.files:
                raise UserError(f"{path}: missing key {key!r}; expected {', '.join(_NPZ_KEYS)} "
                                f"(found: {', '.join(archive.files) or 'none'})")
            _check_header(archive, key, path)
            try:
                out[key] = archive[key]
            except ValueError as e:  # object arrays need pickle, which we refuse
                raise UserError(f"{path}: {key}: cannot be loaded without pickle ({e}); "
                                f"save plain numeric arrays") from None
            except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
                raise UserError(f"{path}: {key}: corrupt entry ({e})") from None
    return out


@DATASETS.register("npz", doc="your own arrays: x_train, y_train, x_test, y_test in data.path")
def npz_dataset(cfg, seed: int) -> Dataset:
    path = cfg.path
    if not path:
        raise UserError("data.path: dataset 'npz' needs the path of an .npz file")
    a = _npz_arrays(os.path.expanduser(path))
    for key in _NPZ_KEYS:
        if a[key].dtype.kind not in "biuf":
            raise UserError(f"{path}: {key}: expected a numeric array, got dtype {a[key].dtype}")
    kinds = {"classification" if a[k].dtype.kind in "biu" else "regression" for k in ("y_train", "y_test")}
    if len(kinds) > 1:
        raise UserError(f"{path}: y_train is {a['y_train'].dtype} but y_test is {a['y_test'].dtype}; "
                        f"expected both integer (classification) or both float (regression)")
    kind = kinds.pop()
    for split in ("train", "test"):
        xk, yk = f"x_{split}", f"y_{split}"
        x, y = a[xk], a[yk]
        if x.ndim == 1:
            x = x.reshape(-1, 1)
        if x.ndim != 2:
            raise UserError(f"{path}: {xk}: expected a 2-D array (samples, features), got shape {x.shape}")
        if len(x) == 0:
            raise UserError(f"{path}: {xk}: no samples")
        if y.ndim not in ((1,) if kind == "classification" else (1, 2)):
            want = ("1-D integer class labels" if kind == "classification"
                    else "targets of shape (n,) or (n, k)")
            raise UserError(f"{path}: {yk}: expected {want}, got shape {y.shape}")
        if len(x) != len(y):
            raise UserError(f"{path}: {xk} has {len(x)} rows but {yk} has {len(y)}; expected the same")
        if kind == "classification":
            y = y.astype(np.int64)
            if y.min() < 0:
                raise UserError(f"{path}: {yk}: negative class label {y.min()}; expected ids 0, 1, ...")
        else:
            y = y.reshape(len(y), -1).astype(np.float32)
        a[xk], a[yk] = np.ascontiguousarray(x, dtype=np.float32), y
    for prefix, what in (("x", "features"), ("y", "targets")):
        train, test = a[f"{prefix}_train"], a[f"{prefix}_test"]
        if train.ndim == 2 and train.shape[1] != test.shape[1]:
            raise UserError(f"{path}: {prefix}_train has {train.shape[1]} {what} but {prefix}_test has "
                            f"{test.shape[1]}; expected the same")
    num_classes = None
    if kind == "classification":
        num_classes = int(max(a["y_train"].max(), a["y_test"].max())) + 1
    return Dataset("npz", a["x_train"], a["y_train"], a["x_test"], a["y_test"], kind,
                   num_classes=num_classes, source=os.path.abspath(path))

"""Datasets: load, split, check and normalize into float32 arrays.

Small datasets ship with scikit-learn (digits, breast-cancer, diabetes) or are generated
(xor, sine); MNIST and Fashion-MNIST are read from local IDX files (never downloaded);
``npz`` reads the user's own arrays. Every mistake in the user's data raises
:class:`UserError` naming the file or field and what was expected.
"""
from __future__ import annotations

import gzip
import math
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .config import DataConfig
from .errors import UserError

IMAGE_SHAPES = {"mnist": (28, 28), "fashion-mnist": (28, 28), "digits": (8, 8)}
URLS = {
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    # Mirror of http://yann.lecun.com/exdb/mnist/, which often refuses downloads.
    "mnist": "https://storage.googleapis.com/cvdf-datasets/mnist/",
}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# Where Debian's dataset-* packages install; a module constant so tests can redirect it.
SYSTEM_DATA_DIR = "/usr/share/datasets"
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
IDX_IMAGES_MAGIC = 0x00000803   # uint8, 3-D
IDX_LABELS_MAGIC = 0x00000801   # uint8, 1-D
_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
SINE_POINTS = 1000
_EPS = 1e-8
_CHUNK = 1024                   # rows per block when computing statistics (bounded temporaries)


@dataclass
class Dataset:
    """Train and test arrays plus what a model and a report need to know about them.

    ``x_*`` are float32 (n, d); ``y_*`` are int64 class ids (n,) for classification and
    float32 (n, k) for regression. ``normalization`` records the statistics applied
    (``x_mean``, ``x_std`` and, for standardized targets, ``y_mean``, ``y_std``) as plain
    floats or lists; it is empty when nothing was applied.
    """
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    kind: str
    num_classes: Optional[int] = None
    image_shape: Optional[tuple] = None
    class_names: Optional[list] = None
    normalization: dict = field(default_factory=dict)

    @property
    def num_features(self) -> int:
        return int(self.x_train.shape[1])


# ---------------------------------------------------------------- splits

def stratified_split(y, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of indices keeping each class's share: round(test_fraction * count) of
    every class goes to test (at most count - 1, so every class stays in train).

    Returns ``(train_idx, test_idx)`` as int64 arrays, each in a seeded random order so
    that the first N training samples mix all classes.
    """
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        n_test = min(int(round(test_fraction * len(idx))), len(idx) - 1)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return (rng.permutation(np.concatenate(train)).astype(np.int64),
            rng.permutation(np.concatenate(test)).astype(np.int64))


def _random_split(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n).astype(np.int64)
    n_test = min(max(int(round(test_fraction * n)), 1), n - 1)
    return perm[n_test:], perm[:n_test]


def _split(name, x, y, kind, cfg: DataConfig, seed: int, **extra) -> Dataset:
    if kind == "classification":
        train, test = stratified_split(y, cfg.test_fraction, seed)
    else:
        train, test = _random_split(len(x), cfg.test_fraction, seed)
    return Dataset(name, x[train], y[train], x[test], y[test], kind, **extra)


# ---------------------------------------------------------------- built-in datasets

def _sklearn(cfg: DataConfig, seed: int) -> Dataset:
    from sklearn import datasets  # imported lazily: slow, and only these three need it

    name = cfg.dataset
    bunch = {"digits": datasets.load_digits, "breast-cancer": datasets.load_breast_cancer,
             "diabetes": datasets.load_diabetes}[name]()
    x = bunch.data.astype(np.float32)
    if name == "digits":
        x /= 16.0  # pixel intensities are 0..16
    if name == "diabetes":
        y = bunch.target.astype(np.float32).reshape(-1, 1)
        return _split(name, x, y, "regression", cfg, seed)
    y = bunch.target.astype(np.int64)
    return _split(name, x, y, "classification", cfg, seed, num_classes=int(y.max()) + 1,
                  image_shape=IMAGE_SHAPES.get(name),
                  class_names=[str(c) for c in bunch.target_names])


def _xor(cfg: DataConfig, seed: int) -> Dataset:
    x = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float32)
    y = np.array([0, 1, 1, 0], dtype=np.int64)
    return Dataset("xor", x, y, x.copy(), y.copy(), "classification", num_classes=2)


def _sine(cfg: DataConfig, seed: int) -> Dataset:
    # A stream of its own, so the sampled x values are independent of the split's shuffle.
    rng = np.random.default_rng([seed, 1])
    x = rng.uniform(0.0, 2 * math.pi, size=(SINE_POINTS, 1)).astype(np.float32)
    return _split("sine", x, np.sin(x), "regression", cfg, seed)


# ---------------------------------------------------------------- IDX (MNIST, Fashion-MNIST)

def read_idx(path: str, magic: Optional[int] = None) -> np.ndarray:
    """Read one IDX file (raw, or gzip-compressed when the name ends in ``.gz``).

    Checks the magic number (``magic`` when given, e.g. 0x00000803 for 3-D uint8 images)
    and that the byte count matches the header. uint8 data comes back as a read-only view
    of the file's bytes (no copy); other types in native byte order.
    """
    try:
        with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
            data = f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise UserError(f"{path}: corrupt gzip file ({e}); download it again") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror or e}") from None
    if len(data) < 4:
        raise UserError(f"{path}: {len(data)} bytes, too short to be an IDX file")
    got = int.from_bytes(data[:4], "big")
    if data[0] or data[1] or data[2] not in _IDX_DTYPES or (magic is not None and got != magic):
        want = f"0x{magic:08x}" if magic is not None else "0x0000TTNN (TT a type code, NN the rank)"
        raise UserError(f"{path}: bad magic number 0x{got:08x}, expected {want}; not the right IDX file")
    ndim = data[3]
    header = 4 + 4 * ndim
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    dims = struct.unpack(f">{ndim}I", data[4:header]) if len(data) >= header else None
    expected = header + math.prod(dims) * dtype.itemsize if dims is not None else header
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "longer than its header says"
        size = "decompressed bytes" if path.endswith(".gz") else "bytes"
        raise UserError(f"{path}: {what}: expected {expected} {size}"
                        f"{f' for shape {dims}' if dims else ''}, found {len(data)}")
    arr = np.frombuffer(data, dtype, offset=header).reshape(dims)
    return arr if dtype.itemsize == 1 else arr.astype(dtype.newbyteorder("="))


def _idx_folders(cfg: DataConfig) -> list[str]:
    folders = [os.path.expanduser(cfg.path)] if cfg.path else []
    if os.environ.get("DISTFFN_DATA"):
        folders.append(os.path.join(os.environ["DISTFFN_DATA"], cfg.dataset))
    folders.append(os.path.join(SYSTEM_DATA_DIR, cfg.dataset))
    return folders


def _find_idx(folder: str, base: str) -> Optional[str]:
    for candidate in (os.path.join(folder, base), os.path.join(folder, base + ".gz")):
        if os.path.isfile(candidate):
            return candidate
    return None


def _locate_idx(cfg: DataConfig) -> dict:
    """The first folder holding all four files -> {base name: path}, else a UserError."""
    bases = [b for pair in IDX_FILES.values() for b in pair]
    looked = []
    for folder in _idx_folders(cfg):
        found = {b: _find_idx(folder, b) for b in bases}
        missing = [b for b in bases if found[b] is None]
        if not missing:
            return found
        if not os.path.isdir(folder):
            looked.append(f"{folder} (no such folder)")
        elif len(missing) == len(bases):
            looked.append(f"{folder} (none of the files)")
        else:
            looked.append(f"{folder} (missing {', '.join(missing)})")
    how = "run `apt-get install dataset-fashion-mnist`, or " if cfg.dataset == "fashion-mnist" else ""
    raise UserError(
        f"{cfg.dataset}: IDX files not found; looked in: {'; '.join(looked)}. To get them, {how}"
        f"download {', '.join(f + '.gz' for f in bases)} from {URLS[cfg.dataset]} into one of "
        f"these folders (set data.path or $DISTFFN_DATA/{cfg.dataset}); they are never downloaded "
        f"automatically")


def _idx(cfg: DataConfig, seed: int) -> Dataset:
    paths = _locate_idx(cfg)
    arrays = {}
    for split, (images_base, labels_base) in IDX_FILES.items():
        images = read_idx(paths[images_base], IDX_IMAGES_MAGIC)
        labels = read_idx(paths[labels_base], IDX_LABELS_MAGIC)
        if len(images) != len(labels):
            raise UserError(f"{paths[images_base]}: {len(images)} images but "
                            f"{paths[labels_base]} has {len(labels)} labels; expected the same count")
        x = np.divide(images.reshape(len(images), -1), np.float32(255), dtype=np.float32)
        arrays[split] = x, labels.astype(np.int64)
    (x_train, y_train), (x_test, y_test) = arrays["train"], arrays["test"]
    num_classes = int(max(y_train.max(initial=0), y_test.max(initial=0))) + 1
    names = FASHION_MNIST_CLASSES if cfg.dataset == "fashion-mnist" else [str(d) for d in range(10)]
    return Dataset(cfg.dataset, x_train, y_train, x_test, y_test, "classification",
                   num_classes=num_classes, image_shape=IMAGE_SHAPES[cfg.dataset],
                   class_names=names if num_classes <= len(names) else None)


# ---------------------------------------------------------------- npz

_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


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
            try:
                out[key] = archive[key]
            except ValueError as e:  # object arrays need pickle, which we refuse
                raise UserError(f"{path}: {key}: cannot be loaded without pickle ({e}); "
                                f"save plain numeric arrays") from None
            except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
                raise UserError(f"{path}: {key}: corrupt entry ({e})") from None
    return out


def _npz(cfg: DataConfig, seed: int) -> Dataset:
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
                   num_classes=num_classes)


# ---------------------------------------------------------------- checks and normalization

def _check_finite(ds: Dataset, source: str) -> None:
    for key in ("x_train", "y_train", "x_test", "y_test"):
        arr = getattr(ds, key)
        # Fast path: a float64 sum of finite float32 values cannot overflow, so it is
        # finite exactly when every value is.
        if arr.dtype.kind == "f" and not np.isfinite(arr.sum(dtype=np.float64)):
            bad = arr.size - int(np.count_nonzero(np.isfinite(arr)))
            raise UserError(f"{source}: {key} contains NaN or inf ({bad} values)")


def _mean_std(x: np.ndarray, per_feature: bool) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std over rows (``per_feature``) or over everything, computed in row
    blocks so a 60000x784 array never needs a full-size temporary."""
    axis = 0 if per_feature else None
    mean = x.mean(axis=axis, dtype=np.float64)
    m32 = mean.astype(np.float32)  # float32 blocks stay in cache; sums are float64
    sq = sum(np.square(x[i:i + _CHUNK] - m32).sum(axis=axis, dtype=np.float64)
             for i in range(0, len(x), _CHUNK))
    std = np.sqrt(sq / (len(x) if per_feature else x.size))
    return mean, np.where(std < _EPS, 1.0, std)  # constant features: centre only


def _standardize(train: np.ndarray, test: np.ndarray, per_feature: bool, prefix: str) -> dict:
    mean, std = _mean_std(train, per_feature)
    for arr in (train, test):  # in place: no second copy of a large array
        arr -= mean.astype(np.float32)
        arr /= std.astype(np.float32)
    return {f"{prefix}_mean": mean.tolist(), f"{prefix}_std": std.tolist()}


def _normalize(ds: Dataset) -> None:
    if ds.name == "xor":
        return  # the lecture's hand-set XOR weights expect the raw 0/1 inputs
    # Images: one global scalar (per-pixel std is 0 on the always-black border).
    ds.normalization = _standardize(ds.x_train, ds.x_test, ds.name not in IMAGE_SHAPES, "x")
    if ds.kind == "regression" and ds.name != "sine":  # sine keeps MSE in natural units
        ds.normalization.update(_standardize(ds.y_train, ds.y_test, True, "y"))


_LOADERS = {"digits": _sklearn, "breast-cancer": _sklearn, "diabetes": _sklearn, "xor": _xor,
            "sine": _sine, "mnist": _idx, "fashion-mnist": _idx, "npz": _npz}


def load_dataset(cfg: DataConfig, seed: int) -> Dataset:
    """Load ``cfg.dataset``: split (seeded by ``seed`` where there is no official test split),
    check for NaN/inf, keep the first ``cfg.limit_train`` training samples, and normalize with
    training-split statistics when ``cfg.normalize``."""
    loader = _LOADERS.get(cfg.dataset)
    if loader is None:
        raise UserError(f"data.dataset: unknown dataset {cfg.dataset!r}; expected one of "
                        f"{', '.join(_LOADERS)}")
    ds = loader(cfg, seed)
    _check_finite(ds, cfg.path if cfg.dataset == "npz" else cfg.dataset)
    if cfg.limit_train is not None and cfg.limit_train < len(ds.x_train):
        # Copies, so the full training arrays can be freed.
        ds.x_train = ds.x_train[:cfg.limit_train].copy()
        ds.y_train = ds.y_train[:cfg.limit_train].copy()
    if cfg.normalize:
        _normalize(ds)
    return ds

"""Loading a dataset by name: the loader, then NaN/inf checks, ``limit_train`` and
normalisation with training-split statistics."""
from __future__ import annotations

import numpy as np

from ..errors import UserError
from . import builtin, idx, npz  # noqa: F401  (each registers its datasets)
from .byte_images import ByteImages
from .dataset import DATASETS, IMAGE_SHAPES, Dataset, carve_validation

_EPS = 1e-8
_CHUNK = 1024                   # rows per block when computing statistics (bounded temporaries)


def _check_finite(ds: Dataset, source: str) -> None:
    for key in ("x_train", "y_train", "x_test", "y_test"):
        arr = getattr(ds, key)
        if isinstance(arr, ByteImages):
            if not arr.all_finite():
                raise UserError(f"{source}: {key} decodes to NaN or inf")
            continue
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


def _standardize(train: np.ndarray, others: list, per_feature: bool, prefix: str) -> dict:
    if isinstance(train, ByteImages) and not per_feature:
        mean, std = (np.float64(v) for v in train.mean_std())
        std = np.float64(1.0) if std < _EPS else std
    else:
        mean, std = _mean_std(train, per_feature)
    for arr in (train, *others):  # in place: no second copy of a large array
        if isinstance(arr, ByteImages):     # its 256-value table, as each pixel would be
            arr.standardize(mean.astype(np.float32), std.astype(np.float32))
            continue
        arr -= mean.astype(np.float32)
        arr /= std.astype(np.float32)
    return {f"{prefix}_mean": mean.tolist(), f"{prefix}_std": std.tolist()}


def _normalize(ds: Dataset) -> None:
    if ds.name == "xor":
        return  # the lecture's hand-set XOR weights expect the raw 0/1 inputs
    # Images: one global scalar (per-pixel std is 0 on the always-black border).
    val = lambda a: [] if a is None else [a]  # noqa: E731
    ds.normalization = _standardize(ds.x_train, [ds.x_test, *val(ds.x_val)], ds.name not in IMAGE_SHAPES, "x")
    if ds.kind == "regression" and ds.name != "sine":  # sine keeps MSE in natural units
        ds.normalization.update(_standardize(ds.y_train, [ds.y_test, *val(ds.y_val)], True, "y"))


def load_dataset(cfg, seed: int) -> Dataset:
    """Load ``cfg.dataset``: split (seeded by ``seed`` where there is no official test split),
    check for NaN/inf, carve ``cfg.validation_fraction`` of the training split off as the
    validation split, keep the first ``cfg.limit_train`` training samples, and normalize with
    training-split statistics when ``cfg.normalize``."""
    ds = DATASETS.get(cfg.dataset)(cfg, seed)
    _check_finite(ds, cfg.path if cfg.dataset == "npz" else cfg.dataset)
    # before limit_train: the validation split stays the same whatever the training subset
    if getattr(cfg, "validation_fraction", 0.0) > 0:
        carve_validation(ds, cfg.validation_fraction, seed)
    if cfg.limit_train is not None and cfg.limit_train < len(ds.x_train):
        # Copies, so the full training arrays can be freed.
        ds.x_train = ds.x_train[:cfg.limit_train].copy()
        ds.y_train = ds.y_train[:cfg.limit_train].copy()
    if cfg.normalize:
        _normalize(ds)
    return ds

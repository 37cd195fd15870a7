"""What a loaded dataset is, the registry of dataset loaders, and seeded train/test splits.

A loader is ``f(cfg, seed) -> Dataset`` registered under the name ``data.dataset`` uses; it
raises :class:`UserError` naming the file or field for every mistake in the user's data.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..registry import Registry

DATASETS = Registry("dataset", "data.dataset")
IMAGE_SHAPES = {"mnist": (28, 28), "fashion-mnist": (28, 28), "digits": (8, 8)}


@dataclass
class Dataset:
    """Train and test arrays plus what a model and a report need to know about them.

    ``x_*`` are float32 (n, d), or :class:`~.byte_images.ByteImages` that read as such
    (8-bit images: MNIST, Fashion-MNIST); ``y_*`` are int64 class ids (n,) for classification and
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
    source: str = ""                    # where it came from: a folder, a file, scikit-learn, ...
    x_val: Optional[np.ndarray] = None  # the validation split carved from the training data, if any
    y_val: Optional[np.ndarray] = None

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


def random_split(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n).astype(np.int64)
    n_test = min(max(int(round(test_fraction * n)), 1), n - 1)
    return perm[n_test:], perm[:n_test]


def carve_validation(ds: Dataset, fraction: float, seed: int) -> None:
    """Move ``fraction`` of ``ds``'s training split into ``x_val, y_val`` (stratified for
    classification, seeded; a seed stream of its own, so the test split is untouched)."""
    seed_seq = [seed, 0x7A11]           # not the test split's stream
    if ds.kind == "classification":
        train, val = stratified_split(ds.y_train, fraction, seed_seq)
    else:
        train, val = random_split(len(ds.x_train), fraction, seed_seq)
    ds.x_val, ds.y_val = ds.x_train[val], ds.y_train[val]
    ds.x_train, ds.y_train = ds.x_train[train], ds.y_train[train]


def split(name, x, y, kind, cfg, seed: int, **extra) -> Dataset:
    """A :class:`Dataset` of ``x``, ``y`` split by ``cfg.test_fraction`` (stratified for
    classification)."""
    if kind == "classification":
        train, test = stratified_split(y, cfg.test_fraction, seed)
    else:
        train, test = random_split(len(x), cfg.test_fraction, seed)
    return Dataset(name, x[train], y[train], x[test], y[test], kind, **extra)

"""Datasets that need no files: scikit-learn's bundled sets and the generated ones."""
from __future__ import annotations

import math

import numpy as np

from ..import_lock import HEAVY_IMPORTS
from .dataset import DATASETS, IMAGE_SHAPES, Dataset, split

SINE_POINTS = 1000


def _sklearn(loader: str):
    """A loader for one of scikit-learn's bundled datasets (``sklearn.datasets.<loader>``)."""
    source = f"scikit-learn (sklearn.datasets.{loader})"

    def load(cfg, seed: int) -> Dataset:
        with HEAVY_IMPORTS:           # not beside numba's kernel warm-up: both import SciPy
            from sklearn import datasets  # imported lazily: slow, and only these three need it

        name = cfg.dataset
        bunch = getattr(datasets, loader)()
        x = bunch.data.astype(np.float32)
        if name == "digits":
            x /= 16.0  # pixel intensities are 0..16
        if bunch.target.dtype.kind == "f":                  # diabetes: a regression target
            y = bunch.target.astype(np.float32).reshape(-1, 1)
            return split(name, x, y, "regression", cfg, seed, source=source)
        y = bunch.target.astype(np.int64)
        return split(name, x, y, "classification", cfg, seed, num_classes=int(y.max()) + 1,
                     image_shape=IMAGE_SHAPES.get(name),
                     class_names=[str(c) for c in bunch.target_names], source=source)
    return load


DATASETS.register("digits", _sklearn("load_digits"),
                  doc="scikit-learn's 8×8 digits (1,797 images, 10 classes)")
DATASETS.register("breast-cancer", _sklearn("load_breast_cancer"),
                  doc="scikit-learn's breast cancer (569 samples, 30 features, 2 classes)")
DATASETS.register("diabetes", _sklearn("load_diabetes"),
                  doc="scikit-learn's diabetes (442 samples, 10 features, regression)")


@DATASETS.register("xor", doc="the four XOR points (the lectures' net), never normalised")
def xor(cfg, seed: int) -> Dataset:
    x = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float32)
    y = np.array([0, 1, 1, 0], dtype=np.int64)
    return Dataset("xor", x, y, x.copy(), y.copy(), "classification", num_classes=2, source="generated")


@DATASETS.register("sine", doc=f"{SINE_POINTS} points of sin(x) on [0, 2π] (regression)")
def sine(cfg, seed: int) -> Dataset:
    # A stream of its own, so the sampled x values are independent of the split's shuffle.
    rng = np.random.default_rng([seed, 1])
    x = rng.uniform(0.0, 2 * math.pi, size=(SINE_POINTS, 1)).astype(np.float32)
    return split("sine", x, np.sin(x), "regression", cfg, seed, source="generated")


"""8-bit images kept as bytes until a batch is gathered: ``ByteImages``.

MNIST-like data holds 256 pixel values, so a (n, d) float32 array is a (n, d) uint8 array of
codes plus what each code means: ``code / 255``, then the normalisation ``(x − mean) / std``,
computed in float32 as the dense pipeline computes every pixel, so the decoded values are its
values bit for bit (a 256-entry table for NumPy's lookups; the numba gather does the same
three float32 operations per pixel, which vectorize where a lookup does not). A quarter of the
memory (Fashion-MNIST's training split: 47 MB instead of 188 MB), and a gathered batch reads a
quarter of the bytes.

It is read like the float32 array it stands for: ``shape``, ``dtype``, ``len``, row slices
(themselves ``ByteImages``), ``take`` of rows into a float32 buffer, and ``np.asarray`` for
a dense copy where code needs one.
"""
from __future__ import annotations

import numpy as np


class _CodedRows:
    """What reads like the float32 (n, d) array that ``codes`` and ``table`` stand for."""

    dtype = np.dtype(np.float32)
    ndim = 2
    codes = table = None

    @property
    def shape(self) -> tuple:
        return self.codes.shape

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.table.nbytes

    def __len__(self) -> int:
        return self.codes.shape[0]


class ByteImages(_CodedRows):
    """uint8 ``codes`` (n, d) standing for ``(code / 255 − mean) / std`` in float32."""

    def __init__(self, codes: np.ndarray, mean=0.0, std=1.0):
        if codes.dtype != np.uint8 or codes.ndim != 2:
            raise ValueError(f"codes: expected a 2-D uint8 array, got {codes.dtype} {codes.shape}")
        self.codes = codes
        self.mean, self.std = np.float32(mean), np.float32(std)
        # (c / 255 − 0) / 1 is c / 255 exactly: the unnormalised values need no special case
        self.table = (np.arange(256, dtype=np.float32) / np.float32(255) - self.mean) / self.std

    def __getitem__(self, rows):
        """Rows (a slice, or an index array as a split takes them), still as bytes."""
        if isinstance(rows, (int, np.integer)):
            raise TypeError("ByteImages: rows come as a slice or an index array; gather a batch with take()")
        return ByteImages(self.codes[rows], self.mean, self.std)

    def copy(self) -> "ByteImages":
        return ByteImages(self.codes.copy(), self.mean, self.std)

    def __array__(self, dtype=None, copy=None):
        out = self.table[self.codes]
        return out if dtype is None else out.astype(dtype, copy=False)

    def take(self, idx, out: np.ndarray, kernel=None) -> np.ndarray:
        """Rows ``idx`` decoded into the float32 buffer ``out`` (len(idx), d); ``kernel``: the
        numba twin (``gather_kernels.take_rows``) or None for NumPy's two passes."""
        if kernel is not None:
            kernel(self.codes, self.mean, self.std, idx, out)
        else:
            np.take(self.table, np.take(self.codes, idx, axis=0, mode="clip"), out=out, mode="clip")
        return out

    # ---------------------------------------------------------------- statistics
    def histogram(self) -> np.ndarray:
        """How many pixels hold each code (float64, 256 entries)."""
        flat, block = self.codes.reshape(-1), 1 << 18
        # in blocks: bincount widens its input to intp, 8 bytes a pixel (10x slower at once)
        return sum((np.bincount(flat[i:i + block], minlength=256) for i in range(0, flat.size, block)),
                   np.zeros(256, np.int64)).astype(np.float64)

    def mean_std(self) -> tuple[float, float]:
        """Mean and standard deviation of every decoded value, as the dense pipeline computes
        them (float64 sums of float32 values; squares of float32 differences)."""
        counts = self.histogram()
        n = counts.sum()
        mean = float((counts * self.table.astype(np.float64)).sum() / n)
        d = self.table - np.float32(mean)
        return mean, float(np.sqrt((counts * (d * d).astype(np.float64)).sum() / n))

    def standardize(self, mean: np.float32, std: np.float32) -> None:
        """``(x − mean) / std`` on every value, in float32 as the dense arrays would get it
        (once: the values are ``code / 255`` before)."""
        if self.mean != 0 or self.std != 1:
            raise ValueError("ByteImages: already standardized")
        self.__init__(self.codes, mean, std)

    def all_finite(self) -> bool:
        return bool(np.isfinite(self.table).all())


class DeviceByteImages(_CodedRows):
    """:class:`ByteImages` moved to a GPU once: the uint8 codes and the 256-entry table in
    device memory, rows gathered and decoded there by one CUDA kernel (bit for bit the
    host's values: the same table)."""

    def __init__(self, images: ByteImages, xp):
        self.codes = xp.asarray(np.ascontiguousarray(images.codes))
        self.table = xp.asarray(images.table)
        from .cuda_gather_kernels import take_rows  # CuPy's kernels: only on a GPU run
        self._take_rows = take_rows

    def take(self, idx, out, kernel=None):
        """Rows ``idx`` (device int64) decoded into the device float32 buffer ``out``."""
        self._take_rows(self.codes, self.table, idx, out)
        return out


def dense(x) -> np.ndarray:
    """``x`` as a float32 ndarray (a copy for :class:`ByteImages`, else as it is)."""
    return np.asarray(x) if isinstance(x, ByteImages) else x

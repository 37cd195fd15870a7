"""MNIST and Fashion-MNIST from local IDX files (raw or gzip), never downloaded.

Looked for in ``data.path``, then ``$DISTFFN_DATA/<name>``, then Debian's
``/usr/share/datasets/<name>`` (``apt-get install dataset-fashion-mnist``).
"""
from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from typing import Optional

import numpy as np

from ..errors import UserError
from .byte_images import ByteImages
from .dataset import DATASETS, IMAGE_SHAPES, Dataset

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


def _idx_folders(cfg) -> list[str]:
    """Where to look: ``data.path`` alone when it is given (a wrong path is an error, never a
    silent fall-back to another copy), else ``$DISTFFN_DATA/<name>``, then the system folder."""
    if cfg.path:
        return [os.path.expanduser(cfg.path)]
    folders = []
    if os.environ.get("DISTFFN_DATA"):
        folders.append(os.path.join(os.environ["DISTFFN_DATA"], cfg.dataset))
    folders.append(os.path.join(SYSTEM_DATA_DIR, cfg.dataset))
    return folders


def _find_idx(folder: str, base: str) -> Optional[str]:
    for candidate in (os.path.join(folder, base), os.path.join(folder, base + ".gz")):
        if os.path.isfile(candidate):
            return candidate
    return None


def _locate_idx(cfg) -> dict:
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
    if cfg.path:
        raise UserError(f"data.path: {looked[0]}; expected the folder holding "
                        f"{', '.join(bases)} (or .gz) of {cfg.dataset}; get them from {URLS[cfg.dataset]}")
    raise UserError(
        f"{cfg.dataset}: IDX files not found; looked in: {'; '.join(looked)}. To get them, {how}"
        f"download {', '.join(f + '.gz' for f in bases)} from {URLS[cfg.dataset]} into one of "
        f"these folders (set data.path or $DISTFFN_DATA/{cfg.dataset}); they are never downloaded "
        f"automatically")


def idx_dataset(cfg, seed: int) -> Dataset:
    paths = _locate_idx(cfg)
    arrays = {}
    for split, (images_base, labels_base) in IDX_FILES.items():
        images = read_idx(paths[images_base], IDX_IMAGES_MAGIC)
        labels = read_idx(paths[labels_base], IDX_LABELS_MAGIC)
        if len(images) != len(labels):
            raise UserError(f"{paths[images_base]}: {len(images)} images but "
                            f"{paths[labels_base]} has {len(labels)} labels; expected the same count")
        # 8-bit pixels stay bytes: ByteImages decodes code / 255 (normalised) per batch
        arrays[split] = ByteImages(images.reshape(len(images), -1)), labels.astype(np.int64)
    (x_train, y_train), (x_test, y_test) = arrays["train"], arrays["test"]
    num_classes = int(max(y_train.max(initial=0), y_test.max(initial=0))) + 1
    names = FASHION_MNIST_CLASSES if cfg.dataset == "fashion-mnist" else [str(d) for d in range(10)]
    return Dataset(cfg.dataset, x_train, y_train, x_test, y_test, "classification",
                   num_classes=num_classes, image_shape=IMAGE_SHAPES[cfg.dataset],
                   class_names=names if num_classes <= len(names) else None,
                   source=os.path.dirname(paths[IDX_FILES["train"][0]]))


DATASETS.register("mnist", idx_dataset, doc="MNIST handwritten digits from IDX files (60,000 / 10,000)")
DATASETS.register("fashion-mnist", idx_dataset, doc="Fashion-MNIST from IDX files (60,000 / 10,000; Debian: dataset-fashion-mnist)")

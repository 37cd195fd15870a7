"""Flat parameter and gradient buffers with per-layer views.

All parameters of a model live in one contiguous vector (and so do the gradients and every
optimizer buffer), so aggregation is one message and an update one pass; each layer's
``W``, ``b`` are views into it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import UserError


@dataclass(frozen=True)
class ParamSpec:
    name: str
    shape: tuple
    offset: int
    transposed: bool = False   # stored as (fan_out, fan_in) row-major, viewed as (fan_in, fan_out)

    @property
    def size(self) -> int:
        return math.prod(self.shape)


class ParamLayout:
    """Where each named parameter sits in the flat buffer."""

    def __init__(self, shapes: list[tuple[str, tuple, bool]]):
        self.specs: list[ParamSpec] = []
        offset = 0
        for name, shape, transposed in shapes:
            spec = ParamSpec(name, tuple(shape), offset, transposed)
            self.specs.append(spec)
            offset += spec.size
        self.size = offset
        self.by_name = {s.name: s for s in self.specs}

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    def views(self, flat) -> dict:
        """Per-parameter views into ``flat`` (NumPy or CuPy); writes go through to the buffer."""
        out = {}
        for s in self.specs:
            chunk = flat[s.offset:s.offset + s.size]
            # W is kept transposed in memory: the dW = Xᵀ·dZ product then writes row-major
            # (dZᵀ·X), measured 20% faster with OpenBLAS at batch 128.
            out[s.name] = chunk.reshape(s.shape[::-1]).T if s.transposed else chunk.reshape(s.shape)
        return out

    def to_arrays(self, flat) -> dict:
        """Copies of every parameter as ordinary C-ordered arrays (for checkpoints)."""
        return {k: np.ascontiguousarray(v) for k, v in self.views(flat).items()}

    def from_arrays(self, arrays: dict, flat, source: str = "checkpoint", prefix: str = ""):
        """Copy named arrays into ``flat``, checking every name and shape."""
        views = self.views(flat)
        for s in self.specs:
            key = prefix + s.name
            if key not in arrays:
                raise UserError(f"{source}: has no parameter {key!r}; it was saved from another architecture")
            if tuple(arrays[key].shape) != s.shape:
                raise UserError(f"{source}: parameter {key!r} has shape {tuple(arrays[key].shape)}, "
                                f"this model needs {s.shape} (another architecture?)")
            views[s.name][...] = arrays[key]

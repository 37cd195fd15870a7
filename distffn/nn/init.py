"""Weight initialisers: each draws a weight matrix of ``shape`` from a seeded generator.

``shape`` is (fan_in, fan_out·pieces): maxout layers have ``pieces`` columns per unit.
"""
from __future__ import annotations

import math

from ..registry import Registry

INITIALIZERS = Registry("initialiser", "model.init")


@INITIALIZERS.register("he")
def he(rng, shape, fan_in: int, fan_out: int, cfg):
    """N(0, 2/fan_in) (He et al. 2015, for ReLU-like units)"""
    return rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)


@INITIALIZERS.register("xavier")
def xavier(rng, shape, fan_in: int, fan_out: int, cfg):
    """U(±√(6/(fan_in+fan_out))) (Glorot and Bengio 2010)"""
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, shape)


@INITIALIZERS.register("normal")
def normal(rng, shape, fan_in: int, fan_out: int, cfg):
    """N(0, init_std²)"""
    return rng.standard_normal(shape) * cfg.init_std

"""Optimizers (each owning its state) and learning-rate schedules.

Importing this package registers every optimizer: one module each.
"""
from . import adam, momentum, nesterov  # noqa: F401  (registration)
from .optimizer import OPTIMIZERS, Optimizer, make_optimizer
from .schedules import SCHEDULES, learning_rate

__all__ = ["OPTIMIZERS", "Optimizer", "SCHEDULES", "learning_rate", "make_optimizer"]

"""Optimizers (each owning its state) and learning-rate schedules.

Importing this package registers every optimizer: one module each.
"""
# registration, in the order the names are listed (the default first)
from . import momentum  # noqa: F401, I001
from . import nesterov  # noqa: F401
from . import adam  # noqa: F401
from .optimizer import OPTIMIZERS, Optimizer, make_optimizer
from .schedules import SCHEDULES, learning_rate

__all__ = ["OPTIMIZERS", "Optimizer", "SCHEDULES", "learning_rate", "make_optimizer"]

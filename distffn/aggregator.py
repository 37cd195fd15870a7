"""The parameter aggregator: holds Θ and the velocity, applies momentum SGD to the summed ΔΘ."""
from __future__ import annotations

import numpy as np

from .optimizer import MomentumSGD


class Aggregator:
    def __init__(self, theta, momentum: float, xp=np):
        self.xp = xp
        self.theta = theta
        self.velocity = xp.zeros_like(theta)
        self.optimizer = MomentumSGD(momentum, xp)
        self.step = 0

    def apply(self, grad_sum, count: int, lr: float):
        """One update from ΔΘ summed over ``count`` samples of the global batch (consumes it)."""
        self.optimizer.update(self.theta, self.velocity, grad_sum, count, lr)
        self.step += 1
        return self.theta

"""The parameter aggregator: Θ and the optimizer that updates it from the summed ΔΘ."""
from __future__ import annotations

import numpy as np

from ..optim import make_optimizer
from ..xp import to_numpy


class Aggregator:
    """Holds Θ and the job's optimizer; each update takes ΔΘ summed over a global batch.

    Dividing by the global batch size weights every worker's shard by its sample count, so
    any split of a batch gives the update of one worker.
    """

    def __init__(self, optimizer_cfg, theta, optimizer_state, step: int, xp=np, kernels: str = "numpy"):
        """``kernels``: the resolved ``scaling.kernels`` (``numpy`` or ``numba``)."""
        self.xp = xp
        self.theta = xp.array(theta, dtype=np.float32)
        self.optimizer = make_optimizer(optimizer_cfg, self.theta.shape[0], xp, kernels=kernels)
        self.optimizer.load_state_dict(optimizer_state, step)

    @property
    def step(self) -> int:
        return self.optimizer.t

    def apply(self, grad_sum, count: int, lr: float):
        """One update from ΔΘ summed over ``count`` samples (``grad_sum`` is consumed); Θ."""
        self.optimizer.update(self.theta, grad_sum, lr, 1.0 / count)
        return self.theta

    def state(self) -> tuple[np.ndarray, dict]:
        """Host copies of Θ and the optimizer's buffers."""
        return to_numpy(self.theta).copy(), self.optimizer.state_dict()

"""The parameter aggregator: Θ and the optimizer that updates it from the summed ΔΘ."""
from __future__ import annotations

import numpy as np

from ..optim import make_optimizer
from ..xp import to_numpy
from .backend import GradNorms, squared_norm


class Aggregator:
    """Holds Θ and the job's optimizer; each update takes ΔΘ summed over a global batch.

    Dividing by the global batch size weights every worker's shard by its sample count, so
    any split of a batch gives the update of one worker.
    """

    def __init__(self, optimizer_cfg, theta, optimizer_state, step: int, xp=np, kernels: str = "numpy",
                 noise_every: int = 0):
        """``kernels``: the resolved ``scaling.kernels`` (``numpy`` or ``numba``); ``noise_every``:
        measure the global batch's gradient norm on these steps (``metrics.noise_scale``)."""
        self.xp = xp
        self.theta = xp.array(theta, dtype=np.float32)
        self.optimizer = make_optimizer(optimizer_cfg, self.theta.shape[0], xp, kernels=kernels)
        self.optimizer.load_state_dict(optimizer_state, step)
        self.noise_every = noise_every          # measure |ΣΔΘ|² on these steps (metrics.noise_scale)
        self.norms = GradNorms()

    @property
    def step(self) -> int:
        return self.optimizer.t

    def apply(self, grad_sum, count: int, lr: float):
        """One update from ΔΘ summed over ``count`` samples (``grad_sum`` is consumed); Θ."""
        if self.noise_every and self.optimizer.t % self.noise_every == 0:
            self.norms.add_batch(squared_norm(self.xp, grad_sum), count)
        self.optimizer.update(self.theta, grad_sum, lr, 1.0 / count)
        return self.theta

    def pop_norms(self) -> GradNorms:
        """The global-batch norms measured since the last call."""
        out, self.norms = self.norms, GradNorms()
        return out

    def state(self) -> tuple[np.ndarray, dict]:
        """Host copies of Θ and the optimizer's buffers."""
        return to_numpy(self.theta).copy(), self.optimizer.state_dict()

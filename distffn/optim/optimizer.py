"""The optimizer protocol and its registry.

An optimizer owns its state: named flat buffers the size of Θ (``velocity``; Adam's
``exp_avg`` and ``exp_avg_sq``) plus the count of updates applied. The aggregator hands it
the summed ΔΘ of a global batch; checkpoints save and restore its buffers by name. Nothing
else in distffn knows what an optimizer keeps.

Adding one: a module beside this one with a subclass registered in :data:`OPTIMIZERS`, its
import in ``distffn/optim/__init__.py``, and fields for any new hyperparameters in the job
spec's ``optimizer`` section.
"""
from __future__ import annotations

import numpy as np

from ..errors import UserError
from ..registry import Registry
from ..xp import to_numpy

OPTIMIZERS = Registry("optimizer", "optimizer.name")

# Elements per chunk of the NumPy updates: a few float32 chunks (Θ, ΔΘ, the buffers) stay in
# L2 while every pass of an update runs over them, instead of streaming the whole 3.2 MB
# vectors through memory once per pass.
CHUNK = 1 << 16


class Optimizer:
    """Updates a flat parameter vector in place from a flat gradient.

    ``buffers`` names the state vectors (each the size of Θ, zero at the start); ``t`` counts
    the updates applied so far (the run's step).
    """

    name = "base"
    buffers: tuple[str, ...] = ()

    def __init__(self, cfg, size: int, xp=np, dtype=np.float32, kernels: str = "numpy"):
        """``cfg`` is the job spec's optimizer section; ``size`` the length of Θ; ``kernels``
        ``numpy`` or ``numba`` (``optim/update_kernels.py``: float32 NumPy buffers only)."""
        self.cfg, self.xp, self.dtype = cfg, xp, np.dtype(dtype)
        self.weight_decay = cfg.weight_decay
        # the module of numba twins, or None: the NumPy (or CuPy) path
        self.fused = (_fused_module() if kernels == "numba" and xp is np and self.dtype == np.float32
                      else None)
        self.state = {name: xp.zeros(size, self.dtype) for name in self.buffers}
        self.t = 0

    @classmethod
    def check(cls, cfg) -> None:
        """Raise :class:`UserError` naming the field if ``cfg`` does not suit this optimizer."""

    def update(self, params, grad, lr: float, grad_scale: float = 1.0) -> None:
        """One step of ``params`` given the gradient ``grad_scale · grad``.

        The aggregator passes ΔΘ summed over a global batch of B samples and ``1/B``, so the
        scale folds into the update's own pass; ``grad`` is clobbered.
        """
        self._update(params, grad, float(lr), float(grad_scale))
        self.t += 1

    def _update(self, params, grad, lr: float, grad_scale: float) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Host copies of the named buffers."""
        return {name: to_numpy(buf).copy() for name, buf in self.state.items()}

    def load_state_dict(self, state: dict | None, step: int, source: str = "checkpoint") -> None:
        """Restore the buffers saved by :meth:`state_dict` after ``step`` updates (None: zeros)."""
        self.t = step
        if state is None:
            return
        for name, buf in self.state.items():
            if name not in state:
                raise UserError(f"{source}: has no optimizer buffer {name!r}, which optimizer "
                                f"{self.name!r} needs (saved by another optimizer?)")
            if tuple(state[name].shape) != buf.shape:
                raise UserError(f"{source}: optimizer buffer {name!r} has shape "
                                f"{tuple(state[name].shape)}, expected {buf.shape}")
            buf[...] = self.xp.asarray(state[name], dtype=self.dtype)


def make_optimizer(cfg, size: int, xp=np, dtype=np.float32, kernels: str = "numpy") -> Optimizer:
    """The optimizer ``cfg.name`` names, with zeroed state for ``size`` parameters."""
    return OPTIMIZERS.get(cfg.name)(cfg, size, xp, dtype, kernels)


def _fused_module():
    from . import update_kernels  # imports numba: only when the numba kernels were chosen
    return update_kernels


def check_momentum(cfg) -> None:
    if not 0.0 <= cfg.momentum < 1.0:
        raise UserError(f"optimizer.momentum: expected a number in [0, 1), got {cfg.momentum}")

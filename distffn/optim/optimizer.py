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
    the updates applied so far (the run's step). On the GPU an update is one CUDA kernel
    reading its scalars from the device vector :attr:`hyper`, in two halves a CUDA graph can
    use: :meth:`prepare` on the host, :meth:`launch` on the device.
    """

    name = "base"
    buffers: tuple[str, ...] = ()
    # the GPU update: its kernel's wrapper in optim/cuda_update_kernels.py, and the index in
    # _scalars() of the decay coefficient whose being nonzero turns the decay term on
    gpu_kernel: str = ""
    _decay_slot = 0

    def __init__(self, cfg, size: int, xp=np, dtype=np.float32, kernels: str = "numpy"):
        """``cfg`` is the job spec's optimizer section; ``size`` the length of Θ; ``kernels``
        ``numpy`` or ``numba`` (``optim/update_kernels.py``: float32 NumPy buffers only). With
        CuPy as ``xp`` (float32 only) the updates are the CUDA kernels of
        ``optim/cuda_update_kernels.py``, whatever ``kernels`` says."""
        self.cfg, self.xp, self.dtype = cfg, xp, np.dtype(dtype)
        self.weight_decay = cfg.weight_decay
        # the module of numba twins, or None: the NumPy (or CuPy) path
        self.fused = (_fused_module() if kernels == "numba" and xp is np and self.dtype == np.float32
                      else None)
        self.state = {name: xp.zeros(size, self.dtype) for name in self.buffers}
        self.t = 0
        # on the GPU: the update's scalars in device memory (DeviceScalars), read by the kernel
        self._scalars_gpu = None
        if xp is not np:
            if self.dtype != np.float32:
                raise TypeError(f"optimizer {self.name!r}: the GPU updates are float32 kernels, "
                                f"got {self.dtype}")
            from .cuda_update_kernels import SLOTS, DeviceScalars
            self._scalars_gpu = DeviceScalars(len(SLOTS[self.gpu_kernel]))

    @classmethod
    def check(cls, cfg) -> None:
        """Raise :class:`UserError` naming the field if ``cfg`` does not suit this optimizer."""

    def update(self, params, grad, lr: float, grad_scale: float = 1.0) -> None:
        """One step of ``params`` given the gradient ``grad_scale · grad``.

        The aggregator passes ΔΘ summed over a global batch of B samples and ``1/B``, so the
        scale folds into the update's own pass; ``grad`` is clobbered (on the GPU: left intact).
        On the GPU this is :meth:`prepare` then :meth:`launch`.
        """
        if self._scalars_gpu is not None:
            self.prepare(lr, grad_scale)
            self.launch(params, grad)
        else:
            self._update(params, grad, float(lr), float(grad_scale))
        self.t += 1

    @property
    def hyper(self):
        """On the GPU: the float32 device vector of the coming update's scalars, which the
        kernel reads (its slots: ``optim/cuda_update_kernels.py``); allocated once, never
        moved. None on the CPU."""
        return None if self._scalars_gpu is None else self._scalars_gpu.device

    def prepare(self, lr: float, grad_scale: float = 1.0) -> None:
        """GPU only: the host half of update ``t + 1``. Computes its scalars in float64 and
        casts them to float32 as the NumPy update does, and queues their copy into
        :attr:`hyper` on the current stream (no wait for the GPU). It does not count the
        update: :meth:`update` is ``prepare``, :meth:`launch`, then ``t += 1``.

        With a CUDA graph that captured :meth:`launch`, the host calls ``prepare(lr,
        grad_scale)`` before each replay, on the stream the graph is launched on, and
        ``t += 1`` after it (Adam's bias corrections read ``t``).
        """
        if self._scalars_gpu is None:
            raise RuntimeError("Optimizer.prepare/launch are the GPU update's halves; "
                               "on the CPU call update()")
        scalars = self._scalars(float(lr), float(grad_scale))
        self._scalars_gpu.write((*scalars, scalars[self._decay_slot] != 0))

    def launch(self, params, grad) -> None:
        """GPU only: launch the update's kernel on the current stream, reading its scalars from
        :attr:`hyper` (written by :meth:`prepare`). It does no host work that a CUDA graph's
        replay would skip, so a graph may capture it; ``grad`` is left intact."""
        if self._scalars_gpu is None:
            raise RuntimeError("Optimizer.prepare/launch are the GPU update's halves; "
                               "on the CPU call update()")
        from . import cuda_update_kernels
        getattr(cuda_update_kernels, self.gpu_kernel)(
            params, *(self.state[name] for name in self.buffers), grad, self.hyper)

    def _scalars(self, lr: float, grad_scale: float) -> tuple[float, ...]:
        """The update's scalars after the arrays, in the numba twin's argument order (float64;
        the GPU's ``hyper`` holds them cast to float32, then the decay flag)."""
        raise NotImplementedError

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


def momentum_scalars(self, lr: float, grad_scale: float) -> tuple[float, float, float]:
    """``_scalars`` of the momentum optimizers: μ, −ε·grad_scale and the decay ε·λ."""
    return self.cfg.momentum, -lr * grad_scale, lr * self.weight_decay


def check_momentum(cfg) -> None:
    if not 0.0 <= cfg.momentum < 1.0:
        raise UserError(f"optimizer.momentum: expected a number in [0, 1), got {cfg.momentum}")

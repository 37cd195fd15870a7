"""A worker: forward and backward pass on its shard of every global mini-batch.

The same class runs in-process, inside a Ray actor or on an MPI rank. It returns ΔΘ summed
over its shard (the aggregator divides by the global batch size, which weights every shard by
its sample count) and keeps its running loss/accuracy totals on the device until asked.
"""
from __future__ import annotations

import os
import time

import numpy as np

from .. import kernels
from ..data.byte_images import ByteImages, DeviceByteImages
from ..data.sharding import Batch, epoch_permutation, shard_bounds
from ..nn.model import MLP
from .backend import GradNorms, noise_every, squared_norm

FAULT_ENV = "DISTFFN_INJECT_FAULT"


def _injected_fault(rank: int):
    """``DISTFFN_INJECT_FAULT=rank:step[:hang]``: how the tests make one worker fail or stall."""
    spec = os.environ.get(FAULT_ENV, "").split(":")
    if len(spec) < 2 or spec[0] != str(rank):
        return None
    return int(spec[1]), (spec[2] if len(spec) > 2 else "raise")


def _take_rows_kernel():
    from ..data import gather_kernels  # imports numba: only when the numba kernels were chosen
    return gather_kernels.take_rows


class Worker:
    """Worker ``rank`` of ``num_workers``: ΔΘ for its shard of each global batch (see module doc)."""

    def __init__(self, job, x_train, t_train, labels_train, rank: int = 0,
                 num_workers: int = 1, xp=np):
        self.job, self.rank, self.num_workers, self.xp = job, rank, num_workers, xp
        self.model = MLP(job.model, xp, kernels=kernels.resolve(job.scaling.kernels, xp is not np))
        # the dataset stays where it is (host memory, the Ray object store) or moves to the GPU
        # once; 8-bit images stay bytes (on the host or the device) and are decoded as a batch
        # is gathered, so no step copies data from the host
        if isinstance(x_train, ByteImages):
            self.x = x_train if xp is np else DeviceByteImages(x_train, xp)
        else:
            self.x = xp.asarray(x_train)
        self.t, self.labels = xp.asarray(t_train), (None if labels_train is None else xp.asarray(labels_train))
        if xp is not np and self.labels is not None:
            self.labels = self.labels.astype(np.int64, copy=False)   # the CUDA loss kernel's type
        self._take_rows = _take_rows_kernel() if isinstance(self.x, ByteImages) and self.model.kernels == "numba" else None
        if xp is not np:
            from .. import cuda
            cuda.compile_all()             # compiled (or loaded from CuPy's cache) before any timed step
        self.n = self.x.shape[0]
        self.grad = xp.zeros(self.model.num_params, self.model.dtype)
        self.grad_views = self.model.layout.views(self.grad)
        self._theta_views = (None, None)
        self._perm = (None, None)
        self._fault = _injected_fault(rank)
        self._gathered: dict[int, tuple] = {}
        self.calls = 0
        # metrics.noise_scale: |ΔΘ|² of the shard on every noise_every-th step of the run
        self.noise_every = noise_every(job)
        self.norms = GradNorms()
        self._half = None
        # on a GPU the running loss sum and count of right answers stay in one device buffer,
        # added to in place (no allocation: a CUDA graph can capture it), read at log points
        self._totals = None if xp is np else xp.zeros(2, np.float64)
        self.reset_stats()

    def reset_stats(self):
        self.loss_sum, self.correct, self.count = 0.0, 0, 0
        if self._totals is not None:
            self._totals.fill(0)

    def pop_stats(self) -> tuple[float, int, int]:
        """Host copies of (loss sum, correct, samples) since the last call: one sync."""
        if self._totals is not None:
            loss, correct = self._totals.get()
            self.loss_sum, self.correct = loss, round(correct)
        out = (float(self.loss_sum), int(self.correct), int(self.count))
        self.reset_stats()
        return out

    def device_totals(self) -> list:
        """The device buffers a step adds to (for a CUDA graph's check of a replay)."""
        return [] if self._totals is None else [self._totals]

    @property
    def faulty(self) -> bool:
        """Whether the tests asked this worker to fail (its steps then run eagerly)."""
        return self._fault is not None

    def pop_norms(self) -> GradNorms:
        """The shard norms measured since the last call."""
        out, self.norms = self.norms, GradNorms()
        return out

    def measures(self, step: int) -> bool:
        """Whether this step's gradient norms are measured: the same steps on every worker and
        in the aggregator."""
        return bool(self.noise_every) and step % self.noise_every == 0

    def params(self, theta) -> dict:
        """Per-layer views of ``theta``, cached while the same buffer comes back every step."""
        if self._theta_views[0] is not theta:
            self._theta_views = (theta, self.model.layout.views(theta))
        return self._theta_views[1]

    def batch_indices(self, batch: Batch):
        """The rows of the whole global ``batch``: a slice of the epoch's permutation, which
        lives where the data does (copied to the GPU once an epoch, not once a step)."""
        if self._perm[0] != batch.epoch:
            perm = epoch_permutation(self.job.training.seed, batch.epoch, self.n)
            self._perm = (batch.epoch, perm if self.xp is np else self.xp.asarray(perm))
        return self._perm[1][batch.start:batch.stop]

    def shard_range(self, batch_len: int) -> tuple[int, int]:
        """[lo, hi) of this worker's shard within a global batch of ``batch_len`` rows."""
        return shard_bounds(batch_len, self.num_workers, self.rank)

    def shard_indices(self, batch: Batch):
        """This worker's rows of ``batch``."""
        lo, hi = self.shard_range(len(batch))
        return self.batch_indices(batch)[lo:hi]

    def _gather_buffers(self, n: int):
        bufs = self._gathered.get(n)
        if bufs is None:
            xp = self.xp
            bufs = (xp.empty((n,) + self.x.shape[1:], self.x.dtype),
                    xp.empty((n,) + self.t.shape[1:], self.t.dtype),
                    None if self.labels is None else xp.empty(n, self.labels.dtype))
            if len(self._gathered) > 2:    # the batch shard and a short last one
                self._gathered.clear()
            self._gathered[n] = bufs
        return bufs

    def compute(self, theta, batch: Batch):
        """ΔΘ summed over this worker's shard of the global ``batch``."""
        xp = self.xp
        self.calls += 1
        if self._fault and self.calls >= self._fault[0]:
            if self._fault[1] == "hang":
                time.sleep(3600)
            raise RuntimeError(f"injected fault ({FAULT_ENV}) in worker {self.rank} at step {self.calls}")
        idx = self.shard_indices(batch)
        if len(idx) == 0:                  # a short last batch can leave a worker nothing
            self.grad[...] = 0
            return self.grad
        measure = self.measures(batch.step)
        if measure and self.num_workers == 1 and len(idx) >= 2:
            self._two_halves(theta, *self._gather(idx))
        else:
            self.compute_rows(theta, idx)
            if measure:
                self.norms.add_shard(squared_norm(xp, self.grad), len(idx))
        self.count += len(idx)
        return self.grad

    def _gather(self, idx):
        """Rows ``idx`` of the training split into buffers kept per shard size."""
        xp = self.xp
        x, t, labels = self._gather_buffers(len(idx))
        # NumPy's mode="clip" gathers unbuffered (the indices are valid); CuPy's take has no
        # mode and never buffers
        kw = {"mode": "clip"} if xp is np else {}
        if isinstance(self.x, (ByteImages, DeviceByteImages)):
            self.x.take(idx, x, self._take_rows)
        else:
            xp.take(self.x, idx, axis=0, out=x, **kw)
        xp.take(self.t, idx, axis=0, out=t, **kw)
        if labels is not None:
            xp.take(self.labels, idx, axis=0, out=labels, **kw)
        return x, t, labels

    def compute_rows(self, theta, idx):
        """ΔΘ summed over the rows ``idx`` (where the data lives), the loss and right answers
        added to the running totals: device work only, so a CUDA graph can capture it (the
        caller counts the samples)."""
        x, t, labels = self._gather(idx)
        self._accumulate(*self.model.loss_and_grad(self.params(theta), self.grad_views, x, t, labels))
        return self.grad

    def _accumulate(self, loss, correct):
        if self._totals is not None:       # in place on the device: no sync, no allocation
            self.xp.add(self._totals[0:1], loss, out=self._totals[0:1])
            if correct is not None:
                self.xp.add(self._totals[1:2], correct, out=self._totals[1:2])
            return
        self.loss_sum += loss.astype(np.float64)   # float32 sums drift over an epoch
        if correct is not None:
            self.correct += correct

    def _two_halves(self, theta, x, t, labels):
        """One worker alone has no second shard to compare with: ΔΘ of each half of its
        batch, measured, then summed (the noise scale's two batch sizes are B/2 and B)."""
        xp, n = self.xp, x.shape[0]
        h = n - n // 2                      # split as two workers' shards are (shard_bounds)
        if self._half is None:
            self._half = xp.zeros_like(self.grad)
        params = self.params(theta)
        half = labels[:h] if labels is not None else None
        rest = labels[h:] if labels is not None else None
        self._accumulate(*self.model.loss_and_grad(params, self.model.layout.views(self._half), x[:h], t[:h], half))
        self.norms.add_shard(squared_norm(xp, self._half), h)
        self._accumulate(*self.model.loss_and_grad(params, self.grad_views, x[h:], t[h:], rest))
        self.norms.add_shard(squared_norm(xp, self.grad), n - h)
        self.grad += self._half

"""``aggregation: central`` on Ray: worker actors compute ΔΘ, a parameter-aggregator actor
sums them, applies the optimizer and returns Θ — one object per step in the object store,
read zero-copy by every worker."""
from __future__ import annotations

import socket
import time

import numpy as np

from .. import kernels
from ..errors import WorkerFailed
from ..xp import array_module_for, limit_blas_threads, to_numpy
from .aggregator import Aggregator
from .backend import GradNorms, StepTimes, Totals, noise_every
from .ray_cluster import RayBackend, actor_process
from .worker import Worker


class _WorkerActor:
    """A :class:`Worker` in a Ray actor; ``x``/``t``/``labels`` arrive zero-copy from the store."""

    def __init__(self, job, x, t, labels, rank, num_workers, threads):
        self._limits = limit_blas_threads(threads)
        self.xp = array_module_for(job)
        self.worker = Worker(job, x, t, labels, rank, num_workers, self.xp)
        self.compute_times: list[float] = []

    def process(self) -> dict:
        return actor_process()

    def compute(self, theta, batch):
        t0 = time.perf_counter()
        theta = self.xp.asarray(theta)
        grad = to_numpy(self.worker.compute(theta, batch))
        self.compute_times.append(time.perf_counter() - t0)
        return grad

    def pop_stats(self):
        return self.worker.pop_stats()

    def pop_norms(self):
        return self.worker.pop_norms()

    def pop_times(self):
        out, self.compute_times = self.compute_times, []
        return out


class _AggregatorActor:
    """Holds Θ and the optimizer, sums ΔΘ in rank order, applies the update, returns Θ."""

    def __init__(self, optimizer_cfg, theta, optimizer_state, step, kernels="numpy", noise_every=0):
        self.aggregator = Aggregator(optimizer_cfg, theta, optimizer_state, step, kernels=kernels,
                                     noise_every=noise_every)
        self._sum = np.empty_like(self.aggregator.theta)
        self.update_times: list[float] = []

    def apply(self, lr, count, *grads):
        """Returns (Θ, True): Θ for the workers, the flag for the driver to wait on."""
        t0 = time.perf_counter()
        _sum_into(self._sum, grads)
        theta = self.aggregator.apply(self._sum, count, lr)
        self.update_times.append(time.perf_counter() - t0)
        return theta, True

    def pop_times(self):
        out, self.update_times = self.update_times, []
        return out

    def pop_norms(self):
        return self.aggregator.pop_norms()

    def state(self):
        return self.aggregator.state()


AGGREGATOR = f"the aggregator on {socket.gethostname()}"       # the driver's node, as placed below


class RayCentralBackend(RayBackend):
    """``aggregation: central``: worker actors compute ΔΘ, an aggregator actor updates Θ."""

    aggregator = None                   # until init_state

    def _start(self):
        Actor = self.ray.remote(_WorkerActor)
        n = self.num_workers
        self.workers = [Actor.options(**self._actor_options(r)).remote(self.job, *self.data_refs, r, n, self.cpus)
                        for r in range(n)]
        self.times = StepTimes()
        self._wall = 0.0
        self._pending = None

    def _actors(self) -> list:
        return list(self.workers) + ([self.aggregator] if self.aggregator is not None else [])

    def start(self, theta, optimizer_state, step):
        theta = np.ascontiguousarray(theta, np.float32)
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        Agg = self.ray.remote(_AggregatorActor)
        # beside the driver, which holds the run anyway: the loss of any other node costs
        # workers only, which a restart (or failure.min_workers) replaces
        here = NodeAffinitySchedulingStrategy(self.ray.get_runtime_context().get_node_id(), soft=False)
        self.aggregator = Agg.options(num_cpus=0, scheduling_strategy=here).remote(self.job.optimizer, theta, optimizer_state, step,
                                                         kernels.resolve(self.job.scaling.kernels),
                                                         noise_every(self.job))
        self.theta_ref = self.ray.put(theta)

    def train_step(self, batch, lr):
        t0 = time.perf_counter()
        grads = [w.compute.remote(self.theta_ref, batch) for w in self.workers]
        self.theta_ref, ok = self.aggregator.apply.options(num_returns=2).remote(lr, len(batch), *grads)
        # one step in flight: submitting step s+1 overlaps the tail of step s
        if self._pending is not None:
            self._wait_step(*self._pending)
        self._pending = (grads, ok, batch.describe())
        self._wall += time.perf_counter() - t0

    def _wait_step(self, grads, ok, what):
        """Wait for the aggregator's flag only (ΔΘ and Θ stay in the object store); if it
        fails or is late, name the worker whose ΔΘ failed or is missing, else the aggregator."""
        try:
            self._get([ok], what, names=[AGGREGATOR])
        except WorkerFailed:
            done, late = self.ray.wait(grads, num_returns=len(grads), timeout=0, fetch_local=False)
            self._get(done, what, names=[self.name(grads.index(g)) for g in done], timeout=0)
            if late:
                raise WorkerFailed(f"{', '.join(self.name(grads.index(g)) for g in late)} did not "
                                   f"finish {what} within scaling.timeout_s={self.timeout:g} s") from None
            raise

    def _drain(self):
        t0 = time.perf_counter()
        if self._pending is not None:
            self._wait_step(*self._pending)
            self._pending = None
        self._wall += time.perf_counter() - t0

    def train_totals(self):
        self._drain()
        tot = Totals()
        for stats in self._get([w.pop_stats.remote() for w in self.workers], "reporting totals"):
            tot.add(*stats)
        return tot

    def grad_norms(self):
        self._drain()
        out = GradNorms()
        for norms in self._get([w.pop_norms.remote() for w in self.workers] + [self.aggregator.pop_norms.remote()],
                               "reporting gradient norms",
                               names=[self.name(r) for r in range(self.num_workers)] + [AGGREGATOR]):
            out.add(norms)
        return out

    def sync(self):
        self._drain()

    def params(self):
        self._drain()
        return self.ray.get(self.theta_ref)

    def state(self):
        self._drain()
        return self._get([self.aggregator.state.remote()], "checkpointing", names=[AGGREGATOR])[0]

    def pop_times(self):
        self._drain()
        compute = np.array(self._get([w.pop_times.remote() for w in self.workers], "reporting times"))
        update = np.array(self._get([self.aggregator.pop_times.remote()], "reporting times",
                                    names=[AGGREGATOR])[0])
        out, self.times = self.times, StepTimes()
        if compute.size:
            slowest = compute.max(axis=0)
            out.compute = float(compute.mean(axis=0).sum())
            out.waiting = float((slowest - compute.mean(axis=0)).sum())
            out.update = float(update.sum())
            out.communication = max(0.0, self._wall - float(slowest.sum()) - out.update)
            out.steps = compute.shape[1]
        self._wall = 0.0
        return out


def _sum_into(out, grads):
    """ΔΘ summed in rank order."""
    if len(grads) == 1:
        np.copyto(out, grads[0])
        return
    np.add(grads[0], grads[1], out=out)
    for g in grads[2:]:
        out += g

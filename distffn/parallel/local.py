"""Workers and aggregator in this process: 1 worker is the plain single-machine case; N > 1
runs the N shards one after another, the reference the distributed backends must match."""
from __future__ import annotations

import time

from .. import kernels
from ..xp import array_module_for
from . import cuda_graph
from .aggregator import Aggregator
from .backend import Backend, StepTimes, Totals, noise_every
from .worker import Worker


class LocalBackend(Backend):
    """``scaling.backend: local``: every worker in this process, one after another."""

    def __init__(self, job, data):
        self.job = job
        self.array_module = xp = array_module_for(job)
        self.num_workers = job.scaling.num_workers
        self.workers = [Worker(job, data.x_train, data.t_train, data.labels_train, r,
                               self.num_workers, xp) for r in range(self.num_workers)]
        self.aggregator = None
        self.times = StepTimes()
        self._sum = None

    def start(self, theta, optimizer_state, step):
        xp = self.array_module
        self.aggregator = Aggregator(self.job.optimizer, xp.asarray(theta), optimizer_state, step, xp,
                                     kernels=kernels.resolve(self.job.scaling.kernels, self.job.scaling.use_gpu),
                                     noise_every=noise_every(self.job))
        self._sum = xp.empty_like(self.aggregator.theta) if self.num_workers > 1 else None
        if self.graphs is not None:     # a restart: the graphs read the old Θ's memory
            self.graphs.close()
        self.graphs = cuda_graph.GraphedSteps(self, self.job) if cuda_graph.wanted(self.job) else None

    graphs = None                       # the CUDA graphs of a GPU run's steps (scaling.cuda_graph)

    def train_step(self, batch, lr):
        t0 = time.perf_counter()
        if self.graphs is not None and self.graphs.step(batch, lr):
            self.times.compute += time.perf_counter() - t0      # one launch: compute and update
            self.times.steps += 1
            return
        theta = self.aggregator.theta
        if self.num_workers == 1:
            grad = self.workers[0].compute(theta, batch)
        else:
            grad = self._sum
            grad[...] = 0
            for w in self.workers:
                grad += w.compute(theta, batch)
        t1 = time.perf_counter()
        self.aggregator.apply(grad, len(batch), lr)
        t2 = time.perf_counter()
        self.times.compute += t1 - t0
        self.times.update += t2 - t1
        self.times.steps += 1

    def train_totals(self):
        tot = Totals()
        for w in self.workers:
            tot.add(*w.pop_stats())
        return tot

    def grad_norms(self):
        out = self.aggregator.pop_norms()
        for w in self.workers:
            out.add(w.pop_norms())
        return out

    def params(self):
        return self.aggregator.theta

    def state(self):
        return self.aggregator.state()

    def pop_times(self):
        out, self.times = self.times, StepTimes()
        return out

    def close(self):
        if self.graphs is not None:
            self.graphs.close()
            self.graphs = None

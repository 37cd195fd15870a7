"""Workers and aggregator in this process: 1 worker is the plain single-machine case; N > 1
runs the N shards one after another, the reference the distributed backends must match."""
from __future__ import annotations

import time

import numpy as np

from ..aggregator import Aggregator
from ..model import MLP
from ..worker import Worker
from ..xp import get_array_module, to_numpy
from .base import Backend, Data, StepTimes, Totals


class LocalBackend(Backend):
    def __init__(self, job, data: Data):
        self.job = job
        self.xp = xp = get_array_module(job.scaling.use_gpu)
        self.num_workers = job.scaling.num_workers
        self.workers = [Worker(job, data.x_train, data.t_train, data.labels_train, r,
                               self.num_workers, xp) for r in range(self.num_workers)]
        self.eval_model = self.workers[0].model
        self.test = (xp.asarray(data.x_test), xp.asarray(data.t_test),
                     None if data.labels_test is None else xp.asarray(data.labels_test))
        self.aggregator = None
        self.times = StepTimes()
        self._sum = None

    def init_state(self, theta, velocity, step):
        xp = self.xp
        self.aggregator = Aggregator(xp.asarray(theta, dtype=np.float32).copy(),
                                     self.job.optimizer.momentum, xp)
        self.aggregator.velocity[...] = xp.asarray(velocity)
        self.aggregator.step = step
        self._sum = xp.empty_like(self.aggregator.theta) if self.num_workers > 1 else None

    def train_step(self, epoch, batch_index, batch_len, lr):
        t0 = time.perf_counter()
        theta = self.aggregator.theta
        if self.num_workers == 1:
            grad = self.workers[0].compute(theta, epoch, batch_index)
        else:
            grad = self._sum
            grad[...] = 0
            for w in self.workers:
                grad += w.compute(theta, epoch, batch_index)
        t1 = time.perf_counter()
        self.aggregator.apply(grad, batch_len, lr)
        t2 = time.perf_counter()
        self.times.compute += t1 - t0
        self.times.update += t2 - t1
        self.times.steps += 1

    def train_totals(self):
        tot = Totals()
        for w in self.workers:
            tot.add(*w.pop_stats())
        return tot

    def evaluate(self):
        x, t, labels = self.test
        params = self.eval_model.layout.views(self.aggregator.theta)
        loss, correct = self.eval_model.evaluate(params, x, t, labels, self.job.training.eval_batch_size)
        tot = Totals()
        tot.add(loss, correct, x.shape[0])
        return tot

    def state(self):
        return to_numpy(self.aggregator.theta).copy(), to_numpy(self.aggregator.velocity).copy()

    def pop_times(self):
        out, self.times = self.times, StepTimes()
        return out

"""The interface every backend implements for the trainer.

A backend only communicates: it runs the workers' step on their shards of each global batch,
aggregates ΔΘ, applies the update through the aggregator, and hands Θ and the optimizer
state back. Evaluation, checkpoints and restoring state are written once, in
:mod:`distffn.training`, on top of this interface.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import numpy as np


@dataclass
class Totals:
    """Exact sums over samples: loss and correct counts, never averages of averages."""
    loss_sum: float = 0.0
    correct: int = 0
    count: int = 0

    def add(self, loss_sum, correct, count):
        self.loss_sum += float(loss_sum)
        self.correct += int(correct or 0)
        self.count += int(count)


@dataclass
class StepTimes:
    """Seconds spent per phase, summed over steps (the per-step time breakdown)."""
    compute: float = 0.0        # forward + backward on the workers
    communication: float = 0.0  # moving ΔΘ and Θ between workers and aggregator
    update: float = 0.0         # the optimizer's update
    waiting: float = 0.0        # idle: the slowest worker's lead over the others
    steps: int = 0

    def add(self, other: "StepTimes"):
        for k in ("compute", "communication", "update", "waiting", "steps"):
            setattr(self, k, getattr(self, k) + getattr(other, k))

    def per_step_ms(self) -> dict:
        """Milliseconds per step in each phase (the run's breakdown at a glance)."""
        n = max(1, self.steps)
        return {k: round(1e3 * getattr(self, k) / n, 4)
                for k in ("compute", "communication", "update", "waiting")}

    def as_dict(self, prefix: str = "time_") -> dict:
        d = {f"{prefix}{k}_s": round(getattr(self, k), 6)
             for k in ("compute", "communication", "update", "waiting")}
        d[f"{prefix}steps"] = self.steps
        return d


@dataclass
class GradNorms:
    """Squared gradient norms at two batch sizes, summed over the measured steps: what the
    gradient noise scale is estimated from (``metrics.noise_scale``). The small batches are
    the workers' shards (with one worker, the two halves of its batch); the big one is the
    global batch. Each is the norm of the *mean* gradient over its samples."""
    small_sq: float = 0.0       # Σ over shards of |ΔΘ_shard / b|²
    small_inv: float = 0.0      # Σ over shards of 1 / b
    shards: int = 0
    big_sq: float = 0.0         # Σ over steps of |ΣΔΘ / B|²
    big_inv: float = 0.0        # Σ over steps of 1 / B
    steps: int = 0

    FIELDS = ("small_sq", "small_inv", "shards", "big_sq", "big_inv", "steps")

    def add(self, other: "GradNorms"):
        for k in self.FIELDS:
            setattr(self, k, getattr(self, k) + getattr(other, k))
        return self

    def as_array(self) -> np.ndarray:
        return np.array([getattr(self, k) for k in self.FIELDS], np.float64)

    @classmethod
    def from_array(cls, values) -> "GradNorms":
        out = cls(*(float(v) for v in values))
        out.shards, out.steps = int(round(out.shards)), int(round(out.steps))
        return out

    def add_shard(self, sq_sum: float, n: int):
        """One shard of ``n`` samples whose summed ΔΘ has squared norm ``sq_sum``."""
        self.small_sq += sq_sum / (n * n)
        self.small_inv += 1.0 / n
        self.shards += 1

    def add_batch(self, sq_sum: float, n: int):
        """One global batch of ``n`` samples whose summed ΔΘ has squared norm ``sq_sum``."""
        self.big_sq += sq_sum / (n * n)
        self.big_inv += 1.0 / n
        self.steps += 1

    def small_part(self) -> "GradNorms":
        return GradNorms(self.small_sq, self.small_inv, self.shards)


def noise_every(job) -> int:
    """Steps between gradient-norm measurements; 0 unless ``metrics.noise_scale`` or an
    adaptive batch size (which is chosen from them)."""
    return job.metrics.noise_every if job.metrics.noise_scale or job.training.is_adaptive else 0


def squared_norm(xp, v) -> float:
    """|v|²: one BLAS dot (float32 with BLAS's blocked partial sums; the relative error, about
    1e-6, is far below the differences of norms the noise-scale estimate takes)."""
    return float(xp.dot(v, v))


def placement_of(workers: list[dict]) -> list[str]:
    """Each worker's Ray node id, else its host, from :meth:`Backend.worker_processes`."""
    return [w.get("node", w["host"]) for w in workers]


class Backend:
    """One training run's workers and aggregator.

    ``train_step`` applies one update from one global batch; the trainer pulls exact totals
    with ``train_totals`` at its log interval, so no step waits on the host for a loss.

    Every process that runs the trainer (one driver, or every MPI rank) holds a backend;
    ``process_index``/``process_count`` say which of them this is, so that work above the
    backends (evaluation) can be split among them and summed with :meth:`sum_over_processes`.
    """

    num_workers: int = 1
    is_root: bool = True                 # this process writes files and prints
    process_index: int = 0
    process_count: int = 1
    array_module = np                    # where :meth:`params` lives (NumPy or CuPy)
    stop_signal: int = 0                 # a signal every trainer process agreed to stop on

    def request_stop(self, signum: int):
        """A signal reached this process: stop after the current step. Where several processes
        run the trainer they must stop after the same step, so :attr:`stop_signal` is set only
        once all of them know (MPI: at the next collective's handshake)."""
        self.stop_signal = signum

    def placement(self) -> list[str]:
        """Where each worker runs (its Ray node id, else its host), for the run's records."""
        return placement_of(self.worker_processes())

    def worker_processes(self) -> list[dict]:
        """``{"rank", "host", "pid"}`` of each live worker (RUN_DIR/workers.json)."""
        return [{"rank": r, "host": socket.gethostname(), "pid": os.getpid()} for r in range(self.num_workers)]

    def live_workers(self) -> int:
        """After a worker failed: how many workers are left that still answer (only Ray's
        can be fewer than all: elsewhere every worker lives and dies with the run)."""
        return self.num_workers

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every trainer process (only MPI has more than one)."""
        return obj

    def sum_over_processes(self, values: np.ndarray) -> np.ndarray:
        """Elementwise sum of a small host array over the trainer processes."""
        return values

    def start(self, theta: np.ndarray, optimizer_state: dict | None, step: int):
        """Start from Θ and the optimizer's buffers after ``step`` updates (None: fresh
        buffers); the root process's copy counts."""
        raise NotImplementedError

    def train_step(self, batch, lr: float):
        """One update from the global ``batch`` (:class:`~distffn.data.sharding.Batch`) at rate
        ``lr``; a backend may queue it until :meth:`sync`."""
        raise NotImplementedError

    def sync(self):
        """Finish every queued step."""

    def train_totals(self) -> Totals:
        """Exact training loss and accuracy totals since the last call, summed over workers."""
        raise NotImplementedError

    def params(self):
        """The current Θ (after :meth:`sync`), an array of :attr:`array_module`; read only."""
        raise NotImplementedError

    def state(self) -> tuple[np.ndarray, dict | None]:
        """Host copies of Θ and the optimizer's named buffers, for checkpoints."""
        raise NotImplementedError

    def pop_times(self) -> StepTimes:
        """The per-phase time breakdown since the last call."""
        raise NotImplementedError

    def grad_norms(self) -> GradNorms:
        """The gradient norms measured since the last call (``metrics.noise_scale``), summed
        over the workers; a collective on MPI."""
        raise NotImplementedError

    def close(self):
        pass

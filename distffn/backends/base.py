"""The interface every backend implements for the trainer."""
from __future__ import annotations

from dataclasses import dataclass, field

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
    update: float = 0.0         # the momentum SGD update
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
class Data:
    """What a backend needs of the dataset: prepared targets and class ids per split."""
    x_train: np.ndarray
    t_train: np.ndarray
    labels_train: object
    x_test: np.ndarray
    t_test: np.ndarray
    labels_test: object
    extra: dict = field(default_factory=dict)


class Backend:
    """One training run's workers and aggregator.

    ``train_step`` applies one update from one global batch; the trainer pulls exact totals
    with ``train_totals`` at its log interval, so no step waits on the host for a loss.
    """

    num_workers: int = 1
    is_root: bool = True                 # this process writes files and prints

    def placement(self) -> list[str]:
        """Where each worker runs (host or node id), for the run's records."""
        import socket
        return [socket.gethostname()] * self.num_workers

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every process (only MPI has more than one)."""
        return obj

    def init_state(self, theta: np.ndarray, velocity: np.ndarray, step: int):
        """Start from Θ and velocity after ``step`` updates (the root's copy counts)."""
        raise NotImplementedError

    def train_step(self, epoch: int, batch_index: int, batch_len: int, lr: float):
        raise NotImplementedError

    def train_totals(self) -> Totals:
        raise NotImplementedError

    def evaluate(self) -> Totals:
        raise NotImplementedError

    def state(self) -> tuple[np.ndarray, np.ndarray]:
        """Host copies of (Θ, velocity) for checkpoints."""
        raise NotImplementedError

    def pop_times(self) -> StepTimes:
        raise NotImplementedError

    def close(self):
        pass

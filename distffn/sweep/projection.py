"""The α-β model: step time on N workers from what was measured here, projected to cluster
scale over a network preset from :data:`~distffn.parallel.links.NETWORKS`.

    step(B, N) = fixed + per_sample · ⌈B/N⌉ + [N > 1] · (sync + allreduce(N))

with allreduce(N) (or central(N)) the link's α-β cost (:mod:`distffn.parallel.links`).

``fixed`` (per-step overhead: the update, launching the step) and ``per_sample`` (forward and
backward per sample) are fitted to the 1-worker timed runs; ``sync`` is what a distributed
step measured here costs beyond its compute (the handshake before each collective, MPI's
software path, the local copy), which a cluster pays as well; α is a message's latency and β
the time per byte of the network preset. Every figure built from it is a *projection*, and
says so.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from ..parallel.links import NETWORKS, Network, communication_seconds

__all__ = ["NETWORKS", "Network", "communication_seconds", "StepModel", "fit_step_model", "fit_sync",
           "worker_counts", "PROJECTED_WORKERS", "batch_schedule", "schedule_seconds"]

@dataclass
class StepModel:
    """Step time on N workers: ``fixed + per_sample·⌈B/N⌉ + [N > 1]·(sync + communication(N))``,
    with the compute terms fitted to the measured 1-worker step times and ``sync`` to the
    measured N > 1 ones."""
    fixed: float            # seconds per step that do not grow with the batch
    per_sample: float       # seconds per sample of a worker's shard
    n_bytes: int            # ΔΘ's size (float32)
    sync: float = 0.0       # seconds a distributed step costs beyond compute, measured here

    def compute_seconds(self, batch: int, workers: int) -> float:
        return self.fixed + self.per_sample * math.ceil(batch / workers)

    def step_seconds(self, batch: int, workers: int, net: Network, aggregation: str = "allreduce") -> float:
        if workers <= 1:
            return self.compute_seconds(batch, 1)
        return (self.compute_seconds(batch, workers) + self.sync
                + communication_seconds(self.n_bytes, workers, net, aggregation))

    def as_dict(self) -> dict:
        return asdict(self)


def fit_step_model(one_worker: dict[int, float], n_bytes: int) -> StepModel:
    """Least squares in relative error of ``step = fixed + per_sample · B`` over the measured
    1-worker step times ``{B: seconds}`` (both terms kept non-negative)."""
    b = np.array(sorted(one_worker), np.float64)
    t = np.array([one_worker[k] for k in sorted(one_worker)], np.float64)
    if len(b) == 1:
        return StepModel(0.0, float(t[0] / b[0]), n_bytes)
    a = np.stack([np.ones_like(b), b], axis=1) / t[:, None]        # rows scaled by 1/t
    (fixed, per_sample), *_ = np.linalg.lstsq(a, np.ones_like(t), rcond=None)
    if fixed < 0:
        fixed, per_sample = 0.0, float(np.sum(b * t / t ** 2) / np.sum(b * b / t ** 2))
    if per_sample < 0:
        fixed, per_sample = float(np.mean(t)), 0.0
    return StepModel(float(fixed), float(per_sample), n_bytes)


def fit_sync(model: StepModel, measured: dict[tuple[int, int], float], net: Network | None = None,
             aggregation: str = "allreduce") -> StepModel:
    """``model`` with ``sync`` set to the median of what the measured N > 1 step times
    ``{(B, N): seconds}`` add to the fitted compute (0 without any); with ``net``, the link
    the runs were measured over, what they add beyond its communication too."""
    link = (lambda n: communication_seconds(model.n_bytes, n, net, aggregation)) if net else (lambda n: 0.0)
    extra = [max(0.0, s - model.compute_seconds(b, n) - link(n)) for (b, n), s in measured.items() if n > 1]
    model.sync = float(np.median(extra)) if extra else 0.0
    return model


def worker_counts(batch: int, most: int = 1024) -> list[int]:
    """1, 2, 4, ... up to ``most``, each at most ``batch`` (a worker needs a sample)."""
    out, n = [], 1
    while n <= min(most, batch):
        out.append(n)
        n *= 2
    return out


# the worker counts summary.json projects every fixed batch and adaptive schedule to
PROJECTED_WORKERS = (8, 64, 512, 1024)


def batch_schedule(records, steps: int) -> list[tuple[int, int]]:
    """``[(batch, updates), ...]`` of a run's first ``steps`` updates from its ``batch``
    records (``{"step": S, "batch_size": B}``: B from update S on, until the next record; a
    resumed run records a step again, and the last record of a step counts)."""
    at = {}
    for r in records:
        if r.get("event", "batch") == "batch" and r.get("step") is not None:
            at[int(r["step"])] = int(r["batch_size"])
    starts = sorted(s for s in at if s < steps)
    if not starts or starts[0] != 0:
        raise ValueError(f"no batch record at step 0 (records at {starts[:3]})")
    ends = starts[1:] + [steps]
    return [(at[s], e - s) for s, e in zip(starts, ends)]


def schedule_seconds(model: StepModel, schedule: list[tuple[int, int]], workers: int, net: Network,
                     aggregation: str = "allreduce") -> float:
    """Seconds for the updates of ``schedule`` (:func:`batch_schedule`) on ``workers`` workers:
    the sum over its steps of ``model.step_seconds(B_t, N)``. A step whose batch is smaller
    than N runs on B_t workers, a sample each (the rest sit it out): the fastest such a step
    can be, and what a fixed batch of B_t is projected to at most (:func:`worker_counts`)."""
    return sum(count * model.step_seconds(batch, min(workers, batch), net, aggregation)
               for batch, count in schedule)

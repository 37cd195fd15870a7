"""Which samples each worker sees: one seeded permutation per epoch, split into global
batches, each split into near-equal shards. Every worker computes this itself from
(seed, epoch), so no index lists travel."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Batch(NamedTuple):
    """One global batch: samples [start, stop) of ``epoch``'s permutation, for update number
    ``step`` of the run. A fixed batch size makes them consecutive slices of equal size; an
    adaptive one changes the size between steps, and the shards split each the same way."""
    epoch: int
    start: int
    stop: int
    step: int

    def __len__(self):
        return self.stop - self.start

    def describe(self) -> str:
        return f"step {self.step + 1} (epoch {self.epoch + 1})"


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The sample order of ``epoch``: identical on every worker and on resume."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def steps_per_epoch(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)


def batch_bounds(n: int, batch_size: int, batch_index: int) -> tuple[int, int]:
    """[start, stop) of global batch ``batch_index`` in the epoch's permutation."""
    start = batch_index * batch_size
    return start, min(start + batch_size, n)


def fixed_batch(n: int, batch_size: int, epoch: int, batch_index: int, step: int) -> Batch:
    """Global batch ``batch_index`` of ``epoch`` at a fixed ``batch_size``, as update ``step``."""
    start, stop = batch_bounds(n, batch_size, batch_index)
    return Batch(epoch, start, stop, step)


def shard_bounds(batch_len: int, num_workers: int, rank: int) -> tuple[int, int]:
    """[lo, hi) of worker ``rank``'s shard: sizes differ by at most one (first ones larger)."""
    q, r = divmod(batch_len, num_workers)
    lo = rank * q + min(rank, r)
    return lo, lo + q + (1 if rank < r else 0)

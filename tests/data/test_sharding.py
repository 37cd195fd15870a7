"""Which samples each worker sees: seeded epoch order, global batches, near-equal shards."""
from __future__ import annotations

import numpy as np
import pytest

from distffn.data.sharding import batch_bounds, epoch_permutation, shard_bounds, steps_per_epoch


@pytest.mark.parametrize("batch_len,workers", [(50, 3), (1, 3), (128, 2), (7, 7), (10, 4)])
def test_shards_cover_the_batch_and_differ_by_at_most_one(batch_len, workers):
    bounds = [shard_bounds(batch_len, workers, r) for r in range(workers)]
    assert bounds[0][0] == 0 and bounds[-1][1] == batch_len
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))       # contiguous, in rank order
    sizes = [hi - lo for lo, hi in bounds]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_batches_and_steps_per_epoch():
    assert steps_per_epoch(101, 50, drop_last=False) == 3
    assert steps_per_epoch(101, 50, drop_last=True) == 2
    assert [batch_bounds(101, 50, b) for b in range(3)] == [(0, 50), (50, 100), (100, 101)]


def test_epoch_order_is_a_seeded_permutation_that_changes_per_epoch():
    a = epoch_permutation(5, 0, 1000)
    assert sorted(a) == list(range(1000))
    np.testing.assert_array_equal(a, epoch_permutation(5, 0, 1000))       # every worker agrees
    assert not np.array_equal(a, epoch_permutation(5, 1, 1000))
    assert not np.array_equal(a, epoch_permutation(6, 0, 1000))

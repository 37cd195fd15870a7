"""A worker: its shard of every global batch, ΔΘ summed over it, totals kept until asked."""
from __future__ import annotations

import numpy as np
import pytest

from distffn.data import prepare_data
from distffn.data.sharding import epoch_permutation, fixed_batch
from distffn.jobspec import from_dict
from distffn.parallel.worker import FAULT_ENV, Worker

from helpers import job_dict

N = 101                                 # the job's training samples (data.limit_train)


@pytest.fixture(scope="module")
def setup():
    job = from_dict(job_dict())
    _, data, model = prepare_data(job)
    theta = np.empty(model.num_params, np.float32)
    model.init_params(theta, job.training.seed)
    return job, data, theta


def test_the_shards_of_a_batch_are_its_slice_of_the_epoch_order(setup):
    job, data, _ = setup
    workers = [Worker(job, data.x_train, data.t_train, data.labels_train, r, 3) for r in range(3)]
    perm = epoch_permutation(job.training.seed, 1, data.x_train.shape[0])
    shards = [w.shard_indices(fixed_batch(N, 50, 1, 1, 0)) for w in workers]               # batch 1: samples 50..99
    np.testing.assert_array_equal(np.concatenate(shards), perm[50:100])
    assert [len(s) for s in shards] == [17, 17, 16]


def test_shard_gradients_sum_to_the_whole_batch_and_totals_are_exact(setup):
    job, data, theta = setup
    one = Worker(job, data.x_train, data.t_train, data.labels_train)
    whole = one.compute(theta, fixed_batch(N, 50, 0, 0, 0)).copy()
    parts = [Worker(job, data.x_train, data.t_train, data.labels_train, r, 3) for r in range(3)]
    summed = sum(w.compute(theta, fixed_batch(N, 50, 0, 0, 0)).astype(np.float64) for w in parts)
    np.testing.assert_allclose(summed, whole, rtol=1e-4, atol=1e-5)
    stats = [w.pop_stats() for w in parts]
    loss, correct, count = one.pop_stats()
    assert sum(s[2] for s in stats) == count == 50
    assert sum(s[1] for s in stats) == correct
    assert sum(s[0] for s in stats) == pytest.approx(loss, rel=1e-5)
    assert one.pop_stats() == (0.0, 0, 0)                            # popped: reset


def test_a_worker_left_without_samples_contributes_zero(setup):
    job, data, theta = setup
    w = Worker(job, data.x_train, data.t_train, data.labels_train, 2, 3)
    assert len(w.shard_indices(fixed_batch(N, 50, 0, 2, 2))) == 0                           # the 1-sample last batch
    assert not w.compute(theta, fixed_batch(N, 50, 0, 2, 2)).any()


def test_injected_faults_raise_at_the_named_step(setup, monkeypatch):
    job, data, theta = setup
    monkeypatch.setenv(FAULT_ENV, "1:2")
    w0 = Worker(job, data.x_train, data.t_train, data.labels_train, 0, 2)
    w1 = Worker(job, data.x_train, data.t_train, data.labels_train, 1, 2)
    w0.compute(theta, fixed_batch(N, 50, 0, 0, 0)), w0.compute(theta, fixed_batch(N, 50, 0, 1, 1)), w1.compute(theta, fixed_batch(N, 50, 0, 0, 0))
    with pytest.raises(RuntimeError, match="injected fault .* in worker 1 at step 2"):
        w1.compute(theta, fixed_batch(N, 50, 0, 1, 1))

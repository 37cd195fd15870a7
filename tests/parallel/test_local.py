"""N workers in one process give the model of 1 worker."""
from __future__ import annotations

import numpy as np
import pytest

from distffn.data.sharding import Batch
from distffn.jobspec import from_dict

from helpers import ADAM, assert_same_model, job_dict, train_in_process


def test_the_reference_is_sensitive_to_weighting(reference, tmp_path):
    """Guard against a vacuous equivalence: averaging shard means instead of weighting by
    sample count gives a measurably different model on this job."""
    from distffn.data import prepare_data
    from distffn.parallel.local import LocalBackend

    job = from_dict(job_dict(scaling={"num_workers": 3}))
    _, data, model = prepare_data(job)
    backend = LocalBackend(job, data)
    theta = np.empty(model.num_params, np.float32)
    model.init_params(theta, job.training.seed)
    backend.start(theta, None, 0)
    start = theta.copy()
    # the 1-sample last batch, split over 3 workers, weighted as if each held a third
    backend.train_step(Batch(0, 100, 103, 2), 0.1)           # counted as 3 samples, not 1
    wrong, _ = backend.state()
    backend.start(start, None, 0)
    backend.train_step(Batch(0, 100, 101, 2), 0.1)
    right, _ = backend.state()
    assert np.abs(wrong - right).max() > 1e-3


@pytest.mark.parametrize("n", [2, 3])
def test_local_workers_match_one_worker(reference, tmp_path, n):
    train_in_process(tmp_path / "run", scaling={"num_workers": n})
    assert_same_model(reference, tmp_path / "run")


def test_local_workers_match_one_worker_with_adam(adam_reference, tmp_path):
    train_in_process(tmp_path / "run", scaling={"num_workers": 3}, optimizer=ADAM)
    assert_same_model(adam_reference, tmp_path / "run")

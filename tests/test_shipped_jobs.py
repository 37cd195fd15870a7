"""The shipped jobs on real data reach their targets."""
from __future__ import annotations

import os

import pytest

from distffn.jobspec import load_job
from distffn.training import Trainer

JOBS = os.path.join(os.path.dirname(__file__), "..", "jobs")


FASHION = "/usr/share/datasets/fashion-mnist"


def train(tmp_path, job_file, *overrides):
    job = load_job(os.path.join(JOBS, job_file), list(overrides))
    return Trainer(job, str(tmp_path / "run"), progress=False, echo=lambda s: None).run()


def test_digits_job_reaches_97_percent(tmp_path):
    summary = train(tmp_path, "digits-mlp.yaml")
    assert summary["test_accuracy"] >= 0.97


@pytest.mark.skipif(not os.path.isdir(FASHION), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_learns_in_two_epochs(tmp_path):
    summary = train(tmp_path, "fashion-mnist-mlp.yaml", "training.epochs=2")
    assert summary["test_accuracy"] >= 0.85
    assert summary["train_loss"] < 0.45

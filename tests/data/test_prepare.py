"""From a job spec to training arrays: the data must fit the model."""
from __future__ import annotations

import numpy as np
import pytest

from helpers import npz_job, user_error, write_job


def test_layers_that_do_not_fit_the_input_width(tmp_path, capsys):
    user_error(capsys, ["run", write_job(tmp_path, model={"layers": [784, 32, 10]})],
               "model.layers", "64 features")


def test_layers_that_do_not_fit_the_class_count(tmp_path, capsys):
    user_error(capsys, ["run", write_job(tmp_path, model={"layers": [64, 32, 5]})], "0..9", "5 output units")


def test_labels_out_of_range(tmp_path, capsys):
    user_error(capsys, ["run", npz_job(tmp_path, y_test=np.full(10, 7))], "7..7", "2 output units")


@pytest.mark.parametrize("drop_last", [False, True])
def test_a_batch_larger_than_the_training_split_is_refused(tmp_path, capsys, drop_last):
    job = write_job(tmp_path, training={"batch_size": 5000, "drop_last": drop_last})
    user_error(capsys, ["run", job, "--out", str(tmp_path / "run")], "training.batch_size: 5000",
               "1,438 training samples")

"""Stopping early: at the first evaluation that reaches training.target_value, or at
training.max_steps; a target not reached within the budget is recorded, not an error."""
from __future__ import annotations

import json

import pytest

from distffn.jobspec import from_dict
from distffn.training import Trainer
from distffn.training import checkpoint as ckpt

from helpers import SMALL, interrupted_copy, user_error, write_job


def job(checkpoint=None, **training):
    raw = json.loads(json.dumps(SMALL))
    raw["data"]["validation_fraction"] = 0.1
    raw["training"].update({"epochs": 8, "eval_every": 3, **training})
    raw["checkpoint"] = checkpoint or {}
    return from_dict(raw)


def train(tmp_path, j, name="run"):
    out = tmp_path / name
    summary = Trainer(j, str(out), progress=False, echo=lambda s: None).run()
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, [e for e in evals if e["event"] == "eval"]


@pytest.mark.parametrize("metric,value", [("validation_accuracy", 0.9), ("test_accuracy", 0.9),
                                          ("validation_loss", 0.4), ("test_loss", 0.4)])
def test_the_run_stops_at_the_first_evaluation_reaching_the_target(tmp_path, metric, value):
    full, full_evals = train(tmp_path, job(), "full")
    reached = [e for e in full_evals if (e[metric] >= value if "accuracy" in metric else e[metric] <= value)]
    assert reached and reached[0]["step"] < full["step"]          # the target lies inside the run
    summary, evals = train(tmp_path, job(target_metric=metric, target_value=value))
    first = reached[0]
    assert summary["step"] == first["step"] == evals[-1]["step"]
    assert summary["target"]["reached"] and summary["target"]["step"] == first["step"]
    assert summary["target"]["observed"] == pytest.approx(first[metric])
    start = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    epochs, rest = divmod(first["step"], start["steps_per_epoch"])    # short last batches as they are
    assert summary["target"]["samples"] == epochs * start["n_train"] + rest * 50
    assert "reached" in summary["stopped"]
    # the trajectory up to the target is the full run's
    assert [e[metric] for e in evals] == [e[metric] for e in full_evals if e["step"] <= first["step"]]


def test_a_resumed_run_counts_the_samples_to_its_target_from_the_start(tmp_path):
    """A target reached after a resume is reached after every sample since step 0, not only the
    ones this process stepped through."""
    j = job(target_metric="validation_accuracy", target_value=0.9, checkpoint={"every_steps": 3})
    full, _ = train(tmp_path, j, "full")
    before = [s for s, _ in ckpt.list_checkpoints(str(tmp_path / "full" / "checkpoints"))
              if 0 < s < full["target"]["step"]]
    assert full["target"]["reached"] and before, "the target lies after a checkpoint other than step 0"
    cut = tmp_path / "cut"
    interrupted_copy(tmp_path / "full", cut, before[-1])
    resumed = Trainer(j, str(cut), resume=True, progress=False, echo=lambda s: None).run()
    assert resumed["target"]["step"] == full["target"]["step"]
    assert resumed["target"]["samples"] == full["target"]["samples"]


def test_a_target_not_reached_is_a_result_with_the_best_figure(tmp_path):
    summary, evals = train(tmp_path, job(epochs=1, target_metric="validation_accuracy", target_value=1.0))
    assert summary["target"]["reached"] is False and summary["target"]["step"] is None
    assert summary["target"]["best"] == max(e["validation_accuracy"] for e in evals)
    assert summary["stopped"] is None


def test_max_steps_stops_the_run_and_records_its_times(tmp_path):
    summary, evals = train(tmp_path, job(max_steps=7))
    assert summary["step"] == 7 == evals[-1]["step"]
    assert summary["time_steps"] == 7 and summary["ms_per_step"]["compute"] > 0


def test_a_validation_target_needs_a_validation_split(tmp_path, capsys):
    user_error(capsys, ["run", write_job(tmp_path, training={"target_metric": "validation_loss", "target_value": 0.5})],
               "training.target_metric", "data.validation_fraction")


@pytest.mark.parametrize("training,needles", [
    ({"target_metric": "test_accuracy"}, ["training.target_value", "both"]),
    ({"target_metric": "test_f1", "target_value": 0.5}, ["training.target_metric", "test_accuracy"]),
    ({"target_metric": "test_accuracy", "target_value": 90}, ["training.target_value", "fraction"]),
    ({"target_metric": "test_loss", "target_value": -1}, ["training.target_value", "positive"]),
    ({"max_steps": -1}, ["training.max_steps", "non-negative"]),
])
def test_bad_targets_are_refused(tmp_path, capsys, training, needles):
    user_error(capsys, ["run", write_job(tmp_path, training=training)], *needles)

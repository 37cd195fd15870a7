"""Evaluation on the held-out split, during training and of a saved checkpoint."""
from __future__ import annotations

import json
import os

import pytest

from distffn.cli import main
from distffn.jobspec import from_dict
from distffn.training import Trainer, evaluate_checkpoint
from distffn.training import checkpoint as ckpt

from helpers import job_dict, run_cli, train_in_process, user_error, write_job


def test_eval_reproduces_the_final_accuracy(tmp_path, capsys):
    out = tmp_path / "run"
    run_cli(write_job(tmp_path), "--out", str(out))
    summary = json.loads((out / "summary.json").read_text())
    capsys.readouterr()
    _, last = ckpt.list_checkpoints(str(out / "checkpoints"))[-1]
    assert main(["eval", last]) == 0
    printed = capsys.readouterr().out
    assert f"{100 * summary['test_accuracy']:.2f}%" in printed


def test_eval_every_evaluates_every_n_steps_and_at_the_end(tmp_path):
    """``training.eval_every: 4`` on 3 steps per epoch: evaluations after steps 4 and 8 and the
    last one (9), each an ``eval`` line; epoch lines carry test figures only where Θ was
    evaluated after that very step; and each figure is what ``distffn eval`` gives for the
    checkpoint of that step."""
    out = tmp_path / "run"
    job = from_dict(job_dict(training={"epochs": 3, "eval_every": 4},
                             checkpoint={"every_steps": 4, "num_to_keep": 100}))
    summary = Trainer(job, str(out), progress=False, echo=lambda s: None).run()
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["event"] == "eval"]
    epochs = [r for r in records if r["event"] == "epoch"]
    assert [r["step"] for r in evals] == [4, 8, 9]
    assert [r["epoch"] for r in evals] == [round(4 / 3, 4), round(8 / 3, 4), 3.0]
    assert [r["step"] for r in epochs] == [3, 6, 9]
    assert epochs[0]["test_loss"] is None and epochs[1]["test_loss"] is None
    assert epochs[2]["test_loss"] == evals[2]["test_loss"] == summary["test_loss"]
    for r in evals:
        path = os.path.join(out, "checkpoints", ckpt.checkpoint_name(r["step"]))
        again = evaluate_checkpoint(path)
        assert again["test_loss"] == pytest.approx(r["test_loss"], rel=1e-12)
        assert again["test_correct"] == r["test_correct"] and again["test_count"] == r["test_count"] == 359


def test_default_is_one_evaluation_per_epoch(tmp_path):
    out = tmp_path / "run"
    train_in_process(out, training={"epochs": 2})
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "eval"] == [3, 6]
    assert all(r["test_accuracy"] is not None for r in records if r["event"] == "epoch")


def test_eval_of_a_run_folder_uses_its_newest_valid_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    run_cli(write_job(tmp_path), "--out", str(out))
    steps = ckpt.list_checkpoints(str(out / "checkpoints"))
    (last_step, last), (before_step, before) = steps[-1], steps[-2]
    open(last, "wb").write(b"PK\x03\x04 damaged")             # the newest is damaged
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"{before}: step {before_step} ") and last_step > before_step


@pytest.mark.parametrize("name,needle", [("summary.json", "not a checkpoint"), ("job.yaml", "not a checkpoint")])
def test_eval_names_what_it_was_given_when_that_is_no_checkpoint(tmp_path, capsys, name, needle):
    out = tmp_path / "run"
    run_cli(write_job(tmp_path), "--out", str(out))
    capsys.readouterr()
    user_error(capsys, ["eval", str(out / name)], str(out / name), needle)
    user_error(capsys, ["eval", str(tmp_path)], str(tmp_path), "without a valid checkpoint")

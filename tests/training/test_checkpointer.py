"""Saving and restoring runs: pruning, resume refusals, older formats."""
from __future__ import annotations

from distffn.training import checkpoint as ckpt

from helpers import run_cli, user_error, write_job


def test_num_to_keep_prunes_but_keeps_step_zero(tmp_path):
    out = tmp_path / "run"
    run_cli(write_job(tmp_path, checkpoint={"every_steps": 4, "num_to_keep": 2}), "--out", str(out))
    steps = [s for s, _ in ckpt.list_checkpoints(str(out / "checkpoints"))]
    assert steps[0] == 0 and len(steps) == 3


def test_resume_with_another_model_is_refused(tmp_path, capsys):
    job = write_job(tmp_path)
    out = str(tmp_path / "run")
    run_cli(job, "--out", out)
    capsys.readouterr()
    user_error(capsys, ["run", job, "--out", out, "--resume", "--set", "model.layers=[64,16,10]"],
               "another model")
